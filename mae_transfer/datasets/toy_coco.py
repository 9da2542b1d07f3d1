"""A COCO-format instance-segmentation data set of the synthetic scenes.

    write_toy_coco("data/toy_coco", num_train=200, num_val=50)
    # data/toy_coco/{train,val}/*.jpg, data/toy_coco/annotations/instances_{train,val}.json

Masks are the visible parts of (possibly occluded) objects, stored as uncompressed RLE, so
detectron2 reads them with ``INPUT.MASK_FORMAT bitmask``.
"""

from __future__ import annotations

import json
import os
from typing import Dict

from PIL import Image

from .scenes import GENERATOR_VERSION, SHAPES, mask_bbox, render_scene, rle_encode

TOY_COCO_CLASSES = SHAPES


def _coco_split(root: str, split: str, n: int, seed: int, size: int) -> Dict:
    os.makedirs(os.path.join(root, split), exist_ok=True)
    images, annotations = [], []
    for i in range(n):
        scene = render_scene(seed, i, size)
        name = f"{split}_{i:05d}.jpg"
        Image.fromarray(scene.image).save(os.path.join(root, split, name), quality=95)
        images.append({"id": i + 1, "file_name": name, "height": size, "width": size})
        for o in scene.objects:
            x0, y0, x1, y1 = mask_bbox(o.mask)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": o.kind + 1,
                    "segmentation": rle_encode(o.mask),
                    "area": float(o.mask.sum()),
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "iscrowd": 0,
                }
            )
    categories = [{"id": k + 1, "name": c, "supercategory": "shape"} for k, c in enumerate(SHAPES)]
    return {"images": images, "annotations": annotations, "categories": categories}


def write_toy_coco(
    root: str, num_train: int = 200, num_val: int = 50, size: int = 96, seed: int = 0
) -> Dict[str, tuple]:
    """Writes the data set (skipped when already complete); returns {split: (json, image_root)}."""
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    out = {}
    for split, n, split_seed in (("train", num_train, seed), ("val", num_val, seed + 1)):
        ann = os.path.join(root, "annotations", f"instances_{split}.json")
        info = {"description": "mae-transfer toy shapes", "size": size, "seed": split_seed}
        info["generator"] = GENERATOR_VERSION  # a set from another generator is made again
        if not _complete(ann, n, info):
            data = _coco_split(root, split, n, split_seed, size)
            data["info"] = info
            tmp = ann + ".tmp"
            with open(tmp, "w") as f:
                json.dump(data, f)
            os.replace(tmp, ann)
        out[split] = (ann, os.path.join(root, split))
    return out


def _complete(ann: str, n: int, info: Dict) -> bool:
    if not os.path.isfile(ann):
        return False
    with open(ann) as f:
        data = json.load(f)
    return len(data["images"]) == n and data.get("info") == info
