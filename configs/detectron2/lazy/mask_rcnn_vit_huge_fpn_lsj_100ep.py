# LazyConfig version of ../mask_rcnn_vit_huge_fpn_lsj_100ep.yaml: the ViT-B LazyConfig
# (./mask_rcnn_vit_base_fpn_lsj_100ep.py) with ViT-H/14 run as patch 16 (32 blocks, 4 equal
# stages) and ViTDet's H settings (ViTDet's H numbers are from 75 epochs:
# ./mask_rcnn_vitdet_huge_lsj_75ep.py has that schedule).
from .mask_rcnn_vit_base_fpn_lsj_100ep import dataloader, lr_multiplier, model, optimizer, train

model.backbone.bottom_up.update(
    model="vit_huge_patch14",
    patch_size=16,  # the FPN needs power-of-two strides: the 14 x 14 kernel is resized
    out_indices=(7, 15, 23, 31),  # 32 blocks in 4 equal stages; the global blocks too
    drop_path_rate=0.5,  # ViTDet: 0.1 / 0.4 / 0.5 for B / L / H
    use_checkpoint=True,
)
optimizer.params.layer_decay = 0.9  # ViTDet: 0.7 / 0.8 / 0.9 for B / L / H

__all__ = ["dataloader", "lr_multiplier", "model", "optimizer", "train"]
