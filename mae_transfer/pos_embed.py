"""Position embeddings: fixed 2D sin-cos for any patch grid, and resizing of learned tables."""

from __future__ import annotations

import logging
import math
from typing import Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

Size2 = Union[int, Sequence[int]]


def to_2tuple(x: Size2) -> Tuple[int, int]:
    """Returns ``(x, x)`` for an int and ``tuple(x)`` for a pair, rejecting anything else."""
    if isinstance(x, (int, np.integer)):
        return int(x), int(x)
    t = tuple(int(v) for v in x)
    if len(t) != 2:
        raise ValueError(f"expected an int or an (H, W) pair, got {x!r}")
    return t


def _sincos_1d(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """embed_dim: even output dim; pos: positions (M,) -> (M, embed_dim) as [sin | cos]."""
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def get_2d_sincos_pos_embed(
    embed_dim: int, grid_size: Size2, cls_token: bool = False
) -> np.ndarray:
    """Fixed 2D sin-cos embedding of a patch grid, as in MAE.

    Half of the channels encode the column (x) and half the row (y) index, which is the
    official layout, so tables built here match official checkpoints for square grids exactly.

    Args:
        embed_dim: channels, a multiple of 4.
        grid_size: ``gh`` or ``(gh, gw)`` patches.
        cls_token: prepend an all-zero row for the class token.

    Returns:
        ``(gh * gw [+ 1], embed_dim)`` float64 array, row-major over the grid.
    """
    if embed_dim % 4:
        raise ValueError(f"sin-cos position embedding needs embed_dim % 4 == 0, got {embed_dim}")
    gh, gw = to_2tuple(grid_size)
    grid_w, grid_h = np.meshgrid(np.arange(gw, dtype=np.float64), np.arange(gh, dtype=np.float64))
    emb = np.concatenate(
        [_sincos_1d(embed_dim // 2, grid_w), _sincos_1d(embed_dim // 2, grid_h)], axis=1
    )
    if cls_token:
        emb = np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)
    return emb


def sincos_pos_embed(
    embed_dim: int, grid_size: Size2, cls_token: bool = True, device=None
) -> torch.Tensor:
    """Torch version of :func:`get_2d_sincos_pos_embed`: ``(1, gh * gw [+ 1], embed_dim)`` fp32."""
    emb = get_2d_sincos_pos_embed(embed_dim, grid_size, cls_token)
    return torch.from_numpy(emb).float().unsqueeze(0).to(device)


def resize_pos_embed(
    pos_embed: torch.Tensor,
    new_grid: Size2,
    num_prefix_tokens: int = 1,
    old_grid: Size2 | None = None,
    mode: str = "bicubic",
) -> torch.Tensor:
    """Resizes a learned ``(1, P + gh*gw, D)`` position table to another grid by interpolation.

    Args:
        pos_embed: ``(1, P + L, D)`` with ``P = num_prefix_tokens`` leading rows (cls) kept as is.
        new_grid: target ``(gh, gw)``.
        old_grid: source grid; inferred as square when omitted.

    Returns:
        ``(1, P + new_gh * new_gw, D)``.
    """
    new_gh, new_gw = to_2tuple(new_grid)
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    n = grid.shape[1]
    if old_grid is None:
        side = int(math.isqrt(n))
        if side * side != n:
            raise ValueError(
                f"cannot infer the grid of a position table with {n} patch rows; pass old_grid"
            )
        old_grid = (side, side)
    old_gh, old_gw = to_2tuple(old_grid)
    if (old_gh, old_gw) == (new_gh, new_gw):
        return pos_embed
    dim = grid.shape[-1]
    grid = grid.reshape(1, old_gh, old_gw, dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new_gh, new_gw), mode=mode, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_gh * new_gw, dim).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


def resize_patch_embed_kernel(weight: torch.Tensor, new_size: Size2) -> torch.Tensor:
    """Resizes a patch-embedding conv kernel ``(D, C, kh, kw)`` to ``new_size`` (e.g. 14 -> 16).

    Bicubic interpolation of the kernel, rescaled by the ratio of areas and shifted so that each
    (output, input) kernel keeps its sum: a constant patch gives exactly the same response
    before and after, a smooth one nearly so (the idea of ViTDet's "p14to16" weights).
    """
    new_h, new_w = to_2tuple(new_size)
    kh, kw = weight.shape[-2:]
    if (kh, kw) == (new_h, new_w):
        return weight
    w = weight.float()
    out = F.interpolate(w, size=(new_h, new_w), mode="bicubic", align_corners=False)
    out = out * (kh * kw) / (new_h * new_w)
    deficit = w.sum(dim=(-2, -1), keepdim=True) - out.sum(dim=(-2, -1), keepdim=True)
    return (out + deficit / (new_h * new_w)).to(weight.dtype)


def sincos_grid(patches: torch.Tensor) -> Tuple[int, int] | None:
    """The ``(gh, gw)`` grid of a fixed 2D sin-cos table ``(1, gh * gw, D)`` (no class row), read
    from its values; None when it is not one (a learned table). A non-square grid cannot be
    told from the number of rows alone (168 = 12 x 14 = 14 x 12 = ...), but only one layout
    gives these values."""
    n, dim = patches.shape[-2], patches.shape[-1]
    if dim % 4 or n < 1:
        return None
    for gh in range(1, n + 1):
        if n % gh == 0:
            table = sincos_pos_embed(dim, (gh, n // gh), cls_token=False, device=patches.device)
            if torch.allclose(patches.reshape(1, n, dim).float(), table, atol=1e-4):
                return gh, n // gh
    return None
