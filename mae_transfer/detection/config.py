"""detectron2 config keys for the MAE ViT backbone, the recipe's solver and data options."""

from __future__ import annotations

import functools
import logging
from typing import List, Optional

import torch
from detectron2.config import CfgNode as CN

from mae_transfer.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from mae_transfer.device import resolve_amp
from mae_transfer.engine.config import ConfigError
from mae_transfer.pyramid import NORMS
from mae_transfer.registry import resolve_name
from mae_transfer.vit import REL_POS_TYPES

from .fed_loss import SIGMOID_ROI_HEADS

logger = logging.getLogger(__name__)


# the registered backbones (MODEL.BACKBONE.NAME): the paper's 4-stage pyramid + detectron2's FPN,
# that pyramid alone, and ViTDet's simple feature pyramid (every level from the last block)
FPN_BACKBONE = "build_mae_vit_fpn_backbone"
PYRAMID_BACKBONE = "build_mae_vit_backbone"
SIMPLE_FPN_BACKBONE = "build_mae_vit_simple_fpn_backbone"
# what the simple pyramid puts out, for the heads (P6 by LastLevelMaxPool)
SIMPLE_FPN_OUTPUTS = ["p2", "p3", "p4", "p5", "p6"]

AMP_PRECISIONS = ("auto", "float16", "bfloat16")
# what MAE pretraining normalises with, on detectron2's 0..255 pixels
IMAGENET_PIXEL_MEAN = tuple(round(255 * m, 3) for m in IMAGENET_MEAN)  # 123.675, 116.28, 103.53
IMAGENET_PIXEL_STD = tuple(round(255 * s, 3) for s in IMAGENET_STD)  # 58.395, 57.12, 57.375
_AMP_MODES = {"auto": "auto", "float16": "fp16", "bfloat16": "bf16"}  # pretraining's --amp names


def amp_dtype(cfg: CN) -> Optional[torch.dtype]:
    """The run's autocast dtype, None for fp32: fp32 unless ``SOLVER.AMP.ENABLED``; then
    ``SOLVER.AMP.PRECISION`` on ``MODEL.DEVICE``, whose ``auto`` is pretraining's
    (:func:`mae_transfer.device.resolve_amp`): bf16 where the GPU / CPU has native bf16, else
    fp32. float16 (with loss scaling) only when asked for."""
    if not cfg.SOLVER.AMP.ENABLED:
        return None
    mode = _AMP_MODES[cfg.SOLVER.AMP.PRECISION]
    return resolve_amp(mode, torch.device(cfg.MODEL.DEVICE))[0]


