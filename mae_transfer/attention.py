"""Which attention kernel a block runs: torch's fused ``scaled_dot_product_attention``, or the
attention written out (``softmax(q k^T * scale + mask) v``: two matrix multiplies and a softmax).

One rule, from ``tools/benchmark.py attention`` and the pretraining step (README, Benchmarks):
on a CPU computing in bf16 (autocast on AMX / AVX512-BF16 CPUs) torch's CPU flash-attention
kernel is 2-6x slower than the written-out attention at MAE's short sequences (50 tokens in
the ViT-B encoder, 197 in the decoder), and the ViT-B pretraining step runs 1.15x faster
written out; in fp32 the fused kernel is the faster one (written out: 0.8x the step). On GPUs
the fused kernels (flash, memory-efficient, cuDNN) win and never build the N x N scores, so
they keep them. Long sequences (above :data:`EXPLICIT_MAX_TOKENS`, e.g. a detection
backbone's global attention at 1024 px) keep the fused kernel on CPU too: the written-out
scores would take gigabytes.

Both paths compute the same function; they differ in rounding only (the fused CPU kernel
accumulates blockwise in fp32, the written-out one rounds the scores to bf16 before the
softmax, as timm's non-fused path and the official MAE code's timm 0.3.2 do).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["EXPLICIT_MAX_TOKENS", "attention", "explicit_attention", "explicit_attention_faster"]

EXPLICIT_MAX_TOKENS = 1024


def explicit_attention_faster(x: torch.Tensor) -> bool:
    """Whether attention over ``x`` runs faster written out than fused (see the module doc).

    ``x``: the tokens (B, N, C) or a query (B, heads, N, d); its device, sequence length and
    the precision it is computed in (autocast's, else its own dtype) decide.
    """
    if x.device.type != "cpu" or x.shape[-2] > EXPLICIT_MAX_TOKENS:
        return False
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
    return dtype == torch.bfloat16


def explicit_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """``softmax(q k^T * scale + attn_mask) v`` written out; ``scale`` defaults to 1/sqrt(d).

    The arguments mean what they mean for ``F.scaled_dot_product_attention`` (an additive float
    mask; dropout on the attention weights, applied whenever ``dropout_p`` > 0).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    attn = (q * scale) @ k.transpose(-2, -1)
    if attn_mask is not None:
        attn = attn + attn_mask
    attn = attn.softmax(dim=-1)
    if dropout_p > 0.0:
        attn = F.dropout(attn, dropout_p)
    return attn @ v


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Scaled dot-product attention on the faster path for these inputs (module doc)."""
    if explicit_attention_faster(q):
        return explicit_attention(q, k, v, attn_mask, dropout_p, scale)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale
    )
