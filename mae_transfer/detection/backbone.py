"""``MAEViTBackbone``: the 4-stage ViT pyramid behind detectron2's backbone contract."""

from __future__ import annotations

import inspect
import logging
import sys
from typing import Dict, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, FPN, Backbone
from detectron2.modeling.backbone.fpn import LastLevelMaxPool

from mae_transfer.engine.config import ConfigError
from mae_transfer.pyramid import STRIDES, ViTPyramid, build_pyramid_vit

from .config import SIMPLE_FPN_BACKBONE, model_input_errors

logger = logging.getLogger(__name__)

OUT_FEATURES = ("res2", "res3", "res4", "res5")  # strides 4, 8, 16, 32: FPN's usual inputs


class SquarePadBackbone(Backbone):
    """What both pyramids share as detectron2 backbones: batches padded to a multiple of 32 and,
    with ``square_pad``, to that square (ViTDet). ``output_shape`` is detectron2's default,
    from ``_out_features``, ``_out_feature_strides`` and ``_out_feature_channels``."""

    square_pad: int = 0  # set by the subclass (checked by check_square_pad)

    @property
    def size_divisibility(self) -> int:
        # 32, the coarsest stride either pyramid computes: the FPN's top-down sums need
        # stride-32 maps that tile the input; ViTDet's simple pyramid asks the same (its p6
        # pools p5 itself)
        return STRIDES[-1]

    @property
    def padding_constraints(self) -> Dict[str, int]:
        # detectron2 >= 0.7 pads batches to square_size itself; 0.6 ignores it (forward pads)
        return {"size_divisibility": self.size_divisibility, "square_size": self.square_pad}


class MAEViTBackbone(ViTPyramid, SquarePadBackbone):
    """ViT + per-stage deconv/pool rescaling; outputs ``res2``-``res5`` at strides 4-32.

    Keeps the ViT's own parameter names under ``vit.`` so MAE checkpoints map one to one.
    """

    def __init__(
        self,
        norm: str = "LN",
        pretrained: Optional[str] = None,
        square_pad: int = 0,
        **kwargs,
    ):
        """Args: ``norm`` of the upsampling path, an optional checkpoint, ``square_pad`` (pad
        smaller inputs at the bottom / right to this square, as ViTDet: the position table then
        covers test images as it covered the training crops), and the arguments of
        :func:`mae_transfer.pyramid.build_pyramid_vit` (model name, img_size, out_indices,
        window_size, global_blocks, rel_pos, drop_path_rate, ...)."""
        check_square_pad(square_pad)
        vit, out_indices = build_pyramid_vit(**kwargs)
        super().__init__(vit, out_indices, norm)
        self.square_pad = square_pad
        self._out_features = list(OUT_FEATURES)
        self._out_feature_strides = dict(zip(OUT_FEATURES, self.strides))
        self._out_feature_channels = {name: self.channels for name in OUT_FEATURES}
        if pretrained:
            self.load_pretrained(pretrained)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        x = pad_to_square(x, self.square_pad)
        return dict(zip(self._out_features, ViTPyramid.forward(self, x)))


def check_square_pad(square_pad: int) -> None:
    # stride-32 maps tile the square exactly (the FPN adds stride-16 and upsampled stride-32 maps)
    if square_pad < 0 or square_pad % 32:
        raise ValueError(f"square_pad must be 0 or a multiple of 32, got {square_pad}")