def add_mae_vit_config(cfg: CN) -> CN:
    """Adds ``MODEL.VIT.*``, ``SOLVER.{OPTIMIZER,LAYER_DECAY,BETAS}``, ``INPUT.LSJ.*``,
    ``DATASETS.{COCO,LVIS}`` and the box classifier's LVIS losses
    (``MODEL.ROI_BOX_HEAD.{USE_SIGMOID_CE,USE_FED_LOSS,FED_LOSS_*}``) to a detectron2 config
    (defaults: ViT-B, the ViTDet recipe)."""
    cfg.MODEL.VIT = CN()
    cfg.MODEL.VIT.NAME = "vit_base_patch16"  # registered encoder, see mae_transfer.list_models
    cfg.MODEL.VIT.IMG_SIZE = 1024  # size the position table is built for (any input works)
    # > 0: the position table is held at this image size's grid with a class row, ViTDet's
    # shape (224: the pretraining's 14 x 14 + 1), and interpolated at every forward; 0: IMG_SIZE
    cfg.MODEL.VIT.POS_EMBED_IMG_SIZE = 0
    cfg.MODEL.VIT.PATCH_SIZE = 0  # 0: the model's own (patch 14 is used as 16)
    # 4-stage pyramid's stage ends; [] = equal split: B 2,5,8,11; L 5,11,17,23; H 7,15,23,31
    # (the simple pyramid reads the last block only: [] there)
    cfg.MODEL.VIT.OUT_INDICES = []
    cfg.MODEL.VIT.WINDOW_SIZE = 14  # 0 = global attention in every block
    # [] = the stage ends (OUT_INDICES, or the equal split's with the simple pyramid), as
    # ViTDet; ["none"] = every block windowed
    cfg.MODEL.VIT.GLOBAL_BLOCKS = []
    # blocks followed by ViTDet's convolutional propagation (a residual bottleneck of 1x1, 3x3,
    # 1x1 convs; its ablation, e.g. [2, 5, 8, 11] with every block windowed); [] = none
    cfg.MODEL.VIT.RESIDUAL_BLOCKS = []
    cfg.MODEL.VIT.REL_POS = "decomposed"  # "", "decomposed" or "bias"; zero-initialised
    cfg.MODEL.VIT.DROP_PATH_RATE = 0.1
    cfg.MODEL.VIT.LAYER_SCALE = 0.0  # init value of layer scale; 0 = off
    cfg.MODEL.VIT.USE_CHECKPOINT = False  # activation checkpointing, trades compute for memory
    cfg.MODEL.VIT.NORM = "LN"  # norm in the x4 upsampling path (both pyramids): BN, SyncBN, LN, GN
    cfg.MODEL.VIT.PRETRAINED = ""  # alternative to MODEL.WEIGHTS, loaded when the model is built
    # pad inputs to a square of this size (never crop): test images then see the position table
    # as in training (LSJ crops) instead of a stretched one; -1 = INPUT.LSJ.IMAGE_SIZE with LSJ
    cfg.MODEL.VIT.SQUARE_PAD = -1
    cfg.MODEL.VIT.SIZE_OVERRIDES = []  # [[key, value], ...] e.g. [["embed_dim", 64]] (tiny models)

    cfg.SOLVER.OPTIMIZER = "ADAMW"  # or "SGD"
    cfg.SOLVER.BETAS = (0.9, 0.999)
    cfg.SOLVER.LAYER_DECAY = 0.7  # layer-wise lr decay: 0.7 / 0.8 / 0.9 for B / L / H

    # AMP precision when SOLVER.AMP.ENABLED (detectron2 0.6 knows fp16 only): auto = bf16 where
    # the device has native bf16 (GPUs from compute capability 8.0, CPUs with AMX/AVX512-BF16:
    # no loss scaling, no fp16 overflow at ViT-L/H scale), else fp32; float16 = fp16 + grad scaler
    if "PRECISION" not in cfg.SOLVER.AMP:
        cfg.SOLVER.AMP.PRECISION = "auto"

    cfg.INPUT.LSJ = CN()
    cfg.INPUT.LSJ.ENABLED = False  # large-scale jitter: ResizeScale + FixedSizeCrop
    cfg.INPUT.LSJ.IMAGE_SIZE = 1024
    cfg.INPUT.LSJ.MIN_SCALE = 0.1
    cfg.INPUT.LSJ.MAX_SCALE = 2.0

    # COCO-format datasets to register: [[name, json_file, image_root], ...]
    cfg.DATASETS.COCO = []
    # LVIS-format ones, evaluated by LVIS's rules (image_root: the folder of COCO's train2017/
    # and val2017/, which LVIS v1's images name): [[name, json_file, image_root], ...]
    cfg.DATASETS.LVIS = []

    # the box classifier on LVIS (ViTDet): sigmoid cross-entropy, federated loss over the
    # classes in the batch + negatives drawn by image count ^ POWER, NUM_CLASSES in all. Read by
    # the ROI heads SigmoidROIHeads / SigmoidCascadeROIHeads (detection/fed_loss.py); the names
    # are those of detectron2's later releases (which may define them already)
    head = cfg.MODEL.ROI_BOX_HEAD
    for key, value in (
        ("USE_SIGMOID_CE", False),
        ("USE_FED_LOSS", False),
        ("FED_LOSS_FREQ_WEIGHT_POWER", 0.5),
        ("FED_LOSS_NUM_CLASSES", 50),
    ):
        if key not in head:
            head[key] = value
    return cfg


