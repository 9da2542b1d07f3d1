"""Encoder-only ViT for transfer, built from the same blocks and names as the MAE encoder.

Official MAE encoder weights load by name (``patch_embed.proj``, ``blocks.{i}.attn.qkv``, ...).
On top of the plain ViT it has the options that dense prediction needs:

- any input size: the input is padded to a multiple of the patch size and the learned absolute
  position table is interpolated to the patch grid of each input; the table is held at
  ``img_size``'s grid or, as ViTDet holds it, at the pretraining's (``pos_embed_img_size``,
  with its class row: a ViTDet checkpoint's table then has the model's shape);
- window attention in all but a few global blocks (ViTDet), with padding to whole windows;
- relative position: ``"decomposed"`` (ViTDet, per-axis tables added to the logits) or
  ``"bias"`` (BEiT/mmseg, a per-head bias table), both zero-initialised;
- ViTDet's convolutional propagation (its ablation): a residual bottleneck of convolutions
  after chosen blocks (``residual_blocks``);
- layer scale, stochastic depth, activation checkpointing;
- ``forward_intermediates`` returning NCHW maps of chosen blocks.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Iterable, Iterator
from functools import partial
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.layers import DropPath, LayerNorm2d, LayerScale, Mlp, PatchEmbed

from .attention import attention
from .matmul import route_linears
from .pos_embed import Size2, resize_pos_embed, sincos_pos_embed, to_2tuple
from .weight_init import init_linear_and_norm, init_patch_embed

__all__ = [
    "VisionTransformer",
    "Attention",
    "Block",
    "ResidualConvBlock",
    "build_vit",
    "REL_POS_TYPES",
]

REL_POS_TYPES = (None, "decomposed", "bias")
HW = Tuple[int, int]


# -- constant tables ---------------------------------------------------------------------------
def _constant(builder=None, *, maxsize: int = 64):
    """Caches a builder of constant index / mask tensors by its arguments (device and dtype
    among them): each is made once, not in every block of every forward, where on a GPU it
    is a string of small kernel launches. Made outside inference mode, so that a table first
    built during evaluation can still be saved for a training backward. ``maxsize`` bounds
    the tables kept (one per input grid)."""
    if builder is None:
        return functools.partial(_constant, maxsize=maxsize)
    cached = functools.lru_cache(maxsize=maxsize)(builder)

    @functools.wraps(builder)
    def get(*args):
        with torch.inference_mode(False):
            return cached(*args)

    get.cache_clear = cached.cache_clear
    return get


# -- relative position -----------------------------------------------------------------------
def resize_1d_table(table: torch.Tensor, length: int) -> torch.Tensor:
    """table: (L, C) -> (length, C) by linear interpolation along L."""
    if table.shape[0] == length:
        return table
    out = F.interpolate(table.t().unsqueeze(0).float(), size=length, mode="linear")
    return out.squeeze(0).t().to(table.dtype)


@_constant
def _relative_index(q_size: int, k_size: int, device: torch.device) -> torch.Tensor:
    """(q_size, k_size) index into a table of 2 * max(q, k) - 1 relative offsets."""
    q = torch.arange(q_size, device=device)[:, None] * max(k_size / q_size, 1.0)
    k = torch.arange(k_size, device=device)[None, :] * max(q_size / k_size, 1.0)
    return ((q - k) + (k_size - 1) * max(q_size / k_size, 1.0)).long()


def decomposed_rel_pos_bias(
    q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, hw: HW
) -> torch.Tensor:
    """Additive logits of decomposed relative position (Li et al. 2021, ViTDet).

    Args:
        q: (B, heads, h*w, head_dim) queries, unscaled.
        rel_pos_h, rel_pos_w: (2*size-1, head_dim) tables; resized when the grid differs.
        hw: query (= key) grid.

    Returns:
        (B, heads, h*w, h*w) bias for the attention logits.
    """
    b, heads, n, _ = q.shape
    rel_h, rel_w = _decomposed_rel_terms(q, rel_pos_h, rel_pos_w, hw)
    bias = rel_h[..., :, None] + rel_w[..., None, :]  # (B, heads, h, w, h, w)
    return bias.reshape(b, heads, n, n)


def _decomposed_rel_terms(
    q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, hw: HW
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Each query's logit terms per key row and per key column: (B, heads, h, w, h) and
    (B, heads, h, w, w); the bias of query -> key (r, c) is rel_h[..., r] + rel_w[..., c]."""
    h, w = hw
    b, heads, _, dim = q.shape
    table_h = resize_1d_table(rel_pos_h, 2 * h - 1)[_relative_index(h, h, q.device)]  # (h, h, C)
    table_w = resize_1d_table(rel_pos_w, 2 * w - 1)[_relative_index(w, w, q.device)]  # (w, w, C)
    r_q = q.reshape(b, heads, h, w, dim)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, table_h)
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, table_w)
    return rel_h, rel_w


