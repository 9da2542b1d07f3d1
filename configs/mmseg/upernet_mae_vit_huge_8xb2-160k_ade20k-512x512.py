# ViT-H/14 (used as /16: kernel resized at load) UperNet, ADE20K 512x512, 160k iterations.
_base_ = "./_base_/ade20k_160k_recipe.py"
model = dict(
    backbone=dict(
        model="vit_huge_patch14",
        patch_size=16,  # the pyramid needs strides 4..32 by powers of two
        pretrained="pretrain/mae_pretrain_vit_huge.pth",
        out_indices=(7, 15, 23, 31),  # 32 blocks in 4 equal stages
        drop_path_rate=0.3,
        use_checkpoint=True,
    ),
    decode_head=dict(in_channels=[1280] * 4, channels=1024),
    auxiliary_head=dict(in_channels=1280),
)
optim_wrapper = dict(paramwise_cfg=dict(layer_decay_rate=0.9))  # same decay as L, 8 more blocks