def validate_config(cfg: CN) -> None:
    """Rejects bad MODEL / SOLVER / INPUT / DATASETS values before anything is built (a
    :class:`ConfigError`, a ValueError), naming every one."""
    errors = _vit_errors(cfg) + model_input_errors(cfg) + _solver_errors(cfg) + _data_errors(cfg)
    errors += _tta_errors(cfg)
    errors += _box_loss_errors(cfg)
    if errors:
        raise ConfigError("invalid detectron2 config:\n  - " + "\n  - ".join(errors))


def model_input_errors(cfg: CN) -> List[str]:
    """What the ViT backbone cannot work with among detectron2's own keys, whose defaults are
    for its caffe-style ResNets: BGR input, pixels not divided by a std (values ~58x of what
    MAE was pretrained on, in the wrong channel order: it trains, badly, without a word); a
    C4 model's features and heads on the FPN (a bare AssertionError or KeyError in build_model)."""
    errors = []
    if cfg.INPUT.FORMAT != "RGB":
        errors.append(
            f"INPUT.FORMAT must be 'RGB' for the MAE ViT (pretrained on RGB), got "
            f"{cfg.INPUT.FORMAT!r}"
        )
    mean, std = tuple(cfg.MODEL.PIXEL_MEAN), tuple(cfg.MODEL.PIXEL_STD)
    if max(std) <= 1.0:  # not divided by a std: detectron2's default for caffe ResNets
        errors.append(
            f"MODEL.PIXEL_STD {list(std)} leaves the pixels unnormalised (0..255): the MAE ViT "
            f"was pretrained on pixels normalised by ImageNet's statistics (x255, RGB): set "
            f"PIXEL_MEAN {list(IMAGENET_PIXEL_MEAN)} and PIXEL_STD {list(IMAGENET_PIXEL_STD)} "
            "(as configs/detectron2/Base-MaskRCNN-MAE-ViT-FPN.yaml)"
        )
    elif any(
        abs(a - b) > 1.0 for a, b in zip(mean + std, IMAGENET_PIXEL_MEAN + IMAGENET_PIXEL_STD)
    ):
        _note_statistics(mean, std)  # a ViT pretrained on other statistics may want them
    if cfg.MODEL.BACKBONE.NAME == FPN_BACKBONE:
        errors += _fpn_errors(cfg)
    elif cfg.MODEL.BACKBONE.NAME == SIMPLE_FPN_BACKBONE:
        errors += _simple_fpn_errors(cfg)
    return errors + _cascade_errors(cfg)


# the heads that read the backbone's maps, by detectron2 meta-architecture
_HEADS = {
    "GeneralizedRCNN": ("RPN", "ROI_HEADS"),
    "ProposalNetwork": ("RPN",),
    "RetinaNet": ("RETINANET",),
}


def _heads(cfg: CN) -> List[str]:
    """The config sections of the heads this model builds (an RPN only as its proposer)."""
    heads = _HEADS.get(cfg.MODEL.META_ARCHITECTURE, ())
    return [h for h in heads if h != "RPN" or cfg.MODEL.PROPOSAL_GENERATOR.NAME == "RPN"]


@functools.cache
def _note_statistics(mean: tuple, std: tuple) -> None:
    logger.warning(
        "MODEL.PIXEL_MEAN %s / PIXEL_STD %s are not ImageNet's (x255, RGB: %s / %s), on which "
        "MAE pretraining normalises its images: right only for a ViT pretrained on these",
        list(mean),
        list(std),
        list(IMAGENET_PIXEL_MEAN),
        list(IMAGENET_PIXEL_STD),
    )


