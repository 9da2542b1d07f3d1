"""Pretraining step: ours alone (throughput, FLOPs, share of the peak, memory, where the time
goes), ours side by side with the official step's re-implementation, the paper's Table 2
(mask tokens in the encoder or not) and the mask-ratio sweep."""

from __future__ import annotations

import copy
import math
from typing import Dict, List

import torch

from mae_transfer import matmul

from .measure import (
    TINY,
    fvcore_gmacs,
    in_fresh_process,
    matmul_peak,
    peak_memory_mb,
    side_by_side,
    time_breakdown,
    timed,
)


class _WithMaskTokens(torch.nn.Module):
    """The paper's ablation: the encoder sees all patches, the removed ones as a mask token."""

    def __init__(self, mae):
        super().__init__()
        self.mae = mae
        self.enc_mask_token = torch.nn.Parameter(torch.zeros(1, 1, mae.cls_token.shape[-1]))

    def forward(self, imgs, mask_ratio: float = 0.75, loss_only: bool = False):
        m = self.mae
        x = m.patch_embed(imgs) + m.pos_embed[:, 1:]
        n, length, _ = x.shape
        noise = torch.rand(n, length, device=x.device)
        keep = int(length * (1 - mask_ratio))
        mask = torch.ones(n, length, device=x.device)
        order = noise.argsort(1)
        mask.scatter_(1, order[:, :keep], 0)
        x = torch.where(mask.unsqueeze(-1).bool(), self.enc_mask_token.to(x.dtype), x)
        x = torch.cat([(m.cls_token + m.pos_embed[:, :1]).expand(n, -1, -1), x], dim=1)
        for blk in m.blocks:
            x = blk(x)
        x = m.decoder_embed(m.norm(x)) + m.decoder_pos_embed
        if loss_only:  # the decoder as training runs it (MaskedAutoencoderViT.forward)
            removed = order[:, keep:]
            return m.removed_loss(imgs, m.decode(x, removed), removed), None, mask
        pred = m.decode(x)
        return m.forward_loss(imgs, pred, mask), pred, mask


