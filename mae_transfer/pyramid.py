"""Multi-scale adapters: ViT block outputs -> stride 4/8/16/32 feature maps.

Framework-free. Two designs:

1. The paper's 4 stages (:class:`ViTPyramid`; the detectron2 and mmseg backbones are thin
   wrappers around it). As in the paper (A.3) and BEiT/mmseg: the ViT blocks are split into four
   stages, each stage's last output is taken, and rescaled from the patch stride to 4, 8, 16, 32:

       x4   = ConvT(2, 2) -> norm -> GELU -> ConvT(2, 2)      (patch 16 -> stride 4)
       x2   = ConvT(2, 2)                                      (patch 16 -> stride 8)
       x1   = identity                                         (stride 16)
       x0.5 = max-pool(2)                                      (stride 32)

2. ViTDet's simple feature pyramid (Li et al. 2022): every level from the *last* block's map,
   each ConvT halving the channels (x4: D -> D/2 -> D/4; x2: D -> D/2). Here only its parts:
   :func:`build_last_block_vit` (the encoder) and :func:`rescale_layers` (the rescaling, both
   pyramids'); the convolutions after it are the framework's
   (``mae_transfer.detection.simple_fpn``).

Other patch sizes get the matching factors (patch 8: x2, x1, x0.5, x0.25; patch 32: x8 ... x1).
"""

from __future__ import annotations

import logging
import math
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import LayerNorm2d

from .checkpoint import LoadReport, load_pretrained
from .models import STAGE_INDICES_EQUAL, STAGE_INDICES_SEG, VIT_SIZES, equal_split, size_of
from .registry import create_model, patch_size_of, resolve_name
from .vit import VisionTransformer

logger = logging.getLogger(__name__)

NORMS = ("BN", "SyncBN", "LN", "GN", "")
STRIDES = (4, 8, 16, 32)


def make_norm(norm: str, channels: int) -> nn.Module:
    """'BN' | 'SyncBN' | 'LN' (over channels of an NCHW map) | 'GN' (32 groups) | '' (none)."""
    if norm == "BN":
        return nn.BatchNorm2d(channels)
    if norm == "SyncBN":
        return nn.SyncBatchNorm(channels)
    if norm == "LN":
        return LayerNorm2d(channels, eps=1e-6)
    if norm == "GN":
        return nn.GroupNorm(math.gcd(32, channels), channels)
    if norm == "":
        return nn.Identity()
    raise ValueError(f"unknown pyramid norm {norm!r}; expected one of {NORMS}")


def make_rescale(channels: int, factor: float, norm: str) -> nn.Module:
    """The 4-stage pyramid's resampling by a power-of-two ``factor`` (:func:`rescale_layers`,
    the channels kept; ``norm`` one of :data:`NORMS`)."""
    layers, _ = rescale_layers(channels, factor, lambda c: make_norm(norm, c))
    return nn.Sequential(*layers) if layers else nn.Identity()


def rescale_layers(
    channels: int,
    factor: float,
    norm: Callable[[int], Optional[nn.Module]],
    halve: bool = False,
) -> Tuple[List[nn.Module], int]:
    """The layers that resample an NCHW map by a power-of-two ``factor``, both pyramids'.

    Up: one ConvT(2, 2) per doubling, with norm -> GELU between them; with ``halve`` (ViTDet's
    simple pyramid) each ConvT halves the channels. Down: one max-pool (ceil: a map of any
    size keeps its last row and column). For patch 16 (the indices are the parameter names'):

        x4   = [ConvT(D, D'), norm(D'), GELU, ConvT(D', D'')]   D' = D/2, D'' = D/4 with halve
        x2   = [ConvT(D, D')]                                     (else D' = D'' = D)
        x1   = []
        x0.5 = [MaxPool(2)]

    Args:
        channels: D, the ViT's width.
        factor: patch size / output stride (a power of two, see :func:`pyramid_factors`).
        norm: channels -> norm module (:func:`make_norm` of a name, or a framework's, e.g.
            detectron2's ``get_norm``); None becomes an identity, so that the layers keep
            their indices.
        halve: halve the channels at each ConvT.

    Returns:
        (the layers in order, the channels they put out).

    Raises:
        ValueError: with ``halve``, channels that do not halve as often as the factor needs.
    """
    if factor <= 1:
        pool = int(round(1 / factor))
        return ([nn.MaxPool2d(pool, pool, ceil_mode=True)] if pool > 1 else []), channels
    steps = int(round(math.log2(factor)))
    if halve and channels % 2**steps:
        raise ValueError(
            f"the x{factor:g} level halves the channels {steps} times: width {channels} is not "
            f"divisible by {2**steps}; give the ViT an embed_dim divisible by {2**steps}"
        )
    layers: List[nn.Module] = []
    for i in range(steps):
        if i:
            between = norm(channels)
            layers += [nn.Identity() if between is None else between, nn.GELU()]
        out = channels // 2 if halve else channels
        layers.append(nn.ConvTranspose2d(channels, out, kernel_size=2, stride=2))
        channels = out
    return layers, channels


