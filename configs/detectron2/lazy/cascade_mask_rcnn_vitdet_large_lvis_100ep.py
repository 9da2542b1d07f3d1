# LazyConfig version of ../cascade_mask_rcnn_vitdet_large_lvis_100ep.yaml: ViTDet's LVIS ViT-L
# cascade (projects/ViTDet/configs/LVIS/cascade_mask_rcnn_vitdet_l_100ep.py), i.e. the LVIS
# Mask R-CNN ./mask_rcnn_vitdet_large_lvis_100ep.py (backbone, optimizer, schedule, data) with the
# cascade heads of ./cascade_mask_rcnn_vitdet_base_lvis_100ep.py (they read the pyramid's 256
# channels, whatever the ViT).
from .cascade_mask_rcnn_vitdet_base_lvis_100ep import model as _cascade
from .mask_rcnn_vitdet_large_lvis_100ep import dataloader, lr_multiplier, model, optimizer, train

model.roi_heads = _cascade.roi_heads

__all__ = ["dataloader", "lr_multiplier", "model", "optimizer", "train"]