def _fpn_errors(cfg: CN) -> List[str]:
    """The FPN's inputs, and heads that read its outputs (P2-P6: detectron2's defaults are a
    ResNet-C4 model's, reading 'res4' through Res5ROIHeads: a KeyError naming no key)."""
    pyramid = ["res2", "res3", "res4", "res5"]
    inputs = list(cfg.MODEL.FPN.IN_FEATURES)
    errors = []
    runs = [pyramid[i:j] for i in range(4) for j in range(i + 1, 5)]
    if inputs not in runs:  # detectron2's FPN asserts strides that double, level by level
        errors.append(
            f"MODEL.FPN.IN_FEATURES {inputs}: the FPN reads the ViT pyramid's maps, {pyramid} "
            "(all four, as the Base config, or a run of them in order)"
        )
    else:
        levels = [int(f[3:]) for f in inputs]
        outputs = [f"p{i}" for i in levels + [levels[-1] + 1]]  # + P6 by LastLevelMaxPool
        errors += _head_errors(cfg, outputs, "the FPN's outputs")
    return errors + _c4_head_errors(cfg, "the FPN")


def _simple_fpn_errors(cfg: CN) -> List[str]:
    """ViTDet's simple pyramid: P2-P6 from the last block. It has no FPN (MODEL.FPN.IN_FEATURES
    and FUSE_TYPE are not read); its 1x1 / 3x3 convs take MODEL.FPN.OUT_CHANNELS and NORM, as
    the FPN's lateral and output convs do; stage ends (MODEL.VIT.OUT_INDICES) mean nothing."""
    errors = []
    indices = list(cfg.MODEL.VIT.OUT_INDICES)
    if indices:
        errors.append(
            f"MODEL.VIT.OUT_INDICES {indices} are stage ends of the 4-stage pyramid; "
            f"{SIMPLE_FPN_BACKBONE} builds every level from the last block: set it to [] "
            "(MODEL.VIT.GLOBAL_BLOCKS names the global-attention blocks; [] = the equal "
            "split's stage ends, as ViTDet)"
        )
    if cfg.MODEL.FPN.OUT_CHANNELS <= 0:
        errors.append(
            f"MODEL.FPN.OUT_CHANNELS (the simple pyramid's output channels) must be > 0, got "
            f"{cfg.MODEL.FPN.OUT_CHANNELS}"
        )
    if cfg.MODEL.FPN.NORM not in NORMS:
        errors.append(
            f"MODEL.FPN.NORM (the norm of the simple pyramid's convs) must be one of {NORMS}, "
            f"got {cfg.MODEL.FPN.NORM!r}"
        )
    errors += _head_errors(cfg, SIMPLE_FPN_OUTPUTS, "the simple pyramid's outputs")
    return errors + _c4_head_errors(cfg, "the simple pyramid")


def _head_errors(cfg: CN, outputs: List[str], what: str) -> List[str]:
    """Heads reading maps the backbone does not make (a KeyError naming no key)."""
    errors = []
    for head in _heads(cfg):
        if not set(cfg.MODEL[head].IN_FEATURES) <= set(outputs):
            errors.append(
                f"MODEL.{head}.IN_FEATURES {list(cfg.MODEL[head].IN_FEATURES)} must be among "
                f"{what} {outputs}"
            )
    return errors


def _cascade_errors(cfg: CN) -> List[str]:
    """What detectron2's CascadeROIHeads asserts when the model is built (an AssertionError
    naming no key), named with the key."""
    cascades = ("CascadeROIHeads", "SigmoidCascadeROIHeads")
    if "ROI_HEADS" not in _heads(cfg) or cfg.MODEL.ROI_HEADS.NAME not in cascades:
        return []
    cascade, errors = cfg.MODEL.ROI_BOX_CASCADE_HEAD, []
    if not cfg.MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG:
        errors.append(
            "CascadeROIHeads regresses one box per proposal: set "
            "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG True"
        )
    if len(cascade.BBOX_REG_WEIGHTS) != len(cascade.IOUS):
        errors.append(
            f"MODEL.ROI_BOX_CASCADE_HEAD: {len(cascade.IOUS)} IOUS but "
            f"{len(cascade.BBOX_REG_WEIGHTS)} BBOX_REG_WEIGHTS (one of each per stage)"
        )
    first = cfg.MODEL.ROI_HEADS.IOU_THRESHOLDS[0]
    if cascade.IOUS and cascade.IOUS[0] != first:
        errors.append(
            f"MODEL.ROI_BOX_CASCADE_HEAD.IOUS starts at {cascade.IOUS[0]}: the first stage "
            f"matches at MODEL.ROI_HEADS.IOU_THRESHOLDS' {first} (make them equal)"
        )
    return errors


