# ViT-L/16 UperNet, ADE20K 512x512, 160k iterations. Paper: 53.6 mIoU.
_base_ = "./_base_/ade20k_160k_recipe.py"
model = dict(
    backbone=dict(
        model="vit_large_patch16",
        pretrained="mae_pretrain_vit_large.pth",
        out_indices=(7, 11, 15, 23),  # BEiT's choice for 24 blocks
        drop_path_rate=0.2,  # deeper model, more stochastic depth (mmseg's BEiT-L config: 0.2)
        use_checkpoint=True,  # 1024-d x 24 blocks at 512: activation checkpointing saves memory
    ),
    decode_head=dict(in_channels=[1024] * 4, channels=1024),
    auxiliary_head=dict(in_channels=1024),
)
# Layer decay: not given by the paper for L. Derived from B's 0.65 by keeping the patch
# embedding's lr multiplier (decay^(depth + 1)) the same: 0.65^13 = 0.0037 ~= 0.8^25 = 0.0038.
# (mmseg's BEiT-L config uses 0.95 with lr 2e-5, a different lr/decay pair.) Sweep on GPUs.
optim_wrapper = dict(paramwise_cfg=dict(layer_decay_rate=0.8))
