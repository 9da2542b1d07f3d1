"""The `auto` precision rule (mae_transfer.device) on faked GPUs of each generation and faked CPUs
with and without native bf16; a bf16 CPU step of a tiny model."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY_MAE

from mae_transfer import create_model
from mae_transfer import device as dev
from mae_transfer.engine.config import ConfigError

# (name, compute capability) of the GPU generations users run on
GPUS = {
    "sm70": ("Tesla V100-SXM2-32GB", (7, 0)),
    "sm75": ("Tesla T4", (7, 5)),
    "sm80": ("NVIDIA A100-SXM4-80GB", (8, 0)),
    "sm90": ("NVIDIA H100 80GB HBM3", (9, 0)),
}


def fake_cuda(monkeypatch, gpu: str = "sm80", count: int = 8) -> list:
    """Makes torch.cuda report ``count`` GPUs of one generation, on a machine without CUDA.

    Returns a list that records what was touched: device indices whose properties were read,
    'current' for torch.cuda.current_device(), ('tensor', device) for torch's bf16 probe (which
    allocates on the device, as torch.cuda.is_bf16_supported() does on pre-Ampere GPUs, where it
    succeeds).
    """
    name, (major, minor) = GPUS[gpu]
    touched = []

    def properties(index=None):
        touched.append(index)
        return SimpleNamespace(name=name, major=major, minor=minor, total_memory=32 << 30)

    def current_device():
        touched.append("current")
        return 0

    def bf16_probe(device):
        touched.append(("tensor", device))
        return True  # creating a bf16 tensor works on V100 / T4 (emulated bf16)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_device_properties", properties)
    monkeypatch.setattr(torch.cuda, "current_device", current_device)
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", bf16_probe, raising=False)
    monkeypatch.setattr(torch.version, "hip", None)
    return touched


def fake_cpu(monkeypatch, flags, matmul_ratio: float = 100.0) -> list:
    """CPU feature flags (None: unreadable) and the bf16 / fp32 time of the timed check."""
    timed = []

    def ratio(n: int = 256) -> float:
        timed.append(n)
        return matmul_ratio

    monkeypatch.setattr(dev, "_cpu_flags", lambda: None if flags is None else frozenset(flags))
    monkeypatch.setattr(dev, "_bf16_matmul_speed_ratio", ratio)
    dev.cpu_bf16_check.cache_clear()
    return timed


@pytest.fixture(autouse=True)
def _fresh_decisions(monkeypatch):
    monkeypatch.setattr(dev, "_logged", set())
    dev.cpu_bf16_check.cache_clear()
    yield
    dev.cpu_bf16_check.cache_clear()  # the next test sees this machine's CPU again


@pytest.mark.parametrize(
    "gpu,expect",
    [("sm70", None), ("sm75", None), ("sm80", torch.bfloat16), ("sm90", torch.bfloat16)],
)
def test_auto_is_bf16_only_on_gpus_with_bf16_tensor_cores(monkeypatch, gpu, expect):
    """V100 / T4 emulate bf16 (torch.cuda.is_bf16_supported() says True there): auto is fp32
    on them, with fp16 + loss scaling on request; A100 / H100: bf16 without loss scaling."""
    fake_cuda(monkeypatch, gpu)
    cuda = torch.device("cuda")
    assert dev.cuda_bf16_native(cuda) is (expect is not None)
    assert dev.resolve_amp("auto", cuda) == (expect, False)
    assert dev.resolve_amp("fp16", cuda) == (torch.float16, True)
    assert dev.resolve_amp("bf16", cuda) == (torch.bfloat16, False)
    assert dev.resolve_amp("fp32", cuda) == (None, False)


def test_explicit_bf16_on_a_pre_ampere_gpu_warns(monkeypatch, caplog):
    fake_cuda(monkeypatch, "sm75")
    with caplog.at_level(logging.WARNING, logger="mae_transfer.device"):
        dev.resolve_amp("bf16", torch.device("cuda:0"))
    assert "compute capability < 8.0" in caplog.text and "--amp fp16" in caplog.text


def test_the_gpu_check_reads_only_the_given_device(monkeypatch):
    """Rank 3 asks about cuda:3 without a CUDA context or an allocation on GPU 0."""
    touched = fake_cuda(monkeypatch, "sm80")
    assert dev.cuda_bf16_native(torch.device("cuda", 3)) and dev.cuda_bf16_native(3)
    assert touched == [3, 3]


@pytest.mark.parametrize(
    "flags,ratio,native,timed",
    [
        ({"avx2", "fma3"}, 0.2, False, False),  # AMD EPYC of 2026-11-23: emulated bf16
        ({"avx2", "avx512_f", "avx512_bf16"}, 100, True, False),  # Cooper Lake, Zen 4
        ({"avx512_f", "avx512_bf16", "amx_bf16", "amx_tile"}, 100, True, False),  # Sapphire Rapids
        ({"neon", "bf16", "sve"}, 0.6, True, True),  # Arm BF16, confirmed by timing
        ({"neon", "bf16"}, 3.0, False, True),  # Arm BF16 that torch's kernels do not use
        (None, 0.5, True, True),  # flags unreadable: timing decides
        (None, 80.0, False, True),
    ],
)
def test_auto_on_cpu_follows_native_bf16(monkeypatch, flags, ratio, native, timed):
    calls = fake_cpu(monkeypatch, flags, ratio)
    cpu = torch.device("cpu")
    assert dev.resolve_amp("auto", cpu) == ((torch.bfloat16 if native else None), False)
    assert dev.cpu_has_native_bf16() is native
    assert bool(calls) is timed and len(calls) <= 1  # timed at most once (cached)
    assert dev.resolve_amp("fp16", cpu) == (torch.float16, True)  # on request; loss scaling


def test_the_choice_and_its_reason_are_logged_once(monkeypatch, caplog):
    fake_cpu(monkeypatch, {"avx512_bf16", "amx_bf16"})
    with caplog.at_level(logging.INFO, logger="mae_transfer.device"):
        for _ in range(3):
            dev.resolve_amp("auto", torch.device("cpu"))
    lines = [r.getMessage() for r in caplog.records if "precision auto" in r.getMessage()]
    assert lines == ["precision auto on cpu: bf16 autocast (CPU has amx_bf16 and avx512_bf16)"]
    fake_cuda(monkeypatch, "sm70")
    with caplog.at_level(logging.INFO, logger="mae_transfer.device"):
        dev.resolve_amp("auto", torch.device("cuda"))
    assert "Tesla V100-SXM2-32GB (cuda:0, compute capability 7.0) has no native bf16" in caplog.text


def test_an_unavailable_device_and_an_unknown_precision_are_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="'cuda:1' requested but CUDA is not available; use"):
        dev.resolve_device("cuda:1")
    assert dev.resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown amp mode 'fp8'; expected auto, fp32, bf16"):
        dev.resolve_amp("fp8", torch.device("cpu"))


def test_this_machines_cpu_check_runs_and_is_cached():
    native, why = dev.cpu_bf16_check()
    assert isinstance(native, bool) and why
    assert dev.cpu_bf16_check() == (native, why)
    # on x86 the flags decide, as the kernel lists them (on Arm, or unread, a timing decides)
    try:
        with open("/proc/cpuinfo") as f:
            flags = {w for ln in f if ln.startswith("flags") for w in ln.split(":", 1)[1].split()}
    except OSError:
        flags = set()
    if flags and not flags & dev.ARM_BF16_FLAGS:
        assert native is bool(flags & {"avx512_bf16", "amx_bf16"})


def test_bf16_cpu_step_of_a_tiny_model_is_finite():
    """A bf16 autocast training step on CPU (what auto picks on an AMX CPU) runs; loss finite."""
    torch.manual_seed(0)
    model = create_model("mae_vit_base_patch16", img_size=32, norm_pix_loss=True, **TINY_MAE)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = model.blocks[0].attn.qkv.weight.detach().clone()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, pred, _ = model(torch.randn(4, 3, 32, 32), mask_ratio=0.75)
    assert pred.dtype == torch.bfloat16  # autocast reached the decoder
    assert loss.dtype == torch.float32 and torch.isfinite(loss)  # the MAE loss stays fp32
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    opt.step()
    assert not torch.equal(before, model.blocks[0].attn.qkv.weight)


def test_every_matrix_multiply_of_a_bf16_step_runs_in_bf16():
    """Under bf16 autocast no matrix multiply of the step, forward or backward, falls back to
    fp32 (a region with autocast turned off, as code does for a loss or an attention, would
    make one), and the parameters get fp32 gradients."""
    from torch.utils._python_dispatch import TorchDispatchMode

    matmuls = {"mm", "addmm", "bmm", "baddbmm", "linear", "convolution", "convolution_backward"}

    class Dtypes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name in matmuls or "scaled_dot_product" in name:
                tensors = [a for a in args if isinstance(a, torch.Tensor)]
                if name.endswith("_backward") and "scaled_dot_product" in name:
                    tensors = tensors[:5]  # its 6th input, the log-sum-exp, is fp32 by design
                self.seen.append((name, {a.dtype for a in tensors if a.is_floating_point()}))
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    model = create_model("mae_vit_base_patch16", img_size=32, norm_pix_loss=True, **TINY_MAE)
    with Dtypes() as mode:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _, _ = model(torch.randn(2, 3, 32, 32), mask_ratio=0.75)
        loss.backward()
    names = {name for name, _ in mode.seen}
    # on a CPU in bf16 the attention is written out (two bmm), not torch's fused kernel
    assert {"addmm", "mm", "bmm"} <= names and not any("scaled_dot_product" in n for n in names)
    fp32 = [(name, d) for name, d in mode.seen if d != {torch.bfloat16}]
    assert not fp32, fp32
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)
