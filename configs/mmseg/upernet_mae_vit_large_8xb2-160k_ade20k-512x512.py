# ViT-L/16 UperNet, ADE20K 512x512, 160k iterations. Paper: 53.6 mIoU.
_base_ = "./_base_/ade20k_160k_recipe.py"
model = dict(
    backbone=dict(
        model="vit_large_patch16",
        pretrained="pretrain/mae_pretrain_vit_large.pth",
        out_indices=(7, 11, 15, 23),  # BEiT's choice for 24 blocks
        drop_path_rate=0.2,  # deeper model, more stochastic depth (BEiT-L: 0.2)
        use_checkpoint=True,  # 1024-d x 24 blocks at 512: activation checkpointing saves memory
    ),
    decode_head=dict(in_channels=[1024] * 4, channels=1024),
    auxiliary_head=dict(in_channels=1024),
)
optim_wrapper = dict(paramwise_cfg=dict(layer_decay_rate=0.9))  # BEiT-L: 0.9 for 24 blocks