def _tta_errors(cfg: CN) -> List[str]:
    """``TEST.AUG`` values detectron2's TTA cannot run (an assertion or an error in the first
    test image, after the whole training), named; nothing when ``TEST.AUG.ENABLED`` is off."""
    aug = cfg.TEST.AUG
    if not aug.ENABLED:
        return []
    errors = []
    sizes = list(aug.MIN_SIZES)
    if not sizes or not all(
        isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes
    ):
        errors.append(
            f"TEST.AUG.MIN_SIZES must be one or more short sides in pixels (ints > 0), got {sizes}"
        )
    if not (isinstance(aug.MAX_SIZE, int) and aug.MAX_SIZE > 0):
        errors.append(f"TEST.AUG.MAX_SIZE (the long side's limit) must be > 0, got {aug.MAX_SIZE}")
    if cfg.MODEL.META_ARCHITECTURE != "GeneralizedRCNN":
        errors.append(
            f"TEST.AUG.ENABLED: detectron2's test-time augmentation runs R-CNN detectors "
            f"(GeneralizedRCNN) only, MODEL.META_ARCHITECTURE is {cfg.MODEL.META_ARCHITECTURE!r}"
        )
    if cfg.MODEL.KEYPOINT_ON or cfg.MODEL.LOAD_PROPOSALS:
        errors.append(
            "TEST.AUG.ENABLED: detectron2's test-time augmentation supports neither "
            "MODEL.KEYPOINT_ON nor MODEL.LOAD_PROPOSALS: turn them off, or TEST.AUG.ENABLED"
        )
    return errors


def _c4_head_errors(cfg: CN, backbone: str) -> List[str]:
    if "ROI_HEADS" in _heads(cfg) and cfg.MODEL.ROI_HEADS.NAME == "Res5ROIHeads":
        return [
            "MODEL.ROI_HEADS.NAME 'Res5ROIHeads' is for ResNet-C4 models (it runs a ResNet res5 "
            f"stage): use 'StandardROIHeads' on {backbone}"
        ]
    return []