class _Loss(torch.nn.Module):
    """The loss of a training step's forward alone (what fvcore traces: no None outputs)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, imgs, mask_ratio: float):
        return self.model(imgs, mask_ratio=mask_ratio, loss_only=True)[0]


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

    dev = torch.device(device)
    amp_dtype, use_scaler = resolve_amp(amp, dev)  # as pretraining: bf16 where native, else fp32
    torch.manual_seed(0)
    model = create_model(model_name, img_size=size, norm_pix_loss=True, **(TINY if tiny else {}))
    model = (_WithMaskTokens(model) if mask_tokens else model).to(dev)
    imgs = torch.randn(batch, 3, size, size, device=dev)
    run = torch.compile(model) if compile_ else model
    update = our_update(model, dev, use_scaler)
    step = _step_fn(model, dev, amp_dtype, imgs, mask_ratio, update, run, loss_only=True)

    if compile_:  # the first step compiles: the compiler's memory is not the step's
        step()
        mem = peak_memory_mb(step, dev) + _state_mb(update.optimizer)  # + what step 1 made
    else:
        mem = peak_memory_mb(step, dev)
    peak_dtype = amp_dtype or torch.float32
    peak_before = matmul_peak(dev, peak_dtype)["gflops"]
    t = timed(step, warmup, repeats, dev)
    # this process's own ceiling, measured around the timing (shared machines drift)
    peak = max(peak_before, matmul_peak(dev, peak_dtype)["gflops"])
    shares = time_breakdown(step) if dev.type == "cpu" else {}
    target = model.mae if mask_tokens else model
    gmac = fvcore_gmacs(_Loss(model).eval(), (imgs[:1], mask_ratio))  # what the step computes
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


def _state_mb(opt: torch.optim.Optimizer) -> float:
    """Memory of an optimizer's state (AdamW's moments), allocated by its first step."""
    tensors = [t for state in opt.state.values() for t in state.values() if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


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
    """The paper's Table 2 on this machine: mask tokens skipped by the encoder (ours) or not.
    The comparison sits on the row of ours, as in the paper (it sat on the other row, which
    then read as the faster one): its speedup over the encoder with mask tokens and how many
    times the FLOPs that encoder does."""
    model = args.model if args.tiny else args.table2_model
    ours = _pretrain_row(args, model=model)
    with_tokens = _pretrain_row(args, mask_tokens=True, model=model)
    ours["speedup_of_ours"] = ours["img_s"] / with_tokens["img_s"]
    # each case ran in its own process with its own matmul peak: on a machine whose speed
    # drifts, the speedup at equal peak is the fairer figure (both are reported)
    ours["speedup_at_equal_peak"] = (ours["img_s"] / ours["matmul_peak_gflops"]) / (
        with_tokens["img_s"] / with_tokens["matmul_peak_gflops"]
    )
    ours["flop_ratio"] = with_tokens["gflop_step_per_img"] / ours["gflop_step_per_img"]
    return [ours, with_tokens]


def bench_maskratio(args) -> List[Dict]:
    return [_pretrain_row(args, mask_ratio=r) for r in (0.5, 0.6, 0.7, 0.75, 0.8, 0.9)]


def _step_fn(
    model, dev: torch.device, amp_dtype, imgs, mask_ratio: float, update, run=None, loss_only=False
):
    """One training step of ``model``: the forward of ``run`` (e.g. a compiled ``model``)
    under autocast, then ``update(loss)`` (backward and optimizer step). ``loss_only``: the
    forward as our training calls it (the decoder predicts the removed patches only)."""
    kwargs = {"loss_only": True} if loss_only else {}

    def step():
        with torch.autocast(dev.type, amp_dtype, enabled=amp_dtype is not None):
            loss, _, _ = (model if run is None else run)(imgs, mask_ratio=mask_ratio, **kwargs)
        update(loss)

    return step


def _adamw(model, **impl) -> torch.optim.AdamW:
    from mae_transfer.optim import param_groups

    return torch.optim.AdamW(
        param_groups(model.named_parameters(), 0.05), lr=1e-4, betas=(0.9, 0.95), **impl
    )


def our_update(model, dev: torch.device, fp16: bool = False):
    """Our training update, as ``EpochTrainer._update`` runs it (no clipping): the scaler of
    ``make_scaler`` (in bf16 / fp32 a scale-1 guard whose finiteness flag the fused kernel
    reads on the device), AdamW fused where torch has it, gradients freed."""
    from mae_transfer.engine.trainer import adamw_impl, make_scaler

    opt, scaler = _adamw(model, **adamw_impl(dev)), make_scaler(dev, fp16)

    def update(loss):
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    update.optimizer = opt
    return update


def official_update(model, dev: torch.device):
    """The official update, from the description of its ``engine_pretrain.py`` and
    ``util/misc.py`` (nothing copied): the loss read on the host for its finiteness check
    every step; AdamW in torch's default implementation for the device (no ``fused`` or
    ``foreach`` argument: the foreach loop on CUDA, one parameter at a time on CPU); its
    ``torch.cuda.amp.GradScaler`` (dynamic scaling on CUDA, a no-op elsewhere), ``unscale_``
    and the total gradient norm (one norm per parameter, stacked) before every step."""
    opt = _adamw(model)
    scaler = torch.amp.GradScaler(dev.type, enabled=dev.type == "cuda")
    params = list(model.parameters())

    def update(loss):
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"official step: loss is {loss.item()}")
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        grads = [p.grad.detach() for p in params if p.grad is not None]
        torch.norm(torch.stack([torch.norm(g, 2.0) for g in grads]), 2.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()

    update.optimizer = opt
    return update


def _versus_official_case(
    model_name: str,
    batch: int,
    size: int,
    mask_ratio: float,
    device: str,
    warmup: int,
    repeats: int,
    tiny: bool,
    amp: str,
    compile_: bool = False,
) -> Dict:
    """Our step and the official one's re-implementation, same weights, same precision,
    timed interleaved in one process: the ratio is robust to a shared machine's drift.
    Each step is the whole training step, its update included (``our_update``,
    ``official_update``); a third rival, the official model with our update, separates what
    the model gains from what the update gains (``speedup_model_only``); a fourth, the official
    step with its attention written out (``official_written_out``: what the official code's
    pinned timm 0.3.2 computed; today's timm runs torch's fused kernel) is the baseline as
    released. A fifth, on a CPU whose fp32 Linear layers multiply through oneDNN
    (:mod:`mae_transfer.matmul`), is ours on torch's default product: the step's gain without
    the library choice (``speedup_vs_official_default_matmul``).
    ``compile_``: ours runs ``torch.compile``d (as ``--compile`` trains), the official eager."""
    from mae_transfer import create_model
    from mae_transfer.device import resolve_amp

    from .official import OfficialMAE

    dev = torch.device(device)
    amp_dtype, use_scaler = resolve_amp(amp, dev)  # fp16 (CUDA): the official code as shipped
    if amp_dtype == torch.float16 and dev.type != "cuda":
        raise ValueError("the fp16 side-by-side step runs on CUDA (with loss scaling) only")
    torch.manual_seed(0)
    ours = create_model(model_name, img_size=size, norm_pix_loss=True, **(TINY if tiny else {}))
    official = OfficialMAE(
        img_size=size,
        patch_size=ours.patch_size,
        embed_dim=ours.cls_token.shape[-1],
        depth=len(ours.blocks),
        num_heads=ours.blocks[0].attn.num_heads,
        decoder_embed_dim=ours.mask_token.shape[-1],
        decoder_depth=len(ours.decoder_blocks),
        decoder_num_heads=ours.decoder_blocks[0].attn.num_heads,
        norm_pix_loss=True,
    )
    official.load_state_dict(ours.state_dict())
    written_out = copy.deepcopy(official)
    for blk in [*written_out.blocks, *written_out.decoder_blocks]:
        blk.attn.fused_attn = False
    ours, official, written_out = ours.to(dev), official.to(dev), written_out.to(dev)
    imgs = torch.randn(batch, 3, size, size, device=dev)
    steps = {
        "ours": _step_fn(
            ours,
            dev,
            amp_dtype,
            imgs,
            mask_ratio,
            our_update(ours, dev, use_scaler),
            run=torch.compile(ours) if compile_ else None,
            loss_only=True,
        ),
        "official": _step_fn(
            official, dev, amp_dtype, imgs, mask_ratio, official_update(official, dev)
        ),
        # the official model with our update (its own AdamW state, the same weights): the
        # ratio of the model's forward and backward alone
        "official_model": _step_fn(
            official, dev, amp_dtype, imgs, mask_ratio, our_update(official, dev, use_scaler)
        ),
        "official_written_out": _step_fn(
            written_out, dev, amp_dtype, imgs, mask_ratio, official_update(written_out, dev)
        ),
    }
    # (a compiled step keeps torch's product: mae_transfer.matmul)
    onednn = dev.type == "cpu" and amp_dtype is None and not compile_
    if onednn and matmul.cpu_linear_check()[0]:  # one step of ours: is any product routed?
        before = matmul.routed_products  # (none, e.g., in a --tiny model's small products)
        steps["ours"]()
        onednn = matmul.routed_products > before
    else:
        onednn = False
    if onednn:  # a fifth: ours with torch's default fp32 product (what the library choice adds)
        ours_default = steps["ours"]

        def default_matmul_step():
            with matmul.library("default"):
                ours_default()

        steps["ours_default_matmul"] = default_matmul_step
    t = side_by_side(steps, warmup, repeats, dev)
    extra = {}
    if onednn:
        extra = {
            "ours_default_matmul_img_s": batch / t["ours_default_matmul_median_s"],
            "speedup_vs_official_default_matmul": t["official_time_ratio"]
            / t["ours_default_matmul_time_ratio"],
        }
    return {
        "model": model_name,
        "batch": batch,
        "input": size,
        "mask_ratio": mask_ratio,
        "precision": str(amp_dtype or torch.float32).replace("torch.", ""),
        "ours_compiled": compile_,
        "ours_img_s": batch / t["ours_median_s"],
        "official_img_s": batch / t["official_median_s"],
        "ours_best_img_s": batch / t["ours_min_s"],
        "official_best_img_s": batch / t["official_min_s"],
        # the median over repeats of back-to-back ratios (not the ratio of the medians)
        "speedup_vs_official": t["official_time_ratio"],
        "speedup_best_vs_best": t["official_best_ratio"],
        "official_model_img_s": batch / t["official_model_median_s"],
        "speedup_model_only": t["official_model_time_ratio"],
        "official_written_out_img_s": batch / t["official_written_out_median_s"],
        "speedup_vs_official_written_out": t["official_written_out_time_ratio"],
        "ours_cpu_matmul": ("oneDNN" if onednn else "torch's default") if dev.type == "cpu" else "",
        **extra,
        "repeats": repeats,
    }


def bench_versus_official(args) -> List[Dict]:
    """Ours vs the official step's re-implementation, in one process, interleaved."""
    return [
        in_fresh_process(
            _versus_official_case,
            args.model,
            args.batch,
            args.input_size,
            0.75,
            args.device,
            args.warmup,
            args.repeats,
            args.tiny,
            args.amp,
            args.compile,
        )
    ]
