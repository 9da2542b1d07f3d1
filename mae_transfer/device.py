"""Device and precision choices, decided by what the hardware can do at run time.

One rule for ``auto`` precision, used by pretraining, detection, segmentation and the benchmark
(:func:`auto_dtype`): bf16 autocast where the device multiplies bf16 natively, fp32 elsewhere;
fp16 (with dynamic loss scaling, on CUDA and CPU) only when asked for.

- CUDA: bf16 from compute capability 8.0 (A100, H100, L4/L40, RTX 30xx and later). V100 (sm70)
  and T4 (sm75) emulate bf16: slower than fp16, and no fused attention kernel takes it.
- CPU: bf16 with AMX or AVX512-BF16 (x86), or Arm BF16 when a timed matrix multiply confirms
  it. Elsewhere bf16 is emulated and runs hundreds of times slower than fp32.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import FrozenSet, List, Optional, Tuple, Union

import torch

logger = logging.getLogger(__name__)

X86_BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})
ARM_BF16_FLAGS = frozenset({"bf16", "sve_bf16"})
_logged = set()


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda when available, else cpu; a clear error for an unavailable cuda."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        from mae_transfer.engine.config import ConfigError  # a user's choice: exit code 2

        raise ConfigError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    return device


def pin_memory_for(device: torch.device, pin_mem: bool = True) -> bool:
    """Whether a loader feeding ``device`` pins its batches (``pin_mem``: the config's switch).

    Only for a CUDA device, where it lets the copies overlap: pinning opens a CUDA context on
    the current GPU, so a CPU run on a GPU node pinning because a GPU exists would take GPU 0.
    """
    return pin_mem and device.type == "cuda"


def cuda_device_index(device: Union[torch.device, str, int, None] = None) -> int:
    """The CUDA device index of ``device`` (None or a bare 'cuda': the current device)."""
    if isinstance(device, int):
        return device
    index = torch.device(device).index if device is not None else None
    return torch.cuda.current_device() if index is None else index


def cuda_bf16_native(device: Union[torch.device, str, int, None] = None) -> bool:
    """True when the CUDA device has bf16 tensor cores: compute capability >= 8.0 (ROCm: as
    ``torch.cuda.is_bf16_supported``).

    ``torch.cuda.is_bf16_supported()`` is also True on V100 / T4 (sm70 / sm75), where bf16 is
    emulated, and probes by allocating on the current device. This reads the properties of
    ``device`` only: no allocation, so every rank may call it before its device is set.
    """
    if not torch.cuda.is_available():
        return False
    if torch.version.hip:
        return True
    return torch.cuda.get_device_properties(cuda_device_index(device)).major >= 8


def cpuinfo(*keys: str) -> List[str]:
    """The values of /proc/cpuinfo's fields named ``keys`` (e.g. "model name", one line per
    core), in order; empty when it cannot be read (not Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            fields = [ln.split(":", 1) for ln in f if ":" in ln]
    except OSError:
        return []
    return [value.strip() for key, value in fields if key.strip() in keys]


def _cpu_flags() -> Optional[FrozenSet[str]]:
    """The CPU's feature flags (torch's cpuinfo, else /proc/cpuinfo); None when unknown."""
    caps = getattr(torch.cpu, "get_capabilities", None)
    if caps is not None:
        return frozenset(k for k, v in caps().items() if v is True)
    lines = cpuinfo("flags", "Features")
    return frozenset(" ".join(lines).split()) if lines else None


def _bf16_matmul_speed_ratio(n: int = 256) -> float:
    """Time of an (n x n) bf16 matrix multiply over an fp32 one (best of 3 after a warm-up)."""
    a = torch.randn(n, n)

    def best(x: torch.Tensor) -> float:
        x @ x
        times = []
        for _ in range(3):
            start = time.perf_counter()
            x @ x
            times.append(time.perf_counter() - start)
        return min(times)

    return best(a.bfloat16()) / max(best(a), 1e-9)


@functools.cache
def cpu_bf16_check() -> Tuple[bool, str]:
    """Whether this CPU multiplies bf16 natively, and why (cached: decided once per process).

    x86: the AMX / AVX512-BF16 flags decide. Arm BF16 flags, or flags that cannot be read: a tiny
    timed matrix multiply decides (native when bf16 is at least as fast as fp32).
    """
    flags = _cpu_flags()
    if flags is not None and flags & X86_BF16_FLAGS:
        return True, "CPU has " + " and ".join(sorted(flags & X86_BF16_FLAGS))
    if flags is not None and not flags & ARM_BF16_FLAGS:
        return False, "CPU has no AMX, AVX512-BF16 or Arm BF16: bf16 would be emulated"
    ratio = _bf16_matmul_speed_ratio()
    what = "Arm BF16 flags" if flags else "CPU flags unknown"
    return ratio <= 1.0, f"{what}; timed bf16 matrix multiply {ratio:.2g}x the fp32 time"


def cpu_has_native_bf16() -> bool:
    """True when the CPU multiplies bf16 in hardware (see :func:`cpu_bf16_check`)."""
    return cpu_bf16_check()[0]


def auto_dtype(device: torch.device) -> Tuple[Optional[torch.dtype], str]:
    """What ``auto`` precision picks on ``device``: bf16 or None (fp32), and the reason."""
    if device.type == "cuda":
        index = cuda_device_index(device)
        props = torch.cuda.get_device_properties(index)
        gpu = f"{props.name} (cuda:{index}, compute capability {props.major}.{props.minor})"
        if cuda_bf16_native(index):
            return torch.bfloat16, f"{gpu} has bf16 tensor cores"
        return None, (
            f"{gpu} has no native bf16 (compute capability < 8.0 emulates it); "
            "fp16 with loss scaling uses its tensor cores: ask for it with --amp fp16"
        )
    if device.type == "cpu":
        native, why = cpu_bf16_check()
        return (torch.bfloat16 if native else None), why
    return None, f"no bf16 rule for device type {device.type!r}"


def fused_adamw_supported(device) -> bool:
    """Whether ``torch.optim.AdamW(..., fused=True)`` runs on ``device`` (a device or its
    name; probed there, once per device: bare ``"cuda"`` is the current GPU)."""
    return _fused_adamw_probe(str(torch.device(device)))


@functools.cache
def _fused_adamw_probe(device: str) -> bool:
    try:
        p = torch.nn.Parameter(torch.zeros(2, device=device))
        p.grad = torch.ones_like(p)
        torch.optim.AdamW([p], fused=True).step()
        return True
    except (RuntimeError, TypeError, ValueError):
        return False


def _log_once(level: int, message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        logger.log(level, message)


def resolve_amp(mode: str, device: torch.device) -> Tuple[Optional[torch.dtype], bool]:
    """Autocast dtype (None = fp32) and whether a GradScaler is needed.

    'auto' is bf16 where ``device`` has native bf16, else fp32 (:func:`auto_dtype`; the choice
    and its reason are logged once). 'fp16' gets loss scaling wherever GradScaler runs (CUDA
    and CPU): without it one overflowing fp16 gradient would stop the run. An explicit 'bf16'
    where it is emulated runs, with a warning that says why it is slow.
    """
    if mode == "fp32":
        return None, False
    if mode == "auto":
        dtype, why = auto_dtype(device)
        name = "bf16 autocast" if dtype is not None else "fp32"
        _log_once(logging.INFO, f"precision auto on {device.type}: {name} ({why})")
        return dtype, False
    if mode == "bf16":
        _warn_if_bf16_emulated(device)
        return torch.bfloat16, False
    if mode == "fp16":
        if device.type == "cpu":
            _log_once(logging.WARNING, "fp16 autocast on CPU is slow and gains nothing; use fp32")
        return torch.float16, device.type in ("cuda", "cpu")
    raise ValueError(f"unknown amp mode {mode!r}; expected auto, fp32, bf16 or fp16")


def _warn_if_bf16_emulated(device: torch.device) -> None:
    if device.type == "cpu" and not cpu_has_native_bf16():
        _log_once(
            logging.WARNING,
            "bf16 autocast on a CPU without native bf16 (no AMX/AVX512-BF16): matrix "
            "multiplies are emulated and run hundreds of times slower than fp32. "
            "Use fp32 or auto on this CPU (--amp fp32 / auto; detection: SOLVER.AMP.PRECISION "
            "auto).",
        )
    elif device.type == "cuda" and not cuda_bf16_native(device):
        _log_once(
            logging.WARNING,
            "bf16 autocast on a GPU of compute capability < 8.0 (V100, T4): bf16 is emulated, "
            "slower than fp16 and without fused attention. Use fp16 (--amp fp16; detection: "
            "SOLVER.AMP.PRECISION float16) or auto (fp32).",
        )