def _vit_errors(cfg: CN) -> List[str]:
    errors: List[str] = []
    v = cfg.MODEL.VIT
    try:
        resolve_name(v.NAME)
    except KeyError as e:
        errors.append(f"MODEL.VIT.NAME: {e}")
    if v.NAME.startswith("mae_"):  # registered, but the pretraining model has no windows
        errors.append(
            f"MODEL.VIT.NAME {v.NAME!r} is the pretraining model (encoder and decoder): name its "
            f"encoder, {v.NAME[len('mae_') :]!r} (an mae_* checkpoint loads into it)"
        )
    for entry in v.SIZE_OVERRIDES:
        if not (len(entry) == 2 and isinstance(entry[0], str) and not isinstance(entry[1], str)):
            errors.append(
                "MODEL.VIT.SIZE_OVERRIDES entries are [key, number], numbers unquoted "
                f"(e.g. [['embed_dim', 64]]), got {list(entry)}"
            )
    if cfg.MODEL.BACKBONE.FREEZE_AT:  # read by detectron2's ResNets only
        errors.append(
            f"MODEL.BACKBONE.FREEZE_AT {cfg.MODEL.BACKBONE.FREEZE_AT} is not read by the ViT "
            "backbone (it trains every block, as ViTDet; a lower SOLVER.LAYER_DECAY slows "
            "the early blocks): set it to 0"
        )
    if v.NORM not in NORMS:
        errors.append(f"MODEL.VIT.NORM must be one of {NORMS}, got {v.NORM!r}")
    if (v.REL_POS or None) not in REL_POS_TYPES:
        errors.append(f"MODEL.VIT.REL_POS must be '', 'decomposed' or 'bias', got {v.REL_POS!r}")
    if v.SQUARE_PAD < -1 or (v.SQUARE_PAD > 0 and v.SQUARE_PAD % 32):
        errors.append(f"MODEL.VIT.SQUARE_PAD must be -1, 0 or a multiple of 32, got {v.SQUARE_PAD}")
    if v.WINDOW_SIZE < 0:
        errors.append(f"MODEL.VIT.WINDOW_SIZE must be >= 0, got {v.WINDOW_SIZE}")
    if v.POS_EMBED_IMG_SIZE < 0:
        errors.append(
            f"MODEL.VIT.POS_EMBED_IMG_SIZE must be >= 0 (0: IMG_SIZE), got {v.POS_EMBED_IMG_SIZE}"
        )
    four_stages = cfg.MODEL.BACKBONE.NAME != SIMPLE_FPN_BACKBONE  # (else: _simple_fpn_errors)
    if (
        four_stages
        and v.OUT_INDICES
        and (len(v.OUT_INDICES) != 4 or list(v.OUT_INDICES) != sorted(set(v.OUT_INDICES)))
    ):
        errors.append(f"MODEL.VIT.OUT_INDICES must be 4 increasing indices, got {v.OUT_INDICES}")
    blocks = list(v.GLOBAL_BLOCKS)
    if blocks != ["none"] and not all(isinstance(i, int) for i in blocks):
        errors.append(f'MODEL.VIT.GLOBAL_BLOCKS must be block indices or ["none"], got {blocks}')
    residual = list(v.RESIDUAL_BLOCKS)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in residual):
        errors.append(f"MODEL.VIT.RESIDUAL_BLOCKS must be block indices, got {residual}")
    if not 0.0 <= v.DROP_PATH_RATE < 1.0:
        errors.append(f"MODEL.VIT.DROP_PATH_RATE must be in [0, 1), got {v.DROP_PATH_RATE}")
    return errors


def _solver_errors(cfg: CN) -> List[str]:
    errors: List[str] = []
    if not 0.0 < cfg.SOLVER.LAYER_DECAY <= 1.0:
        errors.append(f"SOLVER.LAYER_DECAY must be in (0, 1], got {cfg.SOLVER.LAYER_DECAY}")
    if cfg.SOLVER.OPTIMIZER.upper() not in ("ADAMW", "SGD"):
        errors.append(f"SOLVER.OPTIMIZER must be ADAMW or SGD, got {cfg.SOLVER.OPTIMIZER!r}")
    if cfg.SOLVER.AMP.PRECISION not in AMP_PRECISIONS:
        precision = cfg.SOLVER.AMP.PRECISION
        errors.append(f"SOLVER.AMP.PRECISION must be one of {AMP_PRECISIONS}, got {precision!r}")
    if cfg.SOLVER.BASE_LR <= 0:
        errors.append(f"SOLVER.BASE_LR must be > 0, got {cfg.SOLVER.BASE_LR}")
    if cfg.SOLVER.WEIGHT_DECAY < 0:
        errors.append(f"SOLVER.WEIGHT_DECAY must be >= 0, got {cfg.SOLVER.WEIGHT_DECAY}")
    for key in ("MAX_ITER", "IMS_PER_BATCH", "CHECKPOINT_PERIOD"):
        if cfg.SOLVER[key] <= 0:
            errors.append(f"SOLVER.{key} must be > 0, got {cfg.SOLVER[key]}")
    if any(s >= cfg.SOLVER.MAX_ITER for s in cfg.SOLVER.STEPS):
        errors.append(
            f"SOLVER.STEPS {tuple(cfg.SOLVER.STEPS)} must be < MAX_ITER {cfg.SOLVER.MAX_ITER}"
        )
    return errors