def pyramid_factors(patch_size: int, strides: Sequence[int] = STRIDES) -> List[float]:
    """patch / stride for each output, checked to be powers of two."""
    factors = [patch_size / s for s in strides]
    for f in factors:
        if f <= 0 or abs(math.log2(f) - round(math.log2(f))) > 1e-9:
            raise ValueError(
                f"patch size {patch_size} cannot reach strides {tuple(strides)} by powers of two; "
                "use patch_size=16 (a patch-14 checkpoint's kernel is resized when loaded)"
            )
    return factors


class ViTPyramid(nn.Module):
    """A ViT and the per-stage rescaling: image -> 4 NCHW maps at strides 4, 8, 16, 32.

    Args:
        vit: the encoder (with or without a class token; the maps are of the patch tokens).
        out_indices: the zero-based block whose output feeds each of the 4 levels.
        norm: norm inside the x4 (and larger) upsampling path, one of :data:`NORMS`.
    """

    def __init__(self, vit: VisionTransformer, out_indices: Sequence[int], norm: str = "BN"):
        super().__init__()
        if len(out_indices) != 4 or list(out_indices) != sorted(set(out_indices)):
            raise ValueError(f"out_indices must be 4 increasing block indices, got {out_indices}")
        if not out_indices[0] >= 0 or out_indices[-1] >= vit.depth:
            raise ValueError(f"out_indices {tuple(out_indices)} out of range for depth {vit.depth}")
        _prune_unused(vit, out_indices[-1])
        self.vit = vit
        self.out_indices = tuple(out_indices)
        self.strides = STRIDES
        self.channels = vit.embed_dim
        factors = pyramid_factors(vit.patch_size)
        self.rescale = nn.ModuleList([make_rescale(vit.embed_dim, f, norm) for f in factors])

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        """x: (B, 3, H, W) -> 4 maps (B, D, ~H/s, ~W/s) for s = 4, 8, 16, 32."""
        feats = self.vit.forward_intermediates(x, self.out_indices)
        return [op(f) for op, f in zip(self.rescale, feats)]

    def load_pretrained(self, path: str) -> LoadReport:
        """Loads an MAE / ViT checkpoint (any form) into the ViT; the rescaling stays as built."""
        return load_pretrained(self.vit, path)


def _prune_unused(vit: VisionTransformer, last: int) -> None:
    """Removes what the pyramid never runs: the final norm and blocks after the last stage.

    Parameters without a gradient would make DDP (``find_unused_parameters=False``, the default
    in detectron2 and mmengine) fail at the second iteration. Checkpoint loading reports their
    weights as dropped. ``vit.depth`` keeps the full depth (layer-wise lr decay counts it).
    """
    kept = last + 1
    dropped = ["norm."] + [f"blocks.{i}." for i in range(kept, len(vit.blocks))]
    if kept < len(vit.blocks):
        logger.info(
            "pyramid: blocks %d-%d come after the last stage (block %d) and are removed",
            kept,
            len(vit.blocks) - 1,
            last,
        )
        vit.blocks = vit.blocks[:kept]
    vit.norm = nn.Identity()
    vit.unused_checkpoint_prefixes = tuple(dropped)


