#!/usr/bin/env python
"""Benchmarks: how close pretraining and transfer run to this machine's limit.

    python tools/benchmark.py all --json bench.json            # everything (~30 min on 2 cores)
    python tools/benchmark.py pretrain --model mae_vit_base_patch16 --batch 8
    python tools/benchmark.py table2 | maskratio | data | transfer | matmul
    python tools/benchmark.py pretrain --tiny --repeats 2       # seconds (what the tests run)

Every timing has a warm-up, then ``--repeats`` runs; the median and the spread (min-max) are
reported. FLOPs come from fvcore (multiply-adds x 2; backward counted as twice the forward).
"Peak" is the fp32 matrix-multiply rate measured in the same run, so ratios compare like with
like. Memory is the growth of the process's peak resident set (CPU) or CUDA's peak allocation
during the measured step, each case in a fresh process. A markdown table goes to stdout;
``--json`` writes every number.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Callable, Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

TINY = dict(
    embed_dim=64, depth=4, num_heads=4, decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4
)
TINY_VIT = dict(embed_dim=64, depth=4, num_heads=4)


# -- measuring ------------------------------------------------------------------------------
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
    before by writing 5 to /proc/self/clear_refs, minus the resident set before the call.
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_mb("VmRSS")
    fn()
    return _status_mb("VmHWM") - base


PEAK_N = 2048  # matrix size of the peak measurement


def matmul_peak(device: torch.device, dtype=torch.float32, n: int = 0, repeats: int = 5) -> Dict:
    n = n or PEAK_N
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = timed(lambda: a @ b, warmup=2, repeats=repeats, device=device)
    return {"gflops": 2 * n**3 / t["median_s"] / 1e9, **t, "n": n, "dtype": str(dtype)}


GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::linear")
ATTENTION_OPS = (
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
)


def _gemm_flops(key: str, shapes) -> int:
    """FLOPs of one matrix-multiply call from its recorded input shapes (0 if unknown)."""
    try:
        if key in ("aten::mm", "aten::bmm"):
            a, b = shapes[0], shapes[1]
        elif key in ("aten::addmm", "aten::baddbmm"):
            a, b = shapes[1], shapes[2]
        else:
            return 0
        batch = a[0] if len(a) == 3 else 1
        return 2 * batch * a[-2] * a[-1] * b[-1]
    except (IndexError, TypeError):
        return 0


def time_breakdown(fn: Callable[[], None]) -> Dict[str, float]:
    """Where one call of ``fn`` spends its time (torch profiler, self time per op): matrix
    multiplies, attention kernels, the optimizer, and everything else (norms, GELU, copies...);
    and the FLOP rate inside the matrix multiplies alone (the ceiling for the whole step)."""
    from torch.profiler import ProfilerActivity, profile

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
        "gemm_gflops": flops / us / 1e3 if us else float("nan"),
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


IN_PROCESS = False  # --tiny: run cases here (smoke runs; memory figures are then approximate)


def in_fresh_process(fn: Callable, *args):
    """Runs ``fn(*args)`` in a spawned process (clean memory peak); returns its result."""
    if IN_PROCESS:
        return fn(*args)
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(fn, args)


# -- pretraining ----------------------------------------------------------------------------
class _WithMaskTokens(torch.nn.Module):
    """The paper's ablation: the encoder sees all patches, the removed ones as a mask token."""

    def __init__(self, mae):
        super().__init__()
        self.mae = mae
        self.enc_mask_token = torch.nn.Parameter(torch.zeros(1, 1, mae.cls_token.shape[-1]))

    def forward(self, imgs, mask_ratio: float = 0.75):
        m = self.mae
        x = m.patch_embed(imgs) + m.pos_embed[:, 1:]
        n, length, _ = x.shape
        noise = torch.rand(n, length, device=x.device)
        keep = int(length * (1 - mask_ratio))
        mask = torch.ones(n, length, device=x.device)
        mask.scatter_(1, noise.argsort(1)[:, :keep], 0)
        x = torch.where(mask.unsqueeze(-1).bool(), self.enc_mask_token.to(x.dtype), x)
        x = torch.cat([(m.cls_token + m.pos_embed[:, :1]).expand(n, -1, -1), x], dim=1)
        for blk in m.blocks:
            x = blk(x)
        x = m.decoder_embed(m.norm(x)) + m.decoder_pos_embed
        for blk in m.decoder_blocks:
            x = blk(x)
        pred = m.decoder_pred(m.decoder_norm(x))[:, 1:]
        return m.forward_loss(imgs, pred, mask), pred, mask


