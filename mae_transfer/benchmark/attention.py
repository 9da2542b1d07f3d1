"""Attention at the shapes of MAE pretraining: which kernel torch runs there, in which dtype,
and whether another path is faster at these short sequences.

The encoder attends over 1 + L/4 tokens (50 for ViT-B/16 at 224), the decoder over 1 + L
(197), both with 64-dim heads (32 in the 512-wide, 16-head decoder). Each path is timed
forward + backward, as training runs it (under the autocast of ``--amp``, the q, k, v a
``qkv`` projection makes under it), interleaved with the others:

- ``ours``: what our blocks run (:func:`mae_transfer.attention.attention`: written out on a
  CPU in bf16, torch's dispatch otherwise; the rule this section's numbers gave);
- ``sdpa``: ``F.scaled_dot_product_attention`` as torch dispatches it (what timm's blocks run);
- ``sdpa_<backend>``: the same, forced to one backend (math everywhere; flash, efficient and
  cuDNN on CUDA where they take the shape and dtype);
- ``explicit``: ``softmax(q k^T / sqrt(d)) v`` written out, timm's non-fused path and what the
  official code (timm 0.3.2) computed.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from mae_transfer.attention import attention, explicit_attention

from .measure import TINY, quiet_profiler, side_by_side

__all__ = ["attention_shapes", "bench_attention"]

INNER = 8  # fwd + bwd calls per timed sample: one call is well under a millisecond on GPUs


def attention_shapes(model: torch.nn.Module, mask_ratio: float = 0.75) -> List[Dict]:
    """(where, heads, tokens, head_dim, blocks) of an MAE model's encoder and decoder."""
    length = model.patch_embed.num_patches
    keep = int(length * (1 - mask_ratio))  # the official len_keep
    out = []
    for where, blocks, tokens in (
        ("encoder", model.blocks, 1 + keep),
        ("decoder", model.decoder_blocks, 1 + length),
    ):
        attn = blocks[0].attn
        out.append(
            {
                "where": where,
                "heads": attn.num_heads,
                "tokens": tokens,
                "head_dim": attn.head_dim,
                "blocks": len(blocks),
            }
        )
    return out


def _backends(device: torch.device) -> List[str]:
    names = ["MATH"]
    if device.type == "cuda":
        names += ["FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"]
    return names


def _paths(device: torch.device) -> Dict[str, Callable]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def forced(backend):
        def run(q, k, v):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v)

        return run

    paths = {"sdpa": F.scaled_dot_product_attention, "ours": attention}  # sdpa first: the reference
    for name in _backends(device):
        backend = getattr(SDPBackend, name, None)
        if backend is not None:
            paths[f"sdpa_{name.lower().replace('_attention', '')}"] = forced(backend)
    paths["explicit"] = explicit_attention
    return paths


def _kernel(fn: Callable[[], None]) -> str:
    """The attention kernel(s) one forward + backward ran, from the profiler's op names."""
    from torch.profiler import ProfilerActivity, profile

    quiet_profiler()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    keys = [e.key for e in prof.key_averages()]
    fused = sorted(
        k.replace("aten::_scaled_dot_product_", "")
        for k in keys
        if k.startswith("aten::_scaled_dot_product_") and not k.endswith("_backward")
    )
    if fused:
        return "+".join(fused)
    return "matmul + softmax" if any("softmax" in k for k in keys) else "?"


def _case(
    shape: Dict, batch: int, device: torch.device, dtype: Optional[torch.dtype], warmup, repeats
) -> List[Dict]:
    """Times every path at one shape; a path that cannot run it is reported, not timed."""
    gen = torch.Generator(device=device).manual_seed(0)
    size = (batch, shape["heads"], shape["tokens"], shape["head_dim"])
    qkv_dtype = dtype or torch.float32  # what a qkv Linear gives under autocast
    q, k, v = (
        torch.randn(size, device=device, generator=gen, dtype=qkv_dtype).requires_grad_()
        for _ in range(3)
    )
    grad = torch.randn(size, device=device, generator=gen, dtype=qkv_dtype)
    autocast = torch.autocast(device.type, dtype) if dtype is not None else contextlib.nullcontext()

    def step(path) -> Callable[[], None]:
        def run():
            for _ in range(INNER):
                with autocast:
                    out = path(q, k, v)
                torch.autograd.grad(out, (q, k, v), grad.to(out.dtype))

        return run

    steps, rows = {}, {}
    for name, path in _paths(device).items():
        try:
            with autocast:
                ref = path(q, k, v)
            kernel = _kernel(lambda p=path: step(p)())
        except RuntimeError as e:  # e.g. "No available kernel" for a forced backend
            rows[name] = {"path": name, "kernel": f"not available ({str(e).splitlines()[0][:60]})"}
            continue
        steps[name] = step(path)
        rows[name] = {"path": name, "kernel": kernel, "out_dtype": str(ref.dtype)[6:]}
    t = side_by_side(steps, warmup, repeats, device)
    out = []
    for name, row in rows.items():
        if name in steps:
            ms = t[f"{name}_median_s"] / INNER * 1e3
            row["ms_fwd_bwd_per_block"] = ms
            row["ms_per_step"] = ms * shape["blocks"]
            row["gflops"] = attention_flops(shape, batch) / ms / 1e6
            row["time_vs_sdpa"] = 1.0 if name == "sdpa" else t[f"{name}_time_ratio"]
        out.append({**shape, "batch": batch, **row})
    return out


def bench_attention(args) -> List[Dict]:
    from mae_transfer import create_model
    from mae_transfer.device import resolve_amp

    device = torch.device(args.device)
    dtype, _ = resolve_amp(args.amp, device)
    if dtype == torch.float16 and device.type != "cuda":
        dtype = None
    model = create_model(args.model, img_size=args.input_size, **(TINY if args.tiny else {}))
    rows = []
    for shape in attention_shapes(model):
        rows += _case(shape, args.batch, device, dtype, args.warmup, max(args.repeats, 5))
    precision = str(dtype or torch.float32).replace("torch.", "")
    return [{"model": args.model, "precision": precision, **r} for r in rows]


def attention_flops(shape: Dict, batch: int) -> float:
    """FLOPs of one block's attention matmuls, forward + backward (3x the forward)."""
    b, h, n, d = batch, shape["heads"], shape["tokens"], shape["head_dim"]
    return 3 * 2 * 2 * b * h * n * n * d
