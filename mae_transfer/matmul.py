"""Which library multiplies a Linear layer's fp32 matrices on a CPU: torch's default (MKL's
sgemm, in the wheels torch ships) or oneDNN (which torch already runs for bf16 on CPU).

One rule (:func:`cpu_linear_check`): on x86 CPUs of another vendor than Intel, oneDNN; on
Intel CPUs and everything else, torch's default. MKL picks its code paths by vendor, oneDNN by
the instruction sets the CPU reports. Measured on an AMD EPYC (AVX512, 2 cores; README,
Benchmarks): at the ViT-B pretraining step's shapes oneDNN's product runs 1.2-1.4x MKL's for
the forward and the input gradient, while MKL's weight gradient is as fast or faster, so the
weight gradient stays with torch (``mm``). Products below :data:`MIN_MACS` multiply-adds
(the tiny models of the tests among them) keep torch's default: oneDNN's per-call overhead
makes it slower there.

Only fp32 on CPU outside autocast is routed, and never while ``torch.compile`` / ``torch.jit``
trace a model (they choose their own kernels and see plain ``linear``). Both libraries compute
the same product; they differ in rounding only. The choice is logged once; the environment
variable ``MAE_TRANSFER_CPU_MATMUL`` (``auto``, ``onednn`` or ``default``) overrides it, and
:func:`library` does so for a block of code (the benchmark times ours both ways).

Models opt in with :func:`route_linears` (their ``nn.Linear`` layers become :class:`Linear`,
whose parameters and state-dict names are unchanged); functional code calls :func:`linear`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import platform
from typing import Iterator, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .device import cpuinfo

__all__ = [
    "ENV_VAR",
    "LIBRARIES",
    "MIN_MACS",
    "Linear",
    "cpu_linear_check",
    "library",
    "linear",
    "route_linears",
    "uses_onednn",
]

logger = logging.getLogger(__name__)

ENV_VAR = "MAE_TRANSFER_CPU_MATMUL"
LIBRARIES = ("auto", "onednn", "default")
MIN_MACS = 1 << 26  # ~67M multiply-adds: a (400 x 768) x (768 x 768) product is 236M
_forced: Optional[str] = None  # set by library()
routed_products = 0  # products multiplied by oneDNN so far in this process (the benchmark reads)
_logged = False


def _check_name(name: str, what: str) -> str:
    if name not in LIBRARIES:
        raise ValueError(f"{what} must be one of {', '.join(LIBRARIES)}, got {name!r}")
    return name


def _cpu_vendor() -> Optional[str]:
    """The x86 vendor string (``GenuineIntel``, ``AuthenticAMD``, ...), None when unknown."""
    return next(iter(cpuinfo("vendor_id")), None)


def _onednn_kernel() -> bool:
    """Whether this torch has oneDNN's linear kernel (fixed for the process)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        return torch.ops.mkldnn._linear_pointwise is not None
    except (AttributeError, RuntimeError):
        return False


def _onednn_available() -> bool:
    return torch.backends.mkldnn.enabled and _onednn_kernel()


@functools.cache
def _auto_choice() -> Tuple[bool, str]:
    # (not whether oneDNN is enabled: that may change, e.g. for a while in mkldnn.flags())
    if not _onednn_kernel():
        return False, "this torch has no oneDNN linear kernel"
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return False, f"not an x86 CPU ({platform.machine()})"
    vendor = _cpu_vendor()
    if vendor is None:
        return False, "the CPU vendor is unknown"
    if vendor == "GenuineIntel":
        return False, "CPU vendor GenuineIntel: MKL's own"
    return True, f"CPU vendor {vendor}: oneDNN's fp32 product is the faster one"


def cpu_linear_check() -> Tuple[bool, str]:
    """Whether fp32 Linear layers on this CPU multiply through oneDNN, and why: the override
    of :func:`library`, else ``MAE_TRANSFER_CPU_MATMUL``, else the vendor rule (module doc)."""
    name = _forced or _check_name(os.environ.get(ENV_VAR, "auto").strip().lower(), ENV_VAR)
    if name != "auto":
        use = name == "onednn" and _onednn_available()
        origin = "library()" if _forced else f"{ENV_VAR}={name}"
        return use, origin + ("" if use or name == "default" else ", but oneDNN is unavailable")
    if not torch.backends.mkldnn.enabled:
        return False, "oneDNN is disabled (torch.backends.mkldnn.enabled)"
    return _auto_choice()


@contextlib.contextmanager
def library(name: str) -> Iterator[None]:
    """Within the block, fp32 CPU Linear layers use ``name``: 'onednn', 'default' or 'auto'."""
    global _forced
    previous, _forced = _forced, _check_name(name, "the CPU matmul library")
    try:
        yield
    finally:
        _forced = previous


def uses_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``linear(x, weight)`` runs on oneDNN: fp32 CPU tensors outside autocast and
    outside compilation / tracing, a product of at least :data:`MIN_MACS`, oneDNN chosen."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting():
        return False
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    if torch.is_autocast_enabled("cpu") or x.numel() * weight.shape[0] < MIN_MACS:
        return False
    if not torch.backends.mkldnn.enabled:  # e.g. torch.backends.mkldnn.flags(enabled=False)
        return False
    use, why = cpu_linear_check()
    global _logged
    if not _logged:
        _logged = True
        lib = "oneDNN" if use else "torch's default"
        logger.info("fp32 Linear layers on CPU: %s (%s)", lib, why)
    return use


class _OneDNNLinear(torch.autograd.Function):
    """``x @ w.T + b`` with the forward and the input gradient on oneDNN, the weight gradient
    on torch's ``mm`` (faster there: module doc). A backward that builds a graph (double
    backward) takes torch's product for the input gradient too: oneDNN's has no derivative."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        rows = x.reshape(-1, x.shape[-1])
        y = torch.ops.mkldnn._linear_pointwise(rows, weight, bias, "none", [], "")
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            if torch.is_grad_enabled():  # create_graph: oneDNN's op has no derivative of its own
                gx = g.mm(weight)
            else:
                gx = torch.ops.mkldnn._linear_pointwise(g, weight.t(), None, "none", [], "")
            gx = gx.reshape(x.shape)
        if ctx.needs_input_grad[1]:
            gw = g.t().mm(x.reshape(-1, x.shape[-1]))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g.sum(0)
        return gx, gw, gb


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None):
    """``F.linear``, multiplied by the library this CPU's fp32 runs fastest (module doc)."""
    if uses_onednn(x, weight):
        global routed_products
        routed_products += 1
        return _OneDNNLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` whose product goes through :func:`linear` (same parameters and names)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def route_linears(module: nn.Module) -> nn.Module:
    """Makes every plain ``nn.Linear`` in ``module`` a :class:`Linear` (in place; weights,
    names and hooks unchanged); returns ``module``."""
    for m in module.modules():
        if type(m) is nn.Linear:
            m.__class__ = Linear
    return module
