"""Device and precision choices that are right on CPUs without native bf16 as well as on GPUs."""

from __future__ import annotations

import functools
import logging
from typing import Optional, Tuple

import torch

logger = logging.getLogger(__name__)


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda when available, else cpu; a clear error for an unavailable cuda."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    return device


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True when the CPU multiplies bf16 in hardware (AVX512-BF16 or AMX).

    Without it, bf16 matrix multiplies are emulated and run hundreds of times slower than fp32
    (measured 0.2-0.7 vs ~69 GFLOP/s on an AVX2 machine).
    """
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        return "AMX" in torch.backends.cpu.get_cpu_capability().upper()


@functools.cache
def fused_adamw_supported(device_type: str) -> bool:
    """Whether ``torch.optim.AdamW(..., fused=True)`` runs on this device type."""
    try:
        p = torch.nn.Parameter(torch.zeros(2, device=device_type))
        p.grad = torch.ones_like(p)
        torch.optim.AdamW([p], fused=True).step()
        return True
    except (RuntimeError, TypeError, ValueError):
        return False


def resolve_amp(mode: str, device: torch.device) -> Tuple[Optional[torch.dtype], bool]:
    """Autocast dtype (None = fp32) and whether a GradScaler is needed.

    'auto' is bf16 on CUDA with bf16 support (fp16 + scaler on older GPUs) and fp32 on CPU.
    An explicit 'bf16' on a CPU without native bf16 runs, with a warning that says why it is slow.
    """
    if mode == "fp32":
        return None, False
    if mode == "auto":
        if device.type != "cuda":
            return None, False
        mode = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if mode == "bf16":
        if device.type == "cpu" and not cpu_has_native_bf16():
            logger.warning(
                "bf16 autocast on a CPU without native bf16 (no AVX512-BF16/AMX): matrix "
                "multiplies are emulated and run hundreds of times slower than fp32. "
                "Use --amp fp32 on this CPU."
            )
        return torch.bfloat16, False
    if mode == "fp16":
        if device.type == "cpu":
            logger.warning("fp16 autocast on CPU is slow and gains nothing; use --amp fp32")
        return torch.float16, device.type == "cuda"
    raise ValueError(f"unknown amp mode {mode!r}; expected auto, fp32, bf16 or fp16")