def _data_errors(cfg: CN) -> List[str]:
    errors: List[str] = []
    if cfg.DATALOADER.NUM_WORKERS < 0:
        errors.append(f"DATALOADER.NUM_WORKERS must be >= 0, got {cfg.DATALOADER.NUM_WORKERS}")
    lsj = cfg.INPUT.LSJ
    if lsj.ENABLED and not 0 < lsj.MIN_SCALE <= lsj.MAX_SCALE:
        errors.append(
            f"INPUT.LSJ scales must satisfy 0 < MIN <= MAX, got {lsj.MIN_SCALE}, {lsj.MAX_SCALE}"
        )
    if (
        lsj.ENABLED
        and cfg.MODEL.VIT.SQUARE_PAD == -1
        and (lsj.IMAGE_SIZE <= 0 or lsj.IMAGE_SIZE % 32)
    ):
        errors.append(  # the square every image is padded to: stride-32 maps must divide it
            "INPUT.LSJ.IMAGE_SIZE must be a positive multiple of 32 (with MODEL.VIT.SQUARE_PAD "
            f"-1 images are padded square to it), got {lsj.IMAGE_SIZE}"
        )
    for kind in ("COCO", "LVIS"):
        for entry in cfg.DATASETS[kind]:
            if len(entry) != 3:
                errors.append(
                    f"DATASETS.{kind} entries are [name, json_file, image_root], got {entry}"
                )
    sampler = cfg.DATALOADER.SAMPLER_TRAIN
    if sampler not in TRAIN_SAMPLERS:
        errors.append(f"DATALOADER.SAMPLER_TRAIN must be one of {TRAIN_SAMPLERS}, got {sampler!r}")
    threshold = cfg.DATALOADER.REPEAT_THRESHOLD
    if sampler == "RepeatFactorTrainingSampler" and not 0.0 < threshold <= 1.0:
        errors.append(  # a negative one was a NaN repeat factor; 0 repeats nothing
            "DATALOADER.REPEAT_THRESHOLD (RepeatFactorTrainingSampler: images with a class in "
            f"fewer than this fraction of images are repeated) must be in (0, 1], got {threshold}"
        )
    return errors


TRAIN_SAMPLERS = ("TrainingSampler", "RepeatFactorTrainingSampler", "RandomSubsetTrainingSampler")


def _box_loss_errors(cfg: CN) -> List[str]:
    """MODEL.ROI_BOX_HEAD's sigmoid CE / fed loss keys (detectron2 0.6's heads ignore them)."""
    head, errors = cfg.MODEL.ROI_BOX_HEAD, []
    if not (head.USE_SIGMOID_CE or head.USE_FED_LOSS):
        return errors
    if head.USE_FED_LOSS and not head.USE_SIGMOID_CE:
        errors.append(
            "MODEL.ROI_BOX_HEAD.USE_FED_LOSS scores each class by its own sigmoid; with the "
            "softmax cross-entropy (USE_SIGMOID_CE False) it cannot: set USE_SIGMOID_CE True"
        )
    name = cfg.MODEL.ROI_HEADS.NAME
    if name not in SIGMOID_ROI_HEADS:
        ours = "SigmoidCascadeROIHeads" if "Cascade" in name else "SigmoidROIHeads"
        errors.append(
            f"MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE / USE_FED_LOSS are implemented by our "
            f"SigmoidROIHeads / SigmoidCascadeROIHeads (the same on every detectron2; 0.6's "
            f"box predictor is softmax only), not by MODEL.ROI_HEADS.NAME {name!r}: set "
            f"MODEL.ROI_HEADS.NAME {ours!r}"
        )
    if head.USE_FED_LOSS and head.FED_LOSS_NUM_CLASSES < 1:
        errors.append(
            "MODEL.ROI_BOX_HEAD.FED_LOSS_NUM_CLASSES (classes scored per batch) must be >= 1, "
            f"got {head.FED_LOSS_NUM_CLASSES}"
        )
    if head.USE_FED_LOSS and head.FED_LOSS_FREQ_WEIGHT_POWER < 0:
        errors.append(
            "MODEL.ROI_BOX_HEAD.FED_LOSS_FREQ_WEIGHT_POWER must be >= 0 (0: negatives drawn "
            f"uniformly; ViTDet 0.5), got {head.FED_LOSS_FREQ_WEIGHT_POWER}"
        )
    return errors