def fold_decomposed_rel_pos(
    q: torch.Tensor,
    k: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    hw: HW,
    scale: float,
    multiple: int = 8,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Queries and keys whose dot product is ``scale * q.k + decomposed relative position``.

    The bias of :func:`decomposed_rel_pos_bias` is rel_h[query, key row] + rel_w[query, key
    column]; appending those per-query tables to q and one-hot key rows / columns to k puts it
    inside the q.k product. Attention then runs in ``scaled_dot_product_attention``'s fused
    kernel (scale 1) with no (N x N) bias tensor: at 1024 px that is 0.8 GB per global block
    that need not exist, and the fused kernel replaces the math one an attention bias with a
    gradient would force.

    The width is zero-padded up to a ``multiple`` (zero columns add nothing to q.k): in 16-bit
    the memory-efficient and cuDNN kernels take only widths that are multiples of 8, and
    64 + 2 x 14 = 92 (ViT-B/L windows) or 80 + 28 = 108 (ViT-H) would fall back to the math
    kernel, which holds every window's logits in fp32.

    Returns:
        (q', k') of width head_dim + h + w rounded up to ``multiple``.
    """
    h, w = hw
    b, heads, n, dim = q.shape
    pad = -(dim + h + w) % multiple
    rel_h, rel_w = _decomposed_rel_terms(q, rel_pos_h, rel_pos_w, hw)
    rel_h, rel_w = rel_h.reshape(b, heads, n, h), rel_w.reshape(b, heads, n, w)
    zeros = q.new_zeros(b, heads, n, pad)
    q2 = torch.cat([q * scale, rel_h.to(q.dtype), rel_w.to(q.dtype), zeros], dim=-1)
    onehot = _key_rows_and_columns(tuple(hw), pad, k.device, k.dtype)
    k2 = torch.cat([k, onehot.expand(b, heads, n, h + w + pad)], dim=-1)
    return q2, k2


@_constant
def _key_rows_and_columns(hw: HW, pad: int, device: torch.device, dtype) -> torch.Tensor:
    """(h*w, h + w + pad): each key's one-hot row, one-hot column, then ``pad`` zeros."""
    h, w = hw
    idx = torch.arange(h * w, device=device)
    onehot = torch.cat([F.one_hot(idx // w, h), F.one_hot(idx % w, w)], dim=-1).to(dtype)
    return F.pad(onehot, (0, pad))


CLS_BIAS_ENTRIES = 3  # BEiT's extra table rows: class -> patch, patch -> class, class -> class


@_constant(maxsize=4)  # (h*w)^2 int64: 134 MB at 64 x 64 tokens; few grids kept
def _bias_table_index(hw: HW, device: torch.device, class_token: bool = False) -> torch.Tensor:
    """(N, N) index into a ((2h-1) * (2w-1)) table of 2D relative offsets, N = h*w; with
    ``class_token`` (N = 1 + h*w, the class token first) the three entries after the offsets
    are, as in BEiT, class -> patch, patch -> class and class -> class."""
    h, w = hw
    coords = torch.stack(
        torch.meshgrid(
            torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij"
        )
    ).flatten(1)  # (2, h*w)
    rel = coords[:, :, None] - coords[:, None, :]
    index = (rel[0] + h - 1) * (2 * w - 1) + (rel[1] + w - 1)
    if not class_token:
        return index
    offsets = (2 * h - 1) * (2 * w - 1)
    index = F.pad(index, (1, 0, 1, 0))
    index[0, :] = offsets
    index[:, 0] = offsets + 1
    index[0, 0] = offsets + 2
    return index


def relative_position_bias(
    table: torch.Tensor, table_hw: HW, hw: HW, class_token: bool = False
) -> torch.Tensor:
    """Per-head bias from a BEiT-style table.

    Args:
        table: ((2*th-1) * (2*tw-1), heads), built for grid ``table_hw``; with ``class_token``
            followed by the :data:`CLS_BIAS_ENTRIES` class-token rows (BEiT / mmseg's layout).
        hw: the grid of this input; the offsets are resized bicubically when it differs (the
            class-token rows are kept).

    Returns:
        (1, heads, N, N), N = h*w (+ 1 with ``class_token``).
    """
    h, w = hw
    heads = table.shape[1]
    table = resize_bias_table(table, table_hw, hw, class_token)
    n = h * w + int(class_token)
    # gathered per head, so that the bias is contiguous (heads, N, N), as fused kernels read it
    bias = table.t()[:, _bias_table_index(tuple(hw), table.device, class_token).reshape(-1)]
    return bias.view(1, heads, n, n)


def resize_bias_table(
    table: torch.Tensor, table_hw: HW, hw: HW, class_token: bool = False
) -> torch.Tensor:
    """A BEiT-style table for grid ``table_hw`` as one for grid ``hw``: its
    ((2*th-1) * (2*tw-1), heads) offsets resized bicubically to ((2*h-1) * (2*w-1), heads),
    the :data:`CLS_BIAS_ENTRIES` class-token rows that follow them with ``class_token`` kept.
    ``table`` itself when the grids are equal."""
    (h, w), (th, tw) = hw, table_hw
    if (th, tw) == (h, w):
        return table
    heads = table.shape[1]
    extra = table[-CLS_BIAS_ENTRIES:] if class_token else table[:0]
    offsets = table[: table.shape[0] - extra.shape[0]]
    grid = offsets.t().reshape(1, heads, 2 * th - 1, 2 * tw - 1).float()
    grid = F.interpolate(grid, size=(2 * h - 1, 2 * w - 1), mode="bicubic", align_corners=False)
    return torch.cat([grid.reshape(heads, -1).t().to(table.dtype), extra], dim=0)


# -- windows ----------------------------------------------------------------------------------
def window_partition(
    x: torch.Tensor, window: int, fill: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, HW]:
    """x: (B, H, W, C) -> (B * nW, window*window, C) after padding H, W at the bottom / right
    with zeros, or with the vector ``fill`` (C,); returns the padded HW."""
    b, h, w, c = x.shape
    pad_h, pad_w = (-h) % window, (-w) % window
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        if fill is not None:
            x[:, h:] = fill
            x[:, :h, w:] = fill
    hp, wp = h + pad_h, w + pad_w
    x = x.view(b, hp // window, window, wp // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, c), (hp, wp)


def window_unpartition(x: torch.Tensor, window: int, padded: HW, hw: HW) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (B * nW, window*window, C) -> (B, H, W, C)."""
    hp, wp = padded
    h, w = hw
    b = x.shape[0] // ((hp // window) * (wp // window))
    x = x.view(b, hp // window, wp // window, window, window, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)
    return x[:, :h, :w, :] if (hp, wp) != (h, w) else x


# -- attention and block ----------------------------------------------------------------------
class Attention(nn.Module):
    """Multi-head self-attention (timm names ``qkv``, ``proj``) with optional relative position."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        rel_pos: Optional[str] = None,
        rel_pos_size: Optional[HW] = None,
        class_token: bool = False,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by num_heads {num_heads}")
        if rel_pos not in REL_POS_TYPES:
            raise ValueError(f"rel_pos must be one of {REL_POS_TYPES}, got {rel_pos!r}")
        if class_token and rel_pos == "decomposed":
            raise ValueError("rel_pos='decomposed' has no class-token terms; use 'bias'")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.rel_pos = rel_pos
        self.rel_pos_size = rel_pos_size
        self.class_token = class_token  # the tokens start with a class token (rel_pos 'bias')
        # 'decomposed' folded into q.k (fused attention); False: an explicit (N x N) bias, the
        # way ViTDet computes it (same values; kept as the reference for tests and benchmarks)
        self.fold_rel_pos = True
        if rel_pos is not None:
            h, w = rel_pos_size
            if rel_pos == "decomposed":
                self.rel_pos_h = nn.Parameter(torch.zeros(2 * h - 1, self.head_dim))
                self.rel_pos_w = nn.Parameter(torch.zeros(2 * w - 1, self.head_dim))
            else:
                entries = (2 * h - 1) * (2 * w - 1) + (CLS_BIAS_ENTRIES if class_token else 0)
                self.relative_position_bias_table = nn.Parameter(torch.zeros(entries, num_heads))

    def _bias(self, q: torch.Tensor, hw: HW) -> Optional[torch.Tensor]:
        """The explicit additive bias: BEiT's per-head table, or unfolded decomposed terms."""
        if self.rel_pos == "decomposed":
            return decomposed_rel_pos_bias(q, self.rel_pos_h, self.rel_pos_w, hw)
        if self.rel_pos == "bias":
            # the small table cast, not the N x N bias: under autocast no fp32 bias (or its
            # gradient) of N x N per head is ever made
            table = self.relative_position_bias_table.to(q.dtype)
            return relative_position_bias(table, self.rel_pos_size, hw, self.class_token)
        return None

    def forward(
        self, x: torch.Tensor, hw: Optional[HW] = None, mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Self-attention over tokens.

        Args:
            x: (B, N, C).
            hw: the patch grid (N = h*w, or 1 + h*w with a class token); needed with rel_pos.
            mask: optional additive logit mask broadcastable to (B, heads, N, N).

        Returns:
            (B, N, C).
        """
        return self.proj_drop(self.proj(self.attend(self.qkv(x), hw, mask)))

    def attend(
        self, qkv: torch.Tensor, hw: Optional[HW] = None, mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """The attention between the ``qkv`` and ``proj`` projections: (B, N, 3C) -> (B, N, C)."""
        b, n, _ = qkv.shape
        qkv = qkv.reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, heads, N, head_dim)
        drop = self.attn_drop if self.training else 0.0
        if self.rel_pos == "decomposed" and self.fold_rel_pos:  # fused attention, no N x N bias
            q, k = fold_decomposed_rel_pos(
                q, k, self.rel_pos_h, self.rel_pos_w, hw, self.head_dim**-0.5
            )
            v = F.pad(v, (0, q.shape[-1] - v.shape[-1]))  # fused kernels want equal widths
            x = attention(q, k, v, attn_mask=mask, dropout_p=drop, scale=1.0)
            x = x[..., : self.head_dim]
        else:
            bias = self._bias(q, hw) if self.rel_pos else None
            if mask is not None:
                bias = mask if bias is None else bias + mask
            x = attention(q, k, v, attn_mask=bias, dropout_p=drop)
        return x.transpose(1, 2).reshape(b, n, -1)


class ResidualConvBlock(nn.Module):
    """ViTDet's convolutional propagation block: ``x + f(x)`` on the (B, C, h, w) token map,
    ``f`` = 1x1 conv to C/2, LN, GELU, 3x3 conv, LN, GELU, 1x1 conv back to C, LN.

    As ViTDet's ``ResBottleneckBlock`` (and under its parameter names, ``conv1``-``conv3``,
    ``norm1``-``norm3``, so its checkpoints load): convolutions without bias, He-normal
    (fan-out) initialised; LayerNorms over the channels; the last norm zero-initialised, so
    the block starts as the identity.
    """

    def __init__(self, dim: int, act_layer=nn.GELU):
        super().__init__()
        mid = dim // 2
        self.conv1 = nn.Conv2d(dim, mid, 1, bias=False)
        self.norm1 = LayerNorm2d(mid, eps=1e-6)
        self.act1 = act_layer()
        self.conv2 = nn.Conv2d(mid, mid, 3, padding=1, bias=False)
        self.norm2 = LayerNorm2d(mid, eps=1e-6)
        self.act2 = act_layer()
        self.conv3 = nn.Conv2d(mid, dim, 1, bias=False)
        self.norm3 = LayerNorm2d(dim, eps=1e-6)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for conv in (self.conv1, self.conv2, self.conv3):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        for norm, weight in ((self.norm1, 1.0), (self.norm2, 1.0), (self.norm3, 0.0)):
            nn.init.constant_(norm.weight, weight)
            nn.init.zeros_(norm.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act1(self.norm1(self.conv1(x)))
        y = self.act2(self.norm2(self.conv2(y)))
        return x + self.norm3(self.conv3(y))


class Block(nn.Module):
    """Pre-norm transformer block; global or window attention (timm parameter names); with
    ``residual``, ViTDet's :class:`ResidualConvBlock` after it (on tokens without a class token).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        init_values: Optional[float] = None,
        norm_layer=nn.LayerNorm,
        act_layer=nn.GELU,
        window_size: int = 0,
        rel_pos: Optional[str] = None,
        rel_pos_size: Optional[HW] = None,
        class_token: bool = False,
        residual: bool = False,
    ):
        super().__init__()
        if class_token and window_size:
            raise ValueError("window attention has no class token; use class_token=False")
        self.window_size = window_size
        self.norm1 = norm_layer(dim)
        if window_size:
            rel_pos_size = (window_size, window_size)
        self.attn = Attention(
            dim,
            num_heads,
            qkv_bias,
            rel_pos=rel_pos,
            rel_pos_size=rel_pos_size,
            class_token=class_token,
        )
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.residual = ResidualConvBlock(dim, act_layer) if residual else None

    def _attention(self, x: torch.Tensor, hw: HW) -> torch.Tensor:
        if not self.window_size:
            return self.attn(x, hw)
        # ViTDet pads the normalised tokens with zeros to whole windows and projects them: the
        # padding's q, k and v are the qkv bias, its keys take part in the real tokens'
        # attention, its outputs are cropped. The same here, but the projection runs on the
        # h*w real tokens only and the padding is the bias itself (ViTDet's qkv / proj work is
        # 20-72% larger at 1024 / 512 px with window 14); no mask, so fused kernels stay fast.
        b, n, c = x.shape
        attn = self.attn
        qkv = attn.qkv(x).view(b, hw[0], hw[1], -1)
        fill = None if attn.qkv.bias is None else attn.qkv.bias.to(qkv.dtype)
        qkv, padded = window_partition(qkv, self.window_size, fill)
        out = attn.attend(qkv, (self.window_size, self.window_size))
        out = window_unpartition(out, self.window_size, padded, hw).reshape(b, n, c)
        return attn.proj_drop(attn.proj(out))

    def forward(self, x: torch.Tensor, hw: Optional[HW] = None) -> torch.Tensor:
        """x: (B, N, C) tokens of an h*w grid (class token first, if any) -> (B, N, C)."""
        x = x + self.drop_path(self.ls1(self._attention(self.norm1(x), hw)))
        x = x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))
        if self.residual is None:
            return x
        if hw is None or x.shape[1] != hw[0] * hw[1]:
            raise ValueError(
                f"a block with a convolutional residual needs the tokens of an h*w grid and no "
                f"class token; got {x.shape[1]} tokens for grid {hw}"
            )
        b, n, c = x.shape
        grid = x.transpose(1, 2).reshape(b, c, hw[0], hw[1])
        return self.residual(grid).flatten(2).transpose(1, 2)


# -- the encoder ------------------------------------------------------------------------------
class VisionTransformer(nn.Module):
    """ViT encoder with MAE/timm parameter names, for any input size (see module docstring).

    ``pos_embed_img_size``: None holds the position table at ``img_size``'s patch grid (with a
    row for the class token, if any); an image size holds it at that size's grid with a class
    row, as ViTDet does (``pretrain_img_size`` 224 with ``pretrain_use_cls_token``: MAE's
    14 x 14 + 1 rows at patch 16): a ViTDet detector's table loads as is, by any loader, and
    every forward interpolates it to the input's grid (bicubic) as ViTDet's, the class row
    unused without a class token.
    """

    def __init__(
        self,
        img_size: Size2 = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        norm_layer=None,
        class_token: bool = True,
        drop_path_rate: float = 0.0,
        init_values: Optional[float] = None,
        window_size: int = 0,
        global_blocks: Sequence[int] = (),
        rel_pos: Optional[str] = None,
        use_checkpoint: bool = False,
        pos_embed_img_size: Optional[Size2] = None,
        residual_blocks: Sequence[int] = (),
    ):
        super().__init__()
        if isinstance(global_blocks, Iterator):  # a generator: read once, checked and kept
            global_blocks = tuple(global_blocks)
        residual_blocks = tuple(residual_blocks)
        _check_vit_args(depth, class_token, window_size, global_blocks, rel_pos, drop_path_rate)
        _check_residual_blocks(residual_blocks, depth, class_token)
        norm_layer = norm_layer or partial(nn.LayerNorm, eps=1e-6)
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.depth = depth
        self.unused_checkpoint_prefixes: Tuple[str, ...] = ()  # set by adapters that prune
        self.use_checkpoint = use_checkpoint
        self.num_prefix_tokens = 1 if class_token else 0
        self.patch_embed = PatchEmbed(
            img_size, patch_size, in_chans, embed_dim, strict_img_size=False, dynamic_img_pad=True
        )
        self.grid_size = tuple(self.patch_embed.grid_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        # the position table's grid and leading rows (see the class docstring)
        self.pos_grid, self.pos_prefix = self.grid_size, self.num_prefix_tokens
        if pos_embed_img_size is not None:
            size = to_2tuple(pos_embed_img_size)
            self.pos_grid, self.pos_prefix = (size[0] // patch_size, size[1] // patch_size), 1
            if min(self.pos_grid) < 1:
                raise ValueError(
                    f"pos_embed_img_size {pos_embed_img_size} is smaller than a patch "
                    f"({patch_size}): give the pretraining's image size, e.g. 224"
                )
        num_pos = self.pos_grid[0] * self.pos_grid[1] + self.pos_prefix
        self.pos_embed = nn.Parameter(torch.zeros(1, num_pos, embed_dim))
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # linear rule
        self.global_blocks = tuple(sorted(global_blocks))
        self.blocks = nn.ModuleList(
            [
                Block(
                    embed_dim,
                    num_heads,
                    mlp_ratio,
                    qkv_bias,
                    drop_path=dpr[i],
                    init_values=init_values,
                    norm_layer=norm_layer,
                    window_size=0 if i in self.global_blocks else window_size,
                    rel_pos=rel_pos,
                    rel_pos_size=self.grid_size,
                    class_token=class_token and rel_pos == "bias",
                    residual=i in residual_blocks,
                )
                for i in range(depth)
            ]
        )
        self.residual_blocks = tuple(sorted(set(residual_blocks)))
        self.norm = norm_layer(embed_dim)
        self.init_weights()
        route_linears(self)  # fp32 products on the CPU's faster library (same names)

    def init_weights(self) -> None:
        """MAE's init: sin-cos position table, xavier-uniform Linear and patch conv."""
        self.pos_embed.data.copy_(
            sincos_pos_embed(self.embed_dim, self.pos_grid, cls_token=self.pos_prefix == 1)
        )
        init_patch_embed(self.patch_embed.proj)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=0.02)
        self.apply(init_linear_and_norm)
        for m in self.modules():  # (their LayerNorms were just reset: the last one starts at 0)
            if isinstance(m, ResidualConvBlock):
                m.reset_parameters()

    def no_weight_decay(self) -> set:
        return {"pos_embed", "cls_token"}

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, HW]:
        """(B, C, H, W) -> tokens (B, P + h*w, D) with position added, and the grid (h, w)."""
        hw = (math.ceil(x.shape[-2] / self.patch_size), math.ceil(x.shape[-1] / self.patch_size))
        x = self.patch_embed(x)
        pos = resize_pos_embed(self.pos_embed, hw, self.pos_prefix, self.pos_grid)
        pos = pos[:, self.pos_prefix - self.num_prefix_tokens :]  # a class row, no class token
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x + pos, hw

    def _run_block(self, blk: Block, x: torch.Tensor, hw: HW) -> torch.Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(blk, x, hw, use_reentrant=False)
        return blk(x, hw)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, P + h*w, D) normalised tokens, class token first if present."""
        x, hw = self._embed(x)
        for blk in self.blocks:
            x = self._run_block(blk, x, hw)
        return self.norm(x)

    def forward_intermediates(
        self, x: torch.Tensor, indices: Sequence[int], norm: bool = False
    ) -> List[torch.Tensor]:
        """Outputs of the blocks ``indices`` (zero-based) as NCHW maps.

        Args:
            x: (B, C, H, W), any H, W (padded up to a multiple of the patch size).
            indices: block indices in ``[-depth, depth)``, in any order (the maps come in that
                order); negative values count from the end.
            norm: apply the final LayerNorm to each map.

        Returns:
            list of (B, D, ceil(H / p), ceil(W / p)).

        Raises:
            ValueError: no index, one out of range, or one of a removed block.
        """
        self._check_block_indices(indices)
        wanted = sorted({i % self.depth for i in indices})
        x, hw = self._embed(x)
        outs: Dict[int, torch.Tensor] = {}
        for i, blk in enumerate(self.blocks[: wanted[-1] + 1]):
            x = self._run_block(blk, x, hw)
            if i in wanted:
                y = self.norm(x) if norm else x
                y = y[:, self.num_prefix_tokens :]
                outs[i] = y.transpose(1, 2).reshape(y.shape[0], -1, hw[0], hw[1])
        return [outs[i % self.depth] for i in indices]

    def _check_block_indices(self, indices: Sequence[int]) -> None:
        """Refuses an empty ``indices``, one outside ``[-depth, depth)`` (which ``% depth``
        would otherwise wrap onto another block) or one of a block a pyramid removed."""
        if not len(indices):
            raise ValueError("forward_intermediates needs at least one block index, got none")
        bad = [i for i in indices if not -self.depth <= i < self.depth]
        if bad:
            raise ValueError(
                f"block indices {bad} out of range for depth {self.depth}: give indices in "
                f"[{-self.depth}, {self.depth}) (negative ones count from the end)"
            )
        kept = len(self.blocks)
        removed = [i for i in indices if i % self.depth >= kept]
        if removed:
            raise ValueError(
                f"block indices {removed} are of blocks this model no longer has: it keeps "
                f"blocks 0..{kept - 1} of {self.depth} (a pyramid removes those after its last "
                "stage)"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)


def _check_residual_blocks(blocks: Tuple, depth: int, class_token: bool) -> None:
    if not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in blocks):
        raise ValueError(f"residual_blocks must be block indices, got {list(blocks)}")
    bad = [i for i in blocks if not 0 <= i < depth]
    if bad:
        raise ValueError(f"residual_blocks {bad} out of range for depth {depth} (0..{depth - 1})")
    if blocks and class_token:
        raise ValueError(
            "residual_blocks (convolutions over the token grid) cannot be combined with a "
            "class token; use class_token=False, as ViTDet"
        )


def _check_vit_args(depth, class_token, window_size, global_blocks, rel_pos, drop_path_rate):
    if rel_pos not in REL_POS_TYPES:
        raise ValueError(f"rel_pos must be one of {REL_POS_TYPES}, got {rel_pos!r}")
    _check_global_blocks_type(global_blocks)
    bad = [i for i in global_blocks if not 0 <= i < depth]
    if bad:
        raise ValueError(f"global_blocks {bad} out of range for depth {depth} (0..{depth - 1})")
    if window_size < 0:
        raise ValueError(f"window_size must be >= 0 (0 = global attention), got {window_size}")
    if class_token and (window_size or rel_pos == "decomposed"):
        raise ValueError(
            "class_token=True cannot be combined with window attention or rel_pos='decomposed' "
            "(ViTDet has no class token: use class_token=False, a checkpoint's cls token is "
            "then dropped); with rel_pos='bias' (BEiT / mmseg) it can"
        )
    if not 0.0 <= drop_path_rate < 1.0:
        raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")


def _check_global_blocks_type(global_blocks) -> None:
    """The ViT takes block indices only: it does not know a pyramid's stage ends."""
    is_indices = isinstance(global_blocks, Iterable) and not isinstance(global_blocks, str)
    if is_indices and all(isinstance(i, numbers.Integral) for i in global_blocks):
        return
    raise ValueError(
        f"global_blocks must be block indices, e.g. (2, 5, 8, 11), or () for none, got "
        f"{global_blocks!r}; None and 'none' are the pyramid builders' values "
        "(build_vit_pyramid, MAEViTBackbone, MAEViT: None or () = the stage ends, 'none' = "
        "every block windowed)"
    )


def build_vit(norm_eps: float = 1e-6, **kwargs) -> VisionTransformer:
    """VisionTransformer with LayerNorm(eps=norm_eps), as the MAE encoder."""
    kwargs.setdefault("norm_layer", partial(nn.LayerNorm, eps=norm_eps))
    return VisionTransformer(**kwargs)
