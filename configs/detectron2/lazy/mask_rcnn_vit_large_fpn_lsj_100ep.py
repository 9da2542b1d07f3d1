# LazyConfig version of ../mask_rcnn_vit_large_fpn_lsj_100ep.yaml: the ViT-B LazyConfig
# (./mask_rcnn_vit_base_fpn_lsj_100ep.py) with ViT-L/16 (24 blocks, 4 equal stages) and
# ViTDet's L settings. Paper (A.3 setup): APbox 53.3.
from .mask_rcnn_vit_base_fpn_lsj_100ep import dataloader, lr_multiplier, model, optimizer, train

model.backbone.bottom_up.update(
    model="vit_large_patch16",
    out_indices=(5, 11, 17, 23),  # 24 blocks in 4 equal stages; the global blocks too
    drop_path_rate=0.4,  # ViTDet: 0.1 / 0.4 / 0.5 for B / L / H
    use_checkpoint=True,  # activation checkpointing: fits 1024 x 1024 at 2 images / GPU
)
optimizer.params.layer_decay = 0.8  # ViTDet: 0.7 / 0.8 / 0.9 for B / L / H

__all__ = ["dataloader", "lr_multiplier", "model", "optimizer", "train"]
