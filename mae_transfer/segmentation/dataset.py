"""The generated ADE20K-layout toy data set as an mmseg dataset type."""

from __future__ import annotations

from mmseg.datasets import BaseSegDataset
from mmseg.registry import DATASETS

from mae_transfer.datasets.toy_ade import TOY_ADE_CLASSES


@DATASETS.register_module()
class ToyADEDataset(BaseSegDataset):
    """ADE20K conventions (jpg images, png labels, 0 = unlabeled -> ignored) and 5 classes."""

    METAINFO = dict(
        classes=TOY_ADE_CLASSES,
        palette=[[70, 130, 180], [140, 110, 60], [230, 60, 50], [240, 210, 40], [225, 50, 215]],
    )

    def __init__(self, img_suffix=".jpg", seg_map_suffix=".png", reduce_zero_label=True, **kwargs):
        super().__init__(
            img_suffix=img_suffix,
            seg_map_suffix=seg_map_suffix,
            reduce_zero_label=reduce_zero_label,
            **kwargs,
        )
