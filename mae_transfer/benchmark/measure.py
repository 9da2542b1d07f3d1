"""Measuring: timings with warm-up, memory peaks, the matrix-multiply peak, where a step's time
goes (profiler), FLOPs (fvcore), fresh processes, and side-by-side timing of rivals."""

from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import time
from typing import Callable, Dict, List

import torch

from mae_transfer import matmul

TINY = dict(
    embed_dim=64, depth=4, num_heads=4, decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4
)
TINY_VIT = dict(embed_dim=64, depth=4, num_heads=4)
IN_PROCESS = False  # --tiny: run cases here (smoke runs; CPU memory is then not measured)
PEAK_N = 2048  # matrix size of the peak measurement (512 with --tiny)


def timed(fn: Callable[[], None], warmup: int, repeats: int, device: torch.device) -> Dict:
    """Median / min / max seconds of ``fn`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def peak_memory_mb(fn: Callable[[], None], device: torch.device) -> float:
    """Peak memory growth while ``fn`` runs once (the first step of a fresh process).

    CUDA: peak allocated bytes. CPU: the resident-set high-water mark (VmHWM), reset just
    before by writing 5 to /proc/self/clear_refs, minus the resident set before the call;
    NaN (not measured: null in the JSON, n/a in the table) when the cases share the tool's
    process (``IN_PROCESS``, ``--tiny``): memory earlier cases freed stays resident, and the
    growth was then ~0 or a fraction of the step's, printed as if measured. ``fn`` runs anyway.
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    if IN_PROCESS:
        fn()
        return float("nan")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_mb("VmRSS")
    fn()
    return _status_mb("VmHWM") - base


def matmul_peak(device: torch.device, dtype=torch.float32, n: int = 0, repeats: int = 5) -> Dict:
    n = n or PEAK_N
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    c = torch.empty_like(a)
    # a 2048^3 product takes ~30 us (bf16) to ~1 ms (fp32) on a data-centre GPU, where a
    # launch and a sync cost ~10-20 us: several per timed sample there (one on a CPU, ~0.1 s)
    inner = 1 if device.type == "cpu" else 20

    def products():
        for _ in range(inner):
            torch.mm(a, b, out=c)

    t = timed(products, warmup=2, repeats=repeats, device=device)
    t = {k: v / inner for k, v in t.items()}  # per product
    library = "torch"
    if device.type == "cpu" and dtype == torch.float32 and matmul.cpu_linear_check()[0]:
        # our fp32 Linear layers multiply through oneDNN here: the peak is the faster library's
        b_t = b.t().contiguous()
        t_dnn = timed(
            lambda: torch.ops.mkldnn._linear_pointwise(a, b_t, None, "none", [], ""),
            warmup=2,
            repeats=repeats,
            device=device,
        )
        if t_dnn["median_s"] < t["median_s"]:
            t, library = t_dnn, "oneDNN"
    return {
        "gflops": 2 * n**3 / t["median_s"] / 1e9,
        **t,
        "n": n,
        "dtype": str(dtype),
        "library": library,
    }


# the Linear layers (mkldnn: fp32 on CPUs where mae_transfer.matmul routes them to oneDNN)
GEMM_OPS = ("aten::mm", "aten::addmm", "aten::linear", "mkldnn::_linear_pointwise")
# attention: torch's fused CPU kernel, or written out (mae_transfer.attention), whose batched
# matrix multiplies and softmax are the only bmm / softmax ops in these models
ATTENTION_OPS = (
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
    "aten::bmm",
    "aten::baddbmm",
    "aten::_softmax",
    "aten::_softmax_backward_data",
)


def _gemm_flops(key: str, shapes) -> int:
    """FLOPs of one matrix-multiply call from its recorded input shapes (0 if unknown)."""
    try:
        if key == "aten::mm":
            a, b = shapes[0], shapes[1]
        elif key == "aten::addmm":
            a, b = shapes[1], shapes[2]
        elif key == "mkldnn::_linear_pointwise":  # x (M, K) times w (N, K) transposed
            a, b = shapes[0], shapes[1][::-1]
        else:
            return 0
        batch = a[0] if len(a) == 3 else 1
        return 2 * batch * a[-2] * a[-1] * b[-1]
    except (IndexError, TypeError):
        return 0


