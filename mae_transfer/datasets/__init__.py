"""Small deterministic data sets a tiny model can learn on CPU in minutes (tests and the demo)."""

from .folders import write_object_crops, write_unlabeled_scenes
from .toy_ade import TOY_ADE_CLASSES, write_toy_ade
from .toy_coco import TOY_COCO_CLASSES, write_toy_coco

__all__ = [
    "TOY_ADE_CLASSES",
    "TOY_COCO_CLASSES",
    "write_object_crops",
    "write_toy_ade",
    "write_toy_coco",
    "write_unlabeled_scenes",
]
