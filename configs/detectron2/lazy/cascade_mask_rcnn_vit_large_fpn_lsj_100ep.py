# LazyConfig version of ../cascade_mask_rcnn_vit_large_fpn_lsj_100ep.yaml: the ViT-L Mask R-CNN
# LazyConfig (./mask_rcnn_vit_large_fpn_lsj_100ep.py: backbone, optimizer, schedule) with the
# cascade heads of ./cascade_mask_rcnn_vit_base_fpn_lsj_100ep.py (they read the FPN's 256
# channels, whatever the ViT). ViTDet's ViT-L cascade: APbox 57.6 / APmask 50.0 (100 epochs).
from .cascade_mask_rcnn_vit_base_fpn_lsj_100ep import model as _cascade
from .mask_rcnn_vit_large_fpn_lsj_100ep import dataloader, lr_multiplier, model, optimizer, train

model.roi_heads = _cascade.roi_heads

__all__ = ["dataloader", "lr_multiplier", "model", "optimizer", "train"]
