"""``MAEViTSimpleFPN``: ViTDet's simple feature pyramid on the MAE ViT, a detectron2 backbone.

The alternative to ``build_mae_vit_fpn_backbone`` (the paper's 4 stages, then an FPN). As in
ViTDet (Li et al. 2022; detectron2's ``SimpleFeaturePyramid``), every level comes from the
*last* block's map (stride 16), with no top-down path; for ViT-B/16 (D = 768, C = 256):

    simfp_2 (stride 4)   ConvT(D, D/2) -> LN -> GELU -> ConvT(D/2, D/4) -> 1x1 conv -> 3x3 conv
    simfp_3 (stride 8)   ConvT(D, D/2)                                  -> 1x1 conv -> 3x3 conv
    simfp_4 (stride 16)                                                    1x1 conv -> 3x3 conv
    simfp_5 (stride 32)  max-pool 2                                     -> 1x1 conv -> 3x3 conv
    p6      (stride 64)  LastLevelMaxPool of p5

Each conv puts out C channels with a norm (LN; a bias only without one). The outputs are
``p2``-``p6``, as an FPN's, so the heads of the Mask R-CNN configs read them unchanged. The
parameter names are ViTDet's (the ViT under ``net.``, the levels ``simfp_<log2 stride>``), and
with ``pos_embed_img_size=224`` (the configs') so are the shapes: the ViT then holds its
position table as ViTDet does (the pretraining's 14 x 14 + a class row, interpolated at every
forward), so a ViTDet detector loads by name, through any loader (detectron2's own
``DetectionCheckpointer`` skips a tensor of another shape before a load hook could fix it).
"""

from __future__ import annotations

import math
from typing import Dict, Optional

import torch
import torch.nn as nn
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.fpn import LastLevelMaxPool

from mae_transfer.checkpoint import LoadReport, load_pretrained
from mae_transfer.pyramid import STRIDES, build_last_block_vit, pyramid_factors, rescale_layers

from .backbone import (
    SquarePadBackbone,
    backbone_kwargs,
    check_model_cfg,
    check_square_pad,
    pad_to_square,
)


class MAEViTSimpleFPN(SquarePadBackbone):
    """ViT + ViTDet's simple feature pyramid: image -> ``p2``-``p6`` at strides 4-64.

    Args:
        out_channels: C, the channels of every output (ViTDet: 256).
        norm: norm between the two ConvTs of the x4 level (ViTDet: 'LN').
        conv_norm: norm of the 1x1 and 3x3 convs of every level (ViTDet: 'LN').
        pretrained: an MAE / ViT checkpoint (any form) to load into the ViT.
        square_pad: pad smaller inputs at the bottom / right to this square (ViTDet: 1024; a
            multiple of 32, or 0 for none), so that test images see the position table as the
            LSJ training crops did.
        **vit_kwargs: :func:`mae_transfer.pyramid.build_last_block_vit`'s (model name,
            img_size, pos_embed_img_size (ViTDet: 224), window_size, global_blocks, rel_pos,
            drop_path_rate, in_chans, ...).
    """

    def __init__(
        self,
        out_channels: int = 256,
        norm: str = "LN",
        conv_norm: str = "LN",
        pretrained: Optional[str] = None,
        square_pad: int = 0,
        **vit_kwargs,
    ):
        super().__init__()
        check_square_pad(square_pad)
        self.net = build_last_block_vit(**vit_kwargs)
        self.square_pad = square_pad
        factors = pyramid_factors(self.net.patch_size)
        self.levels = [f"simfp_{int(math.log2(s))}" for s in STRIDES]
        for name, factor in zip(self.levels, factors):
            self.add_module(name, _level(self.net.embed_dim, factor, out_channels, norm, conv_norm))
        self.top_block = LastLevelMaxPool()  # p6 = max-pool(kernel 1, stride 2) of p5
        strides = list(STRIDES) + [2 * STRIDES[-1]]
        self._out_features = [f"p{int(math.log2(s))}" for s in strides]
        self._out_feature_strides = dict(zip(self._out_features, strides))
        self._out_feature_channels = {name: out_channels for name in self._out_features}
        if pretrained:
            self.load_pretrained(pretrained)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """x: (B, 3, H, W) -> {'p2': (B, C, ~H/4, ~W/4), ..., 'p6': (B, C, ~H/64, ~W/64)}
        (sizes rounded up; of the padded square with ``square_pad``)."""
        x = pad_to_square(x, self.square_pad)
        last = self.net.forward_intermediates(x, [-1])[0]  # (B, D, H/p, W/p), no final norm
        maps = [getattr(self, name)(last) for name in self.levels]
        maps += self.top_block(maps[-1])
        return dict(zip(self._out_features, maps))

    def load_pretrained(self, path: str) -> LoadReport:
        """Loads an MAE / ViT checkpoint (any form) into the ViT; the pyramid stays as built."""
        return load_pretrained(self.net, path)


def _level(dim: int, factor: float, out_channels: int, norm: str, conv_norm: str) -> nn.Sequential:
    """One level: the rescaling (:func:`rescale_layers`, halving the channels), then 1x1 and
    3x3 convs to ``out_channels``, each with ``conv_norm`` (a bias only without one, as
    ViTDet)."""
    layers, channels = rescale_layers(dim, factor, lambda c: get_norm(norm, c), halve=True)
    for kernel in (1, 3):
        norm_layer = get_norm(conv_norm, out_channels)
        layers.append(
            Conv2d(
                channels,
                out_channels,
                kernel,
                padding=kernel // 2,
                bias=not conv_norm,
                norm=norm_layer,
            )
        )
        channels = out_channels
    return nn.Sequential(*layers)


def simple_fpn_kwargs(cfg) -> dict:
    """MODEL.VIT.* and MODEL.FPN.{OUT_CHANNELS, NORM} -> :class:`MAEViTSimpleFPN`'s arguments
    (the pyramid's convs stand where the FPN's lateral and output convs are)."""
    return dict(
        backbone_kwargs(cfg), out_channels=cfg.MODEL.FPN.OUT_CHANNELS, conv_norm=cfg.MODEL.FPN.NORM
    )


@BACKBONE_REGISTRY.register()
def build_mae_vit_simple_fpn_backbone(cfg, input_shape: ShapeSpec) -> MAEViTSimpleFPN:
    """The ViT + ViTDet's simple feature pyramid (``p2``-``p6``, no FPN)."""
    check_model_cfg(cfg)
    return MAEViTSimpleFPN(in_chans=input_shape.channels, **simple_fpn_kwargs(cfg))
