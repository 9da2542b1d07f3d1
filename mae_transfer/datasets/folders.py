"""Image folders made from the synthetic scenes: unlabeled ones for pretraining, and labelled
object crops in class folders (``<root>/<class>/*.png``, the ImageNet layout) for k-NN, which
:class:`mae_transfer.data.ClassFolderDataset` reads.

    write_unlabeled_scenes("data/scenes", 4000)         # pretraining images, no labels
    write_object_crops("data/crops/train", 100, seed=7)  # 100 crops per class
"""

from __future__ import annotations

import json
import os
from typing import Dict, Tuple

import numpy as np
from PIL import Image

from .scenes import GENERATOR_VERSION, SHAPES, mask_bbox, render_scene

INFO = "info.json"  # written last: a folder with a matching one is complete


def _is_complete(root: str, info: Dict) -> bool:
    path = os.path.join(root, INFO)
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        return json.load(f) == info


def _mark_complete(root: str, info: Dict) -> None:
    with open(os.path.join(root, INFO + ".tmp"), "w") as f:
        json.dump(info, f)
    os.replace(os.path.join(root, INFO + ".tmp"), os.path.join(root, INFO))


def write_unlabeled_scenes(root: str, num: int, size: int = 96, seed: int = 1000) -> str:
    """``num`` scenes as JPEG files in ``root`` (labels thrown away); returns ``root``."""
    info = {"kind": "unlabeled scenes", "num": num, "size": size, "seed": seed}
    info["generator"] = GENERATOR_VERSION
    if _is_complete(root, info):
        return root
    os.makedirs(root, exist_ok=True)
    for i in range(num):
        image = render_scene(seed, i, size).image
        Image.fromarray(image).save(os.path.join(root, f"scene_{i:05d}.jpg"), quality=95)
    _mark_complete(root, info)
    return root


def crop_box(mask: np.ndarray, context: float = 1.3, min_side: int = 16) -> Tuple[int, ...]:
    """A square (x0, y0, x1, y1) around a mask's bounding box, with context, inside the image."""
    size = mask.shape[0]
    x0, y0, x1, y1 = mask_bbox(mask)
    side = int(round(min(size, max(min_side, context * max(x1 - x0, y1 - y0)))))
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    left = int(round(min(max(cx - side / 2, 0), size - side)))
    top = int(round(min(max(cy - side / 2, 0), size - side)))
    return left, top, left + side, top + side


def write_object_crops(
    root: str, per_class: int, seed: int, size: int = 96, crop_size: int = 96
) -> str:
    """``per_class`` crops of each shape class in ``root/<class>/``; returns ``root``.

    Objects come from scenes of ``seed`` in order; each crop is a square around one object
    (occluders and background included), resized to ``crop_size``.
    """
    info = {"kind": "object crops", "per_class": per_class, "seed": seed, "size": size}
    info.update(crop_size=crop_size, generator=GENERATOR_VERSION)
    if _is_complete(root, info):
        return root
    counts = [0] * len(SHAPES)
    for name in SHAPES:
        os.makedirs(os.path.join(root, name), exist_ok=True)
    index = 0
    while min(counts) < per_class:
        scene = render_scene(seed, index, size)
        for j, o in enumerate(scene.objects):
            if counts[o.kind] >= per_class:
                continue
            crop = Image.fromarray(scene.image).crop(crop_box(o.mask))
            crop = crop.resize((crop_size, crop_size), Image.Resampling.BICUBIC)
            crop.save(os.path.join(root, SHAPES[o.kind], f"{index:05d}_{j}.png"))
            counts[o.kind] += 1
        index += 1
    _mark_complete(root, info)
    return root