def pad_to_square(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, H, W) padded at the bottom / right to at least (size, size); as is when 0."""
    h, w = x.shape[-2:]
    if size and (h < size or w < size):
        # zeros after detectron2's normalisation = the mean pixel, as ImageList's padding
        x = F.pad(x, (0, max(size - w, 0), 0, max(size - h, 0)))
    return x


def backbone_kwargs(cfg) -> dict:
    """MODEL.VIT.* -> keyword arguments of :func:`build_vit_pyramid`."""
    v = cfg.MODEL.VIT
    kwargs = dict(
        model=v.NAME,
        img_size=v.IMG_SIZE,
        pos_embed_img_size=v.POS_EMBED_IMG_SIZE or None,
        out_indices=tuple(v.OUT_INDICES) or None,
        norm=v.NORM,
        window_size=v.WINDOW_SIZE,
        global_blocks=_global_blocks(v.GLOBAL_BLOCKS),
        residual_blocks=tuple(v.RESIDUAL_BLOCKS),
        rel_pos=v.REL_POS or None,
        drop_path_rate=v.DROP_PATH_RATE,
        init_values=v.LAYER_SCALE or None,
        use_checkpoint=v.USE_CHECKPOINT,
        pretrained=v.PRETRAINED or None,
        square_pad=_square_pad(cfg),
    )
    if v.PATCH_SIZE:
        kwargs["patch_size"] = v.PATCH_SIZE
    kwargs.update(_size_overrides(v.SIZE_OVERRIDES))
    return kwargs


def build_vit_part(cfg, pretrained: bool = True) -> Backbone:
    """The module of ``MODEL.BACKBONE.NAME`` that holds the ViT (the 4-stage pyramid without
    the FPN, or the simple pyramid), from the config alone, unchecked and unregistered: for
    checks on the meta device and for conversions. ``pretrained=False``: no weights loaded."""
    from .simple_fpn import MAEViTSimpleFPN, simple_fpn_kwargs  # (it imports this module)

    if cfg.MODEL.BACKBONE.NAME == SIMPLE_FPN_BACKBONE:
        cls, kwargs = MAEViTSimpleFPN, simple_fpn_kwargs(cfg)
    else:
        cls, kwargs = MAEViTBackbone, backbone_kwargs(cfg)
    if not pretrained:
        kwargs.pop("pretrained", None)
    return cls(**kwargs)


def _square_pad(cfg) -> int:
    pad = cfg.MODEL.VIT.SQUARE_PAD
    if pad >= 0:
        return pad
    return cfg.INPUT.LSJ.IMAGE_SIZE if cfg.INPUT.LSJ.ENABLED else 0


def _global_blocks(blocks: Sequence) -> Union[tuple, str, None]:
    """MODEL.VIT.GLOBAL_BLOCKS: [] = the default (the stage ends), ["none"] = no global block."""
    if list(blocks) == ["none"]:
        return "none"
    return tuple(blocks) or None


def _size_overrides(pairs: Sequence) -> dict:
    """MODEL.VIT.SIZE_OVERRIDES: [["embed_dim", 64], ["depth", 4], ...] for tiny test models."""
    return {str(k): v for k, v in pairs}


@BACKBONE_REGISTRY.register()
def build_mae_vit_backbone(cfg, input_shape: ShapeSpec) -> MAEViTBackbone:
    """The ViT pyramid alone (``res2``-``res5``)."""
    check_model_cfg(cfg)
    return MAEViTBackbone(in_chans=input_shape.channels, **backbone_kwargs(cfg))


def check_model_cfg(cfg) -> None:
    """Refuses detectron2's ResNet defaults for the input (BGR, no std), an empty
    ``MODEL.FPN.IN_FEATURES`` and heads reading maps the backbone does not make: a config of
    one's own built on ``get_cfg()`` has them, and ``tools/train_det.py``'s check does not run
    on it. Warns when detectron2's own DefaultTrainer builds the model."""
    errors = model_input_errors(cfg)
    if errors:
        raise ConfigError("the MAE ViT backbone cannot work with:\n  - " + "\n  - ".join(errors))
    trainer = _foreign_trainer()
    if trainer is not None:
        logger.warning(
            "%s is detectron2's DefaultTrainer, which reads none of our config keys: it trains "
            "SGD without layer decay (SOLVER.OPTIMIZER, BETAS, LAYER_DECAY unread), its AMP is "
            "CUDA fp16 only (SOLVER.AMP.PRECISION unread), it resizes without INPUT.LSJ and "
            "registers no DATASETS.COCO; subclass mae_transfer.detection.Trainer instead (what "
            "tools/train_det.py runs)",
            trainer,
        )


def _foreign_trainer() -> Optional[str]:
    """The class name of a detectron2 ``DefaultTrainer``, not ours, whose ``__init__`` is
    building this model (found on the call stack), else None: our Trainer, or a model built
    outside a trainer (inference, a LazyConfig)."""
    from detectron2.engine import DefaultTrainer

    frame = sys._getframe(1)
    while frame is not None:
        me = frame.f_locals.get("self") if frame.f_code.co_name == "__init__" else None
        if isinstance(me, DefaultTrainer):
            from .train import Trainer  # (it imports this module)

            return None if isinstance(me, Trainer) else type(me).__name__
        frame = frame.f_back
    return None


@BACKBONE_REGISTRY.register()
def build_mae_vit_fpn_backbone(cfg, input_shape: ShapeSpec) -> FPN:
    """The ViT pyramid + detectron2's FPN with ``LastLevelMaxPool`` (P2-P6)."""
    bottom_up = build_mae_vit_backbone(cfg, input_shape)
    extra = {}
    if "square_pad" in inspect.signature(FPN.__init__).parameters:  # detectron2 >= 0.7
        extra["square_pad"] = bottom_up.square_pad
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
        **extra,
    )
