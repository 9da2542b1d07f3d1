# LazyConfig version of ../mask_rcnn_vitdet_huge_lsj_75ep.yaml: the ViT-B one
# (./mask_rcnn_vitdet_base_lsj_100ep.py) with ViT-H/14 run as patch 16 and ViTDet's H
# schedule, 75 epochs. ViTDet (MAE ViT-H): APbox
# 56.7 / APmask 50.2 (it also decays every parameter's weights, which ours does not).
from .mask_rcnn_vitdet_base_lsj_100ep import dataloader, lr_multiplier, model, optimizer, train

model.backbone.update(
    model="vit_huge_patch14",  # global attention in blocks 7, 15, 23, 31 (32 / 4)
    patch_size=16,  # as ViTDet (its p14to16 file): the 14 x 14 kernel is resized
    drop_path_rate=0.5,  # ViTDet: 0.1 / 0.4 / 0.5 for B / L / H
    use_checkpoint=True,
)
optimizer.params.layer_decay = 0.9  # ViTDet: 0.7 / 0.8 / 0.9 for B / L / H
# 75 epochs = the 100-epoch schedule x 3/4 (ViTDet's H): iterations and steps scaled, the
# warmup kept at 250 / 184375 of training, as the B config's fraction is
train.max_iter = 184375 * 3 // 4  # 138281
lr_multiplier.scheduler.milestones = [163889 * 3 // 4, 177546 * 3 // 4]  # 122916, 133159
lr_multiplier.scheduler.num_updates = train.max_iter
lr_multiplier.warmup_length = 250 / 184375

__all__ = ["dataloader", "lr_multiplier", "model", "optimizer", "train"]
