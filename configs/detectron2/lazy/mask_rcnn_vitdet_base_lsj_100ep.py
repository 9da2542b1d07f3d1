# LazyConfig version of ../mask_rcnn_vitdet_base_lsj_100ep.yaml: ViTDet's simple feature pyramid
# (every level from the last block, no FPN) on the MAE ViT-B, everything else as
# ./mask_rcnn_vit_base_fpn_lsj_100ep.py (LSJ, AdamW with layer decay 0.7, 2-conv RPN, LN heads).
# ViTDet's ViT-B: APbox 51.6 / APmask 45.9. Run as that file says.
from detectron2.config import LazyCall as L

from mae_transfer.detection import MAEViTSimpleFPN

from .mask_rcnn_vit_base_fpn_lsj_100ep import dataloader, lr_multiplier, model, optimizer, train

model.backbone = L(MAEViTSimpleFPN)(
    model="vit_base_patch16",
    img_size=1024,
    # the position table held as ViTDet's (MAE's 224 pretraining: 14 x 14 + a class row) and
    # interpolated at every forward: a ViTDet model_final.pkl loads whole as
    # train.init_checkpoint through detectron2's own checkpointer
    pos_embed_img_size=224,
    window_size=14,  # global attention in blocks 2, 5, 8, 11 (ViTDet's), the others windowed
    rel_pos="decomposed",
    drop_path_rate=0.1,
    norm="LN",  # between the x4 level's two deconvolutions
    conv_norm="LN",  # of each level's 1x1 and 3x3 convs
    out_channels=256,
    square_pad=1024,  # test images padded to the LSJ crop size (ViTDet), not stretched
    pretrained=None,  # or "mae_pretrain_vit_base.pth"
)

__all__ = ["dataloader", "lr_multiplier", "model", "optimizer", "train"]
