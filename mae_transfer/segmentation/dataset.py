"""The generated ADE20K-layout toy data set as an mmseg dataset type."""

from __future__ import annotations

from mmseg.datasets import BaseSegDataset
from mmseg.registry import DATASETS

from mae_transfer.datasets.toy_ade import TOY_ADE_CLASSES


@DATASETS.register_module()
class ToyADEDataset(BaseSegDataset):
    """ADE20K conventions (jpg images, png labels, 0 = unlabeled -> ignored); classes sky,
    ground and the six shapes."""

    METAINFO = dict(
        classes=TOY_ADE_CLASSES,
        palette=[
            [70, 130, 180],  # sky
            [140, 110, 60],  # ground
            [230, 40, 40],  # circle
            [250, 220, 30],  # square
            [40, 200, 60],  # triangle
            [230, 60, 220],  # star
            [30, 220, 230],  # cross
            [250, 140, 20],  # ring
        ],
    )

    def __init__(self, img_suffix=".jpg", seg_map_suffix=".png", reduce_zero_label=True, **kwargs):
        super().__init__(
            img_suffix=img_suffix,
            seg_map_suffix=seg_map_suffix,
            reduce_zero_label=reduce_zero_label,
            **kwargs,
        )
