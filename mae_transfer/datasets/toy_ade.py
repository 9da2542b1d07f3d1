"""An ADE20K-layout semantic-segmentation data set of the same synthetic scenes.

    write_toy_ade("data/toy_ade", num_train=200, num_val=50)
    # images/{training,validation}/*.jpg, annotations/{training,validation}/*.png

Labels follow ADE20K: 0 is "unlabeled" (ignored, via reduce_zero_label) and classes start
at 1: 1 sky, 2 ground, 3 circle, 4 square, 5 triangle. A 1-pixel unlabeled rim around each
shape mimics ADE's unannotated boundaries.
"""

from __future__ import annotations

import os
from typing import Dict

import numpy as np
from PIL import Image

from .scenes import SHAPES, rasterize, render_scene

TOY_ADE_CLASSES = ("sky", "ground") + SHAPES


def label_map(scene, size: int) -> np.ndarray:
    rows = np.arange(size)[:, None]
    labels = np.where(rows >= scene.horizon[None, :], 2, 1).astype(np.uint8)
    for s in scene.shapes:
        mask = rasterize(s.polygon, size)
        padded = np.pad(mask, 1)  # a 4-neighbour dilation that does not wrap at the edges
        grown = padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
        labels[grown & ~mask] = 0
        labels[mask] = 3 + s.kind
    return labels


def write_toy_ade(
    root: str, num_train: int = 200, num_val: int = 50, size: int = 128, seed: int = 100
) -> Dict[str, str]:
    """Writes the data set (skipped when already complete); returns {split: image dir}."""
    out = {}
    for split, n, split_seed in (("training", num_train, seed), ("validation", num_val, seed + 1)):
        img_dir = os.path.join(root, "images", split)
        ann_dir = os.path.join(root, "annotations", split)
        os.makedirs(img_dir, exist_ok=True)
        os.makedirs(ann_dir, exist_ok=True)
        for i in range(n):
            name = f"{split}_{i:05d}"
            ann = os.path.join(ann_dir, name + ".png")
            if os.path.isfile(ann):
                continue
            scene = render_scene(split_seed, i, size)
            Image.fromarray(scene.image).save(os.path.join(img_dir, name + ".jpg"), quality=95)
            Image.fromarray(label_map(scene, size)).save(ann + ".tmp.png")
            os.replace(ann + ".tmp.png", ann)  # written last: its presence means complete
        out[split] = img_dir
    return out
