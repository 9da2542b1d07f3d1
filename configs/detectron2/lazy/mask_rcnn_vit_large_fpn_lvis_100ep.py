# LazyConfig version of ../mask_rcnn_vit_large_fpn_lvis_100ep.yaml: the LVIS recipe of
# ./mask_rcnn_vit_base_fpn_lvis_100ep.py (fed loss, repeat factor sampling, LVISEvaluator, lr
# 2e-4, 156250 iterations) with the ViT-L backbone and layer decay of
# ./mask_rcnn_vit_large_fpn_lsj_100ep.py (ViTDet's LVIS ViT-L changes only these from its
# ViT-B). Run and give data as the ViT-B one says.
from .mask_rcnn_vit_base_fpn_lvis_100ep import dataloader, lr_multiplier, model, optimizer, train
from .mask_rcnn_vit_large_fpn_lsj_100ep import model as _large
from .mask_rcnn_vit_large_fpn_lsj_100ep import optimizer as _large_optimizer

model.backbone = _large.backbone  # ViT-L/16 in 4 equal stages, drop path 0.4 (as its COCO L)
optimizer.params.layer_decay = _large_optimizer.params.layer_decay  # 0.8

__all__ = ["dataloader", "lr_multiplier", "model", "optimizer", "train"]
