# LazyConfig version of ../cascade_mask_rcnn_vit_huge_fpn_lsj_100ep.yaml: the ViT-H Mask R-CNN
# LazyConfig (./mask_rcnn_vit_huge_fpn_lsj_100ep.py: backbone, optimizer, 100-epoch schedule) with
# the cascade heads of ./cascade_mask_rcnn_vit_base_fpn_lsj_100ep.py. ViTDet's ViT-H cascade:
# APbox 58.7 / APmask 51.0 after 75 epochs (the schedule of ./mask_rcnn_vitdet_huge_lsj_75ep.py:
# train.max_iter 138281, its steps and warmup x 3/4).
from .cascade_mask_rcnn_vit_base_fpn_lsj_100ep import model as _cascade
from .mask_rcnn_vit_huge_fpn_lsj_100ep import dataloader, lr_multiplier, model, optimizer, train

model.roi_heads = _cascade.roi_heads

__all__ = ["dataloader", "lr_multiplier", "model", "optimizer", "train"]
