# LazyConfig version of ../mask_rcnn_vitdet_large_lsj_100ep.yaml: the ViT-B one
# (./mask_rcnn_vitdet_base_lsj_100ep.py) with ViT-L/16. ViTDet (MAE ViT-L): APbox 55.5 /
# APmask 49.2.
from .mask_rcnn_vitdet_base_lsj_100ep import dataloader, lr_multiplier, model, optimizer, train

model.backbone.update(
    model="vit_large_patch16",  # global attention in blocks 5, 11, 17, 23 (24 / 4)
    drop_path_rate=0.4,  # ViTDet: 0.1 / 0.4 / 0.5 for B / L / H
    use_checkpoint=True,  # activation checkpointing: fits 1024 x 1024 at 2 images / GPU
)
optimizer.params.layer_decay = 0.8  # ViTDet: 0.7 / 0.8 / 0.9 for B / L / H

__all__ = ["dataloader", "lr_multiplier", "model", "optimizer", "train"]
