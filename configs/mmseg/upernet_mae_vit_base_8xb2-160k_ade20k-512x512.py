# ViT-B/16 UperNet, ADE20K 512x512, 160k iterations. Paper: 48.1 mIoU (mmseg reproduces 48.13).
_base_ = "./_base_/ade20k_160k_recipe.py"
model = dict(backbone=dict(pretrained="mae_pretrain_vit_base.pth"))