def _pretrain_case(
    model_name: str,
    batch: int,
    size: int,
    mask_ratio: float,
    device: str,
    warmup: int,
    repeats: int,
    mask_tokens: bool,
    tiny: bool,
    compile_: bool,
    amp: str = "auto",
) -> Dict:
    from mae_transfer import create_model
    from mae_transfer.device import resolve_amp
    from mae_transfer.engine.trainer import adamw_impl
    from mae_transfer.optim import param_groups

    dev = torch.device(device)
    amp_dtype, use_scaler = resolve_amp(amp, dev)  # as pretraining: bf16 on CUDA, fp32 on CPU
    scaler = torch.amp.GradScaler(dev.type) if use_scaler else None
    torch.manual_seed(0)
    model = create_model(model_name, img_size=size, norm_pix_loss=True, **(TINY if tiny else {}))
    model = (_WithMaskTokens(model) if mask_tokens else model).to(dev)
    opt = torch.optim.AdamW(
        param_groups(model.named_parameters(), 0.05),
        lr=1e-4,
        betas=(0.9, 0.95),
        **adamw_impl(dev),
    )
    run = torch.compile(model) if compile_ else model
    imgs = torch.randn(batch, 3, size, size, device=dev)

    def step():
        with torch.autocast(dev.type, amp_dtype, enabled=amp_dtype is not None):
            loss, _, _ = run(imgs, mask_ratio=mask_ratio)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        opt.zero_grad(set_to_none=True)

    mem = peak_memory_mb(step, dev)
    peak_dtype = amp_dtype or torch.float32
    peak_before = matmul_peak(dev, peak_dtype)["gflops"]
    t = timed(step, warmup, repeats, dev)
    # this process's own ceiling, measured around the timing (shared machines drift)
    peak = max(peak_before, matmul_peak(dev, peak_dtype)["gflops"])
    shares = time_breakdown(step) if dev.type == "cpu" else {}
    target = model.mae if mask_tokens else model
    gmac = fvcore_gmacs(model.eval(), (imgs[:1], mask_ratio))
    model.train()
    flops = 3 * 2 * gmac * 1e9  # forward + backward (2x forward) per image
    return {
        "model": model_name,
        "batch": batch,
        "input": size,
        "mask_ratio": mask_ratio,
        "mask_tokens_in_encoder": mask_tokens,
        "precision": str(peak_dtype).replace("torch.", ""),
        "img_s": batch / t["median_s"],
        "img_s_min": batch / t["max_s"],
        "img_s_max": batch / t["min_s"],
        **t,
        "gmac_fwd_per_img": gmac,
        "gflop_step_per_img": flops / 1e9,
        "achieved_gflops": flops * batch / t["median_s"] / 1e9,
        "matmul_peak_gflops": peak,
        "ratio_to_peak": flops * batch / t["median_s"] / 1e9 / peak,
        "gemm_ratio_to_peak": shares.get("gemm_gflops", float("nan")) / peak,
        "peak_mem_mb": mem,
        "params_m": sum(p.numel() for p in target.parameters()) / 1e6,
        **shares,
    }


