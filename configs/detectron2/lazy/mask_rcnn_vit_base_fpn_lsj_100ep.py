# LazyConfig version of ../mask_rcnn_vit_base_fpn_lsj_100ep.yaml, on detectron2's own LSJ
# Mask R-CNN recipe (new_baselines) with the backbone swapped for the MAE ViT pyramid.
#   python -c "from detectron2.config import LazyConfig; cfg = LazyConfig.load('<this file>')"
# then detectron2's tools/lazyconfig_train_net.py, with `import mae_transfer.detection` first.
import mae_transfer.detection  # noqa: F401  (compat fixes before detectron2 builds anything)

# isort: split
import torch
from detectron2.config import LazyCall as L
from detectron2.data import transforms as T
from detectron2.model_zoo import get_config
from detectron2.modeling.backbone.fpn import LastLevelMaxPool

from mae_transfer.compat.detectron2_compat import HAS_COMPILED_OPS
from mae_transfer.detection import MAEViTBackbone
from mae_transfer.detection.train import layer_decay_groups

_lsj = get_config("new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py")
dataloader, lr_multiplier, train, optimizer = (
    _lsj.dataloader,
    _lsj.lr_multiplier,
    _lsj.train,
    _lsj.optimizer,
)
model = _lsj.model
model.pixel_mean = [123.675, 116.28, 103.53]  # MAE: RGB, ImageNet statistics
model.pixel_std = [58.395, 57.12, 57.375]
model.input_format = "RGB"
dataloader.train.mapper.image_format = "RGB"
dataloader.test.mapper.image_format = "RGB"
# the crop is not padded with grey 128: the model pads with the mean pixel, as at test time
for _aug in dataloader.train.mapper.augmentations:
    if _aug._target_ is T.FixedSizeCrop:
        _aug.pad = False
# tested at the training crop's size, as ViTDet (the R-50 recipe tests at 800 / 1333: images
# wider than the 1024 square the backbone pads to)
dataloader.test.mapper.augmentations = [
    L(T.ResizeShortestEdge)(short_edge_length=1024, max_size=1024)
]
model.backbone.bottom_up = L(MAEViTBackbone)(
    model="vit_base_patch16",
    img_size=1024,
    out_indices=(2, 5, 8, 11),
    window_size=14,
    rel_pos="decomposed",
    drop_path_rate=0.1,
    norm="LN",
    square_pad=1024,  # test images padded to the LSJ crop size (ViTDet), not stretched
    pretrained=None,  # or "mae_pretrain_vit_base.pth"
)
model.backbone.in_features = ["res2", "res3", "res4", "res5"]
model.backbone.norm = "LN"
model.backbone.top_block = L(LastLevelMaxPool)()
model.roi_heads.box_head.conv_norm = model.roi_heads.mask_head.conv_norm = "LN"
model.proposal_generator.head.conv_dims = [-1, -1]  # 2 convs in the RPN head (ViTDet)

# AdamW with layer-wise lr decay (0.7 for ViT-B); lazyconfig_train_net sets params.model.
# The groups carry their own lr (base x decay^depth), taken from optimizer.lr by interpolation:
# `optimizer.lr=2e-4` on the command line sets them all, as in ViTDet's configs.
optimizer = L(torch.optim.AdamW)(
    params=L(layer_decay_groups)(model=None, base_lr="${..lr}", weight_decay=0.1, layer_decay=0.7),
    lr=1e-4,
    betas=(0.9, 0.999),
)
lr_multiplier.warmup_length = 250 / train.max_iter  # ViTDet: 250 warmup iterations
# from lr x 0.001, as ViTDet and ../Base-MaskRCNN-MAE-ViT-FPN.yaml (the R-50 recipe has 0.067)
lr_multiplier.warmup_factor = 0.001
# Precision: detectron2's lazyconfig_train_net runs its fp16 AMPTrainer when train.amp.enabled
# (on here, as in ViTDet); our `auto` rule (bf16 on GPUs of compute capability >= 8.0) applies
# to tools/train_det.py with the YAML configs.
# The MAE encoder goes in model.backbone.bottom_up.pretrained (above; its keys are mapped and
# reported). train.init_checkpoint is for a whole detectron2 model: an MAE file there loads
# nothing (detectron2 lists every key as missing and the backbone stays random), unless
# converted first with tools/convert_to_detectron2.py.
train.init_checkpoint = ""
# COCO evaluation: the fast C++ evaluator where detectron2 was compiled, pycocotools' (the same
# numbers) in the pure-Python build, whose missing op stopped the run at its first evaluation
dataloader.evaluator.use_fast_impl = HAS_COMPILED_OPS
