# ViT-H/14 (used as /16: kernel resized at load) UperNet, ADE20K 512x512, 160k iterations.
_base_ = "./_base_/ade20k_160k_recipe.py"
model = dict(
    backbone=dict(
        model="vit_huge_patch14",
        patch_size=16,  # the pyramid needs strides 4..32 by powers of two
        pretrained="mae_pretrain_vit_huge.pth",
        out_indices=(7, 15, 23, 31),  # 32 blocks in 4 equal stages
        drop_path_rate=0.3,  # unanchored: B 0.1, L 0.2, one more step for H (ViTDet-H: 0.5)
        use_checkpoint=True,
    ),
    decode_head=dict(in_channels=[1280] * 4, channels=1024),
    auxiliary_head=dict(in_channels=1280),
)
# Layer decay: not given by the paper for H. Derived as for L, keeping the patch embedding's lr
# multiplier decay^(depth + 1) near B's: 0.65^13 = 0.0037, 0.85^33 = 0.0047. Sweep on GPUs.
optim_wrapper = dict(paramwise_cfg=dict(layer_decay_rate=0.85))
