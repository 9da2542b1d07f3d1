# LazyConfig version of ../cascade_mask_rcnn_vitdet_base_lvis_100ep.yaml: ViTDet's LVIS ViT-B
# cascade (projects/ViTDet/configs/LVIS/cascade_mask_rcnn_vitdet_b_100ep.py), i.e. the LVIS Mask
# R-CNN ./mask_rcnn_vitdet_base_lvis_100ep.py with the cascade of
# ./cascade_mask_rcnn_vit_base_fpn_lsj_100ep.py: three box stages, each a copy of its 4conv1fc
# LN box head and of its sigmoid / fed-loss predictor (test threshold 0.02, 300 detections,
# the fed loss counting the training sets), with the stage's box weights and class-agnostic
# boxes, matched at IoU 0.5, 0.6 and 0.7. Run and give data as the Mask R-CNN one says.
from mae_transfer.detection.fed_loss import SigmoidCascadeROIHeads

from .cascade_mask_rcnn_vit_base_fpn_lsj_100ep import to_cascade
from .mask_rcnn_vitdet_base_lvis_100ep import dataloader, lr_multiplier, model, optimizer, train

# CascadeROIHeads as detectron2 0.6 has it; SigmoidCascadeROIHeads is the class the YAML names
to_cascade(model.roi_heads, SigmoidCascadeROIHeads)

__all__ = ["dataloader", "lr_multiplier", "model", "optimizer", "train"]