def quiet_profiler() -> None:
    """Without CUDA, raises kineto's log threshold above everything it logs (unless
    ``KINETO_LOG_LEVEL`` is set already): every CPU-only profile of a CUDA build of torch
    printed ``ERROR: ... gpuGetDeviceCount failed with code 35`` (no driver) and two USDT
    profiler_start / profiler_stop lines to stderr, on every CPU run. Kineto reads the level
    when a process's first profile starts: call before each ``profile`` (cases run in fresh
    processes). Its numbering of levels changed between versions (ERROR 3 or 4): 99 is above
    all. With CUDA nothing is changed: kineto's messages may then be about the GPU."""
    if not torch.cuda.is_available():
        os.environ.setdefault("KINETO_LOG_LEVEL", "99")


def time_breakdown(fn: Callable[[], None]) -> Dict[str, float]:
    """Where one call of ``fn`` spends its time (torch profiler, self time per op): matrix
    multiplies, attention kernels, the optimizer, and everything else (norms, GELU, copies...);
    and the FLOP rate inside the matrix multiplies alone (the ceiling for the whole step)."""
    from torch.profiler import ProfilerActivity, profile

    quiet_profiler()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    gemm = sum(e.self_cpu_time_total for e in events if e.key in GEMM_OPS)
    attn = sum(e.self_cpu_time_total for e in events if e.key in ATTENTION_OPS)
    opt = next((e.cpu_time_total for e in events if e.key.startswith("Optimizer.step")), 0.0)
    flops = us = 0
    for e in prof.key_averages(group_by_input_shape=True):
        f = _gemm_flops(e.key, e.input_shapes)
        if f:
            flops += f * e.count
            us += e.self_cpu_time_total
    return {
        "share_gemm": gemm / total,
        "share_attention": attn / total,
        "share_optimizer": opt / total,
        "share_other": max(0.0, 1 - (gemm + attn + opt) / total),
        "gemm_gflops": flops / us / 1e3 if us else float("nan"),  # the Linear layers' rate
    }


def _sdpa_macs(inputs, outputs) -> int:
    """fvcore has no handle for fused attention: q @ k^T and attn @ v, B*heads*L*S*(E + Ev)."""
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(x) for x in inputs[:3])
    *batch, length, dim = q
    n = 1
    for b in batch:
        n *= b
    return n * length * k[-2] * (dim + v[-1])


def fvcore_gmacs(model: torch.nn.Module, inputs: tuple) -> float:
    """Forward multiply-adds per call (billions), attention matmuls included."""
    from fvcore.nn import FlopCountAnalysis

    fca = FlopCountAnalysis(model, inputs)
    fca.set_op_handle("aten::scaled_dot_product_attention", _sdpa_macs)
    fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    return fca.total() / 1e9


def in_fresh_process(fn: Callable, *args):
    """Runs ``fn(*args)`` in a spawned process (clean memory peak); returns its result."""
    if IN_PROCESS:
        return fn(*args)
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(fn, args)


def side_by_side(fns: Dict[str, Callable[[], None]], warmup: int, repeats: int, device) -> Dict:
    """Times rivals interleaved (A B, then B A, ...) so that a shared machine's drift hits all
    alike. Returns per name its median and best (minimum) seconds and, for every name after the
    first, two ratios to the first: ``time_ratio``, the median over repeats of back-to-back
    ratios, and ``best_ratio``, the ratio of the minima (each rival's least-disturbed run)."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: Dict[str, List[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            _sync(device)
            t = time.perf_counter()
            fns[name]()
            _sync(device)
            times[name].append(time.perf_counter() - t)
    out = {}
    for n in names:
        out[f"{n}_median_s"], out[f"{n}_min_s"] = statistics.median(times[n]), min(times[n])
    first = times[names[0]]
    for n in names[1:]:
        out[f"{n}_time_ratio"] = statistics.median(t / f for t, f in zip(times[n], first))
        out[f"{n}_best_ratio"] = min(times[n]) / min(first)
    return out


def per_item_best(fns: Dict[str, Callable[[int], None]], n: int, repeats: int) -> Dict[str, float]:
    """Seconds per rival to process items 0..n-1, each item's time the best of ``repeats``
    (rivals interleaved item by item: on a shared machine a burst of load then spoils one
    item's try, not a whole pass of one rival)."""
    names = list(fns)
    best = {name: [float("inf")] * n for name in names}
    for r in range(repeats):
        for i in range(n):
            for name in names if (r + i) % 2 == 0 else names[::-1]:
                t = time.perf_counter()
                fns[name](i)
                best[name][i] = min(best[name][i], time.perf_counter() - t)
    return {name: sum(v) for name, v in best.items()}
