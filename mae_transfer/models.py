"""Named model sizes and their registered factories.

MAE pretraining models (``mae_vit_*``) and encoder-only ViTs (``vit_*``) share one size table, so
an encoder built for transfer always matches the checkpoint of the same name.
"""

from __future__ import annotations

import re
from typing import Dict

from .mae import MaskedAutoencoderViT, build_mae
from .registry import register_model
from .vit import VisionTransformer, build_vit

# name -> encoder size. The decoder is the paper's for every size: 512-d, 8 blocks, 16 heads.
VIT_SIZES: Dict[str, dict] = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
    "huge": dict(embed_dim=1280, depth=32, num_heads=16),
}
DECODER = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)

# Stage ends for the 4-stage pyramid: the paper's equal split (detection, A.3) and the
# BEiT / mmseg choice (segmentation), zero-based block indices.
STAGE_INDICES_EQUAL = {
    "tiny": (2, 5, 8, 11),
    "small": (2, 5, 8, 11),
    "base": (2, 5, 8, 11),
    "large": (5, 11, 17, 23),
    "huge": (7, 15, 23, 31),
}
STAGE_INDICES_SEG = {
    "tiny": (3, 5, 7, 11),
    "small": (3, 5, 7, 11),
    "base": (3, 5, 7, 11),
    "large": (7, 11, 15, 23),
    "huge": (7, 15, 23, 31),
}


def equal_split(depth: int) -> tuple:
    """Zero-based last block of each of 4 equal stages: depth 12 -> (2, 5, 8, 11).

    Raises:
        ValueError: depth < 4, which leaves a stage without a block of its own.
    """
    if depth < 4:
        raise ValueError(
            f"a four-stage pyramid needs depth >= 4 (a block to end each stage), got depth "
            f"{depth}: build the ViT with depth=4 or more"
        )
    return tuple((depth * (i + 1)) // 4 - 1 for i in range(4))


def _mae(size: str, default_patch: int, **kwargs) -> MaskedAutoencoderViT:
    cfg = dict(patch_size=default_patch, mlp_ratio=4.0, **VIT_SIZES[size], **DECODER)
    cfg.update(kwargs)
    return build_mae(**cfg)


def _vit(size: str, default_patch: int, **kwargs) -> VisionTransformer:
    cfg = dict(patch_size=default_patch, mlp_ratio=4.0, **VIT_SIZES[size])
    cfg.update(kwargs)
    return build_vit(**cfg)


@register_model(aliases=("mae_vit_tiny_patch16_dec512d8b",))
def mae_vit_tiny_patch16(**kwargs) -> MaskedAutoencoderViT:
    return _mae("tiny", 16, **kwargs)


@register_model(aliases=("mae_vit_small_patch16_dec512d8b",))
def mae_vit_small_patch16(**kwargs) -> MaskedAutoencoderViT:
    return _mae("small", 16, **kwargs)


@register_model(aliases=("mae_vit_base_patch16_dec512d8b",))
def mae_vit_base_patch16(**kwargs) -> MaskedAutoencoderViT:
    return _mae("base", 16, **kwargs)


@register_model(aliases=("mae_vit_large_patch16_dec512d8b",))
def mae_vit_large_patch16(**kwargs) -> MaskedAutoencoderViT:
    return _mae("large", 16, **kwargs)


@register_model(aliases=("mae_vit_huge_patch14_dec512d8b",))
def mae_vit_huge_patch14(**kwargs) -> MaskedAutoencoderViT:
    return _mae("huge", 14, **kwargs)


@register_model
def vit_tiny_patch16(**kwargs) -> VisionTransformer:
    return _vit("tiny", 16, **kwargs)


@register_model
def vit_small_patch16(**kwargs) -> VisionTransformer:
    return _vit("small", 16, **kwargs)


@register_model
def vit_base_patch16(**kwargs) -> VisionTransformer:
    return _vit("base", 16, **kwargs)


@register_model
def vit_large_patch16(**kwargs) -> VisionTransformer:
    return _vit("large", 16, **kwargs)


@register_model
def vit_huge_patch14(**kwargs) -> VisionTransformer:
    return _vit("huge", 14, **kwargs)


def encoder_args(name: str) -> dict:
    """The encoder arguments of a registered name: ``vit_base_patch16`` or its MAE name
    ``mae_vit_base_patch16`` -> patch size, mlp ratio, width, depth and heads."""
    from .registry import resolve_name

    name = resolve_name(name)
    match = re.search(r"_patch(\d+)", name)
    if match is None:
        raise KeyError(f"cannot tell the patch size of model {name!r}")
    return dict(patch_size=int(match.group(1)), mlp_ratio=4.0, **VIT_SIZES[size_of(name)])


def size_of(name: str) -> str:
    """'mae_vit_large_patch16' or 'vit_large_patch16' -> 'large'."""
    for size in VIT_SIZES:
        if f"vit_{size}_" in name:
            return size
    raise KeyError(f"cannot tell the size of model {name!r}; expected one of {list(VIT_SIZES)}")