def _pretrain_row(args, mask_ratio=0.75, mask_tokens=False, compile_=False, model=None) -> Dict:
    """One pretraining-step case of ``args``' model, batch and size, in a fresh process."""
    return in_fresh_process(
        _pretrain_case,
        model or args.model,
        args.batch,
        args.input_size,
        mask_ratio,
        args.device,
        args.warmup,
        args.repeats,
        mask_tokens,
        args.tiny,
        compile_,
        args.amp,
    )


def bench_pretrain(args) -> List[Dict]:
    return [_pretrain_row(args, compile_=args.compile)]


def bench_table2(args) -> List[Dict]:
    """The paper's Table 2 on this machine: mask tokens skipped by the encoder (ours) or not."""
    model = args.model if args.tiny else args.table2_model
    ours = _pretrain_row(args, model=model)
    with_tokens = _pretrain_row(args, mask_tokens=True, model=model)
    with_tokens["speedup_of_ours"] = ours["img_s"] / with_tokens["img_s"]
    # each case ran in its own process with its own matmul peak: on a machine whose speed
    # drifts, the speedup at equal peak is the fairer figure (both are reported)
    with_tokens["speedup_at_equal_peak"] = (ours["img_s"] / ours["matmul_peak_gflops"]) / (
        with_tokens["img_s"] / with_tokens["matmul_peak_gflops"]
    )
    with_tokens["flop_ratio"] = with_tokens["gflop_step_per_img"] / ours["gflop_step_per_img"]
    return [ours, with_tokens]


def bench_maskratio(args) -> List[Dict]:
    return [_pretrain_row(args, mask_ratio=r) for r in (0.5, 0.6, 0.7, 0.75, 0.8, 0.9)]


