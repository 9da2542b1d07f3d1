"""An ADE20K-layout semantic-segmentation data set of the synthetic scenes.

    write_toy_ade("data/toy_ade", num_train=200, num_val=50)
    # images/{training,validation}/*.jpg, annotations/{training,validation}/*.png

Labels follow ADE20K: 0 is "unlabeled" (ignored, via reduce_zero_label) and classes start
at 1: 1 sky, 2 ground, then the six shapes of :data:`~mae_transfer.datasets.scenes.SHAPES`
(3 circle ... 8 ring). A 1-pixel unlabeled rim around each object mimics ADE's unannotated
boundaries.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Dict

import numpy as np
from PIL import Image

from .scenes import GENERATOR_VERSION, SHAPES, Scene, render_scene

TOY_ADE_CLASSES = ("sky", "ground") + SHAPES


def _grow(mask: np.ndarray) -> np.ndarray:
    """4-neighbour dilation that does not wrap around the image edges."""
    padded = np.pad(mask, 1)
    return padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:] | mask


def label_map(scene: Scene, size: int) -> np.ndarray:
    """(size, size) uint8 labels of a scene, ADE convention (0 = unlabeled)."""
    rows = np.arange(size)[:, None]
    labels = np.where(rows >= scene.horizon[None, :], 2, 1).astype(np.uint8)
    for o in scene.objects:
        labels[_grow(o.mask) & ~o.mask] = 0
    for o in scene.objects:  # objects touching each other keep their pixels, not the rim
        labels[o.mask] = 3 + o.kind
    return labels


def write_toy_ade(
    root: str, num_train: int = 200, num_val: int = 50, size: int = 96, seed: int = 100
) -> Dict[str, str]:
    """Writes the data set (skipped when already complete); returns {split: image dir}."""
    out = {}
    for split, n, split_seed in (("training", num_train, seed), ("validation", num_val, seed + 1)):
        img_dir = os.path.join(root, "images", split)
        ann_dir = os.path.join(root, "annotations", split)
        out[split] = img_dir
        info = {"num": n, "size": size, "seed": split_seed, "generator": GENERATOR_VERSION}
        marker = os.path.join(root, f"{split}.json")  # written last: the split is complete
        if os.path.isfile(marker):
            with open(marker) as f:
                if json.load(f) == info:
                    continue
        for d in (img_dir, ann_dir):  # a split from other settings is made again from scratch
            shutil.rmtree(d, ignore_errors=True)
            os.makedirs(d)
        for i in range(n):
            name = f"{split}_{i:05d}"
            scene = render_scene(split_seed, i, size)
            Image.fromarray(scene.image).save(os.path.join(img_dir, name + ".jpg"), quality=95)
            Image.fromarray(label_map(scene, size)).save(os.path.join(ann_dir, name + ".png"))
        with open(marker, "w") as f:
            json.dump(info, f)
    return out
