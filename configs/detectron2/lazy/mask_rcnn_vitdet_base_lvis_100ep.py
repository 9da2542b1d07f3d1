# LazyConfig version of ../mask_rcnn_vitdet_base_lvis_100ep.yaml: the LVIS recipe of
# ./mask_rcnn_vit_base_fpn_lvis_100ep.py (fed loss, repeat factor sampling, LVISEvaluator, 300
# detections, lr 2e-4, 156250 iterations) with the simple feature pyramid of
# ./mask_rcnn_vitdet_base_lsj_100ep.py: ViTDet's own LVIS configuration
# (projects/ViTDet/configs/LVIS/mask_rcnn_vitdet_b_100ep.py). Run and give data as those say.
from .mask_rcnn_vit_base_fpn_lvis_100ep import dataloader, lr_multiplier, model, optimizer, train
from .mask_rcnn_vitdet_base_lsj_100ep import model as _simple_pyramid

model.backbone = _simple_pyramid.backbone

__all__ = ["dataloader", "lr_multiplier", "model", "optimizer", "train"]
