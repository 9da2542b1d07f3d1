# LazyConfig version of ../mask_rcnn_vitdet_large_lvis_100ep.yaml: ViTDet's LVIS ViT-L
# (projects/ViTDet/configs/LVIS/mask_rcnn_vitdet_l_100ep.py), i.e. the LVIS recipe of
# ./mask_rcnn_vitdet_base_lvis_100ep.py (fed loss, repeat factor sampling, LVISEvaluator, lr
# 2e-4, 156250 iterations) with the ViT-L backbone and layer decay of
# ./mask_rcnn_vitdet_large_lsj_100ep.py. Run and give data as the ViT-B one says.
from .mask_rcnn_vitdet_base_lvis_100ep import dataloader, lr_multiplier, model, optimizer, train
from .mask_rcnn_vitdet_large_lsj_100ep import model as _large
from .mask_rcnn_vitdet_large_lsj_100ep import optimizer as _large_optimizer

model.backbone = _large.backbone  # ViT-L/16, drop path 0.4 (ViTDet's LVIS L, as its COCO L)
optimizer.params.layer_decay = _large_optimizer.params.layer_decay  # 0.8

__all__ = ["dataloader", "lr_multiplier", "model", "optimizer", "train"]