def default_out_indices(model: str, depth: int, kind: str = "equal") -> tuple:
    """Stage ends: the paper's equal split ('equal') or the BEiT/mmseg one ('seg')."""
    table = STAGE_INDICES_EQUAL if kind == "equal" else STAGE_INDICES_SEG
    try:
        size = size_of(model)
        if VIT_SIZES[size]["depth"] == depth:
            return table[size]
    except KeyError:
        pass
    return equal_split(depth)


def build_pyramid_vit(
    model: str = "vit_base_patch16",
    img_size=1024,
    out_indices: Optional[Sequence[int]] = None,
    stage_split: str = "equal",
    window_size: int = 0,
    global_blocks: Union[Sequence[int], str, None] = None,
    **vit_kwargs,
) -> Tuple[VisionTransformer, tuple]:
    """The encoder (by registered name) for a pyramid, and its stage ends.

    Patch 14 (ViT-H/14) becomes 16, the checkpoint's kernel resized when it loads; another
    patch size that is not a power of two is rejected by :func:`pyramid_factors`.
    ``out_indices`` default to the paper's equal split (``stage_split='equal'``) or
    BEiT/mmseg's (``'seg'``). With window attention, the blocks at the stage ends are global
    when ``global_blocks`` is None or empty (ViTDet's choice); ``"none"`` makes every block
    windowed (ViTDet's no-propagation ablation).
    """
    vit_kwargs.setdefault("class_token", False)
    patch = vit_kwargs.get("patch_size") or patch_size_of(model)
    if patch == 14:  # ViT-H/14: as ViTDet, run as patch 16 (other sizes: pyramid_factors says)
        logger.info("%s: patch 14 used as patch 16 (kernel resized when weights load)", model)
        patch = 16
    vit_kwargs["patch_size"] = patch
    depth = vit_kwargs.get("depth") or VIT_SIZES[size_of(resolve_name(model))]["depth"]
    if not out_indices:
        out_indices = default_out_indices(model, depth, stage_split)
    if isinstance(global_blocks, str):
        if global_blocks != "none":
            raise ValueError(
                f"global_blocks must be block indices or 'none', got {global_blocks!r}"
            )
        global_blocks = ()
    elif window_size and not global_blocks:
        global_blocks = out_indices
    vit = create_model(
        model,
        img_size=img_size,
        window_size=window_size,
        global_blocks=tuple(global_blocks or ()),
        **vit_kwargs,
    )
    return vit, tuple(out_indices)


def build_last_block_vit(**kwargs) -> VisionTransformer:
    """The encoder of a pyramid built from its last block alone (ViTDet's simple pyramid).

    Takes :func:`build_pyramid_vit`'s arguments but ``out_indices``: with window attention,
    the global blocks default to the equal split's stage ends, which are ViTDet's (B 2,5,8,11;
    L 5,11,17,23; H 7,15,23,31). Every block runs; the final norm is removed, as ViTDet's ViT
    has none (its weights are reported as dropped when a checkpoint loads).
    """
    if kwargs.get("out_indices"):
        raise ValueError(
            f"out_indices {tuple(kwargs['out_indices'])}: a last-block pyramid reads no stage "
            "outputs; leave them out (name global-attention blocks with global_blocks)"
        )
    kwargs.pop("out_indices", None)
    vit, _ = build_pyramid_vit(**kwargs)
    _prune_unused(vit, vit.depth - 1)
    return vit


def build_vit_pyramid(norm: str = "BN", pretrained: Optional[str] = None, **kwargs) -> ViTPyramid:
    """:class:`ViTPyramid` from :func:`build_pyramid_vit` arguments; optionally loads weights."""
    vit, out_indices = build_pyramid_vit(**kwargs)
    pyramid = ViTPyramid(vit, out_indices, norm)
    if pretrained:
        pyramid.load_pretrained(pretrained)
    return pyramid