# -- data loading ---------------------------------------------------------------------------
def bench_data(args) -> List[Dict]:
    import numpy as np
    from PIL import Image
    from torch.utils.data import DataLoader

    from mae_transfer.data import ResumableDistributedSampler, collate
    from pretrain.data import PretrainDataset

    rows = []
    with tempfile.TemporaryDirectory() as d:
        rng = np.random.default_rng(0)
        n = 64 if args.tiny else 256
        for i in range(n):  # ImageNet-like JPEGs (500 x 375)
            arr = (rng.random((375, 500, 3)) * 255).astype(np.uint8)
            Image.fromarray(arr).save(os.path.join(d, f"{i:04d}.jpg"), quality=90)
        ds = PretrainDataset(d, args.input_size, (args.input_size // 16) ** 2)
        for workers in sorted({0, 1, os.cpu_count() or 1}):
            sampler = ResumableDistributedSampler(len(ds), 32)
            loader = DataLoader(
                ds,
                batch_size=32,
                sampler=sampler,
                num_workers=workers,
                collate_fn=collate,
                persistent_workers=workers > 0,
            )

            def epoch(loader=loader):
                for _ in loader:
                    pass

            t = timed(epoch, 1, args.repeats, torch.device("cpu"))
            imgs = sampler.batches_per_epoch * 32
            rows.append({"workers": workers, "img_s": imgs / t["median_s"], **t})
    return rows


# -- transfer backbones ---------------------------------------------------------------------
ATTENTION_CASES = {
    "global": "global",
    "window": "window 14 + 4 global",
    "vitdet": "global, N x N bias (ViTDet's way)",
}


def _det_backbone_case(
    size: int,
    attention: str,
    tiny: bool,
    device: str,
    warmup: int,
    repeats: int,
    rel_pos: str,
    kind: str,
) -> Dict:
    from mae_transfer.pyramid import build_vit_pyramid
    from mae_transfer.vit import Attention

    dev = torch.device(device)
    kw = dict(TINY_VIT) if tiny else {}
    seg = kind == "seg"
    model = build_vit_pyramid(
        model="vit_base_patch16",
        img_size=size,
        norm="BN" if seg else "LN",
        stage_split="seg" if seg else "equal",
        window_size=14 if attention == "window" else 0,
        rel_pos=rel_pos or None,
        **kw,
    ).to(dev)
    for m in model.modules():
        if isinstance(m, Attention):  # ViTDet's way: the explicit (N x N) bias, not folded
            m.fold_rel_pos = attention != "vitdet"
    x = torch.randn(1, 3, size, size, device=dev)

    def step():
        sum(o.float().mean() for o in model(x)).backward()
        model.zero_grad(set_to_none=True)

    mem = peak_memory_mb(step, dev)
    t = timed(step, warmup, repeats, dev)
    return {
        "backbone": kind,
        "input": size,
        "attention": ATTENTION_CASES[attention],
        "rel_pos": rel_pos or "none",
        **t,
        "peak_mem_mb": mem,
    }


def _framework_iteration(kind: str, device: str, warmup: int, repeats: int) -> Dict:
    """One Mask R-CNN / UperNet training iteration (forward, backward, step) on small inputs."""
    dev = torch.device(device)
    if kind == "maskrcnn":
        model, batch_fn = _tiny_maskrcnn(dev)
    else:
        model, batch_fn = _tiny_upernet(dev)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        losses = batch_fn()
        sum(losses.values()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    mem = peak_memory_mb(step, dev)
    t = timed(step, warmup, repeats, dev)
    return {"iteration": kind, **t, "peak_mem_mb": mem}


def _tiny_maskrcnn(dev):
    from detectron2.modeling import build_model
    from detectron2.structures import BitMasks, Boxes, Instances
    from detectron2.utils.events import EventStorage

    import mae_transfer.detection  # noqa: F401
    from mae_transfer.detection.train import build_cfg

    cfg = build_cfg(
        os.path.join(ROOT, "configs", "detectron2", "demo_tiny.yaml"), ["MODEL.DEVICE", dev.type]
    )
    model = build_model(cfg).train()
    storage = EventStorage(0)

    def batch():
        items = []
        for _ in range(4):
            inst = Instances((128, 128))
            inst.gt_boxes = Boxes(torch.tensor([[10.0, 20, 60, 70], [70, 30, 120, 90]]))
            inst.gt_classes = torch.tensor([0, 2])
            masks = torch.zeros(2, 128, 128, dtype=torch.bool)
            masks[0, 20:70, 10:60] = masks[1, 30:90, 70:120] = True
            inst.gt_masks = BitMasks(masks)
            items.append({"image": torch.rand(3, 128, 128) * 255, "instances": inst})
        with storage:
            return model(items)

    return model, batch


def _tiny_upernet(dev):
    from mmengine.config import Config
    from mmengine.structures import PixelData
    from mmseg.registry import MODELS
    from mmseg.structures import SegDataSample
    from mmseg.utils import register_all_modules

    import mae_transfer.segmentation  # noqa: F401

    register_all_modules()
    cfg = Config.fromfile(os.path.join(ROOT, "configs", "mmseg", "demo_tiny_toy-96x96.py"))
    model = MODELS.build(cfg.model).to(dev).train()

    def batch():
        samples = []
        for _ in range(8):
            s = SegDataSample()
            s.gt_sem_seg = PixelData(data=torch.randint(0, 5, (1, 128, 128), device=dev))
            s.set_metainfo({"img_shape": (128, 128), "pad_shape": (128, 128)})
            samples.append(s)
        return model(torch.randn(8, 3, 128, 128, device=dev), samples, mode="loss")

    def losses():
        return {k: v for k, v in batch().items() if "loss" in k}

    return model, losses


def bench_transfer(args) -> List[Dict]:
    rows = []
    sizes = (64, 128) if args.tiny else (512, 1024)
    for size in sizes:
        # ViTDet's way only at the largest size, the one the memory target is about (14 GB there)
        cases = ("global", "window", "vitdet") if size == sizes[-1] else ("global", "window")
        by = {}
        for attention in cases:
            by[attention] = in_fresh_process(
                _det_backbone_case,
                size,
                attention,
                args.tiny,
                args.device,
                args.warmup,
                args.repeats,
                "decomposed",
                "det",
            )
            rows.append(by[attention])
        w = by["window"]
        for ref in cases:
            if ref != "window":
                w[f"time_vs_{ref}"] = w["median_s"] / by[ref]["median_s"]
                w[f"mem_vs_{ref}"] = w["peak_mem_mb"] / max(by[ref]["peak_mem_mb"], 1e-9)
    seg_size = 64 if args.tiny else 512
    for rel in ("", "bias"):
        rows.append(
            in_fresh_process(
                _det_backbone_case,
                seg_size,
                "global",
                args.tiny,
                args.device,
                args.warmup,
                args.repeats,
                rel,
                "seg",
            )
        )
    for kind in ("maskrcnn", "upernet"):
        rows.append(
            in_fresh_process(_framework_iteration, kind, args.device, args.warmup, args.repeats)
        )
    return rows


# -- reporting ------------------------------------------------------------------------------
def machine(device: torch.device) -> Dict:
    from mae_transfer.device import cpu_has_native_bf16

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": cpu_has_native_bf16(),
        "device": str(device),
    }
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        info["cpu"] = names[0] if names else info["cpu"]
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def markdown(results: Dict) -> str:
    out = [f"machine: {json.dumps(results['machine'])}", ""]
    p = results["matmul"]
    out.append(
        f"fp32 matmul peak: {p['fp32']['gflops']:.1f} GFLOP/s"
        + (f"; bf16: {p['bf16']['gflops']:.2f} GFLOP/s" if "bf16" in p else "")
    )
    for section, rows in results.items():
        if section in ("machine", "matmul") or not rows:
            continue
        out += ["", f"### {section}", ""]
        keys = [k for k in rows[0] if not k.endswith(("min_s", "max_s"))]
        for r in rows[1:]:
            keys += [k for k in r if k not in keys and not k.endswith(("min_s", "max_s"))]
        out.append("| " + " | ".join(keys) + " |")
        out.append("|" + "---|" * len(keys))
        for r in rows:
            out.append("| " + " | ".join(_fmt(r.get(k, "")) for k in keys) + " |")
    return "\n".join(out)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


SECTIONS = {
    "pretrain": bench_pretrain,
    "table2": bench_table2,
    "maskratio": bench_maskratio,
    "data": bench_data,
    "transfer": bench_transfer,
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("what", choices=[*SECTIONS, "matmul", "all"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="mae_vit_base_patch16")
    p.add_argument(
        "--table2_model",
        default="mae_vit_large_patch16",
        help="model of the table2 comparison (the paper's Table 2 is ViT-L)",
    )
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--input_size", type=int, default=224)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tiny", action="store_true", help="tiny models and inputs (a smoke run)")
    p.add_argument("--compile", action="store_true", help="torch.compile the pretraining model")
    p.add_argument(
        "--amp",
        default="auto",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="pretraining precision, as in pretraining: auto = bf16 where the device has native "
        "bf16 (GPUs of compute capability >= 8.0, CPUs with AMX / AVX512-BF16), else fp32 "
        "(ratio_to_peak is then against a matrix multiply in that precision)",
    )
    p.add_argument("--json", default=None, help="write all numbers here")
    args = p.parse_args(argv)
    if args.tiny:
        global IN_PROCESS, PEAK_N
        args.input_size = min(args.input_size, 64)
        IN_PROCESS, PEAK_N = True, 512
    device = torch.device(args.device)
    results: Dict = {"machine": machine(device), "matmul": {"fp32": matmul_peak(device)}}
    from mae_transfer.device import cuda_bf16_native

    if device.type == "cpu" or cuda_bf16_native(device):
        results["matmul"]["bf16"] = matmul_peak(
            device, torch.bfloat16, n=512 if device.type == "cpu" else 2048, repeats=2
        )
    for name in SECTIONS if args.what == "all" else ([args.what] if args.what != "matmul" else []):
        results[name] = SECTIONS[name](args)
    print(markdown(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
