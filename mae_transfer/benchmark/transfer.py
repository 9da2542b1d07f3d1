"""Transfer: the ViT pyramid backbone (global vs window attention, ViTDet's explicit bias; the
segmentation variant with and without relative-position bias) and one Mask R-CNN / UperNet
training iteration, each in the precision users train in (``--amp``, as SOLVER.AMP / --amp
auto: bf16 where the device has it natively, else fp32)."""

from __future__ import annotations

import os
from typing import Dict, List

import torch

from .measure import TINY_VIT, in_fresh_process, peak_memory_mb, timed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# the section's own fixed cases, not --model, --batch or --input_size (the rows name their
# model, batch and size, and NOTE, printed above the tables, says so)
BACKBONE = "vit_base_patch16"  # one image per step, as the README's table
ITERATIONS = {  # kind: (config, images per iteration), 128 px each
    "maskrcnn": ("configs/detectron2/demo_tiny.yaml", 4),
    "upernet": ("configs/mmseg/demo_tiny_toy-96x96.py", 8),
}
ITERATION_SIZE = 128
NOTE = (
    "Fixed cases, whatever --model, --batch and --input_size: the ViT-B backbone, forward + "
    "backward of one image (detection at 512 and 1024 px, segmentation at 512; --tiny: a "
    "shrunk ViT at 64 / 128 and 64), and one training iteration of the demo configs' Mask R-CNN "
    "and UperNet (128 px, with or without --tiny)."
)


def _autocast(dev: torch.device, amp: str):
    from mae_transfer.device import resolve_amp

    dtype, _ = resolve_amp(amp, dev)
    name = str(dtype or torch.float32).replace("torch.", "")
    return lambda: torch.autocast(dev.type, dtype, enabled=dtype is not None), name


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
    amp: str = "auto",
) -> Dict:
    from mae_transfer.pyramid import build_vit_pyramid
    from mae_transfer.vit import Attention

    dev = torch.device(device)
    kw = dict(TINY_VIT) if tiny else {}
    seg = kind == "seg"
    model = build_vit_pyramid(
        model=BACKBONE,
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
    x = torch.randn(1, 3, size, size, device=dev)  # (one image: BACKBONE's comment)

    autocast, precision = _autocast(dev, amp)

    def step():
        with autocast():
            out = model(x)
        sum(o.float().mean() for o in out).backward()
        model.zero_grad(set_to_none=True)

    mem = peak_memory_mb(step, dev)
    t = timed(step, warmup, repeats, dev)
    return {
        "backbone": kind,
        "model": BACKBONE,  # (--tiny: marked as such, as the other sections' models)
        "batch": 1,
        "input": size,
        "attention": ATTENTION_CASES[attention],
        "rel_pos": rel_pos or "none",
        "precision": precision,
        **t,
        "peak_mem_mb": mem,
    }


def _framework_iteration(kind: str, device: str, warmup: int, repeats: int, amp="auto") -> Dict:
    """One Mask R-CNN / UperNet training iteration (forward, backward, step) on small inputs."""
    dev = torch.device(device)
    if kind == "maskrcnn":
        model, batch_fn = _tiny_maskrcnn(dev)
    else:
        model, batch_fn = _tiny_upernet(dev)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    autocast, precision = _autocast(dev, amp)

    def step():
        with autocast():  # as detectron2's AMPTrainer and mmengine's AmpOptimWrapper
            losses = batch_fn()
        sum(losses.values()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    mem = peak_memory_mb(step, dev)
    t = timed(step, warmup, repeats, dev)
    config, images = ITERATIONS[kind]
    return {
        "iteration": kind,
        "config": config,
        "batch": images,
        "input": ITERATION_SIZE,
        "precision": precision,
        **t,
        "peak_mem_mb": mem,
    }


def _tiny_maskrcnn(dev):
    from detectron2.modeling import build_model
    from detectron2.structures import BitMasks, Boxes, Instances
    from detectron2.utils.events import EventStorage

    import mae_transfer.detection  # noqa: F401
    from mae_transfer.detection.train import build_cfg

    config, images = ITERATIONS["maskrcnn"]
    cfg = build_cfg(os.path.join(ROOT, config), ["MODEL.DEVICE", str(dev)])
    model = build_model(cfg).train()
    storage = EventStorage(0)

    def batch():  # (boxes and masks drawn for ITERATION_SIZE = 128)
        items = []
        for _ in range(images):
            inst = Instances((ITERATION_SIZE, ITERATION_SIZE))
            inst.gt_boxes = Boxes(torch.tensor([[10.0, 20, 60, 70], [70, 30, 120, 90]]))
            inst.gt_classes = torch.tensor([0, 2])
            masks = torch.zeros(2, ITERATION_SIZE, ITERATION_SIZE, dtype=torch.bool)
            masks[0, 20:70, 10:60] = masks[1, 30:90, 70:120] = True
            inst.gt_masks = BitMasks(masks)
            image = torch.rand(3, ITERATION_SIZE, ITERATION_SIZE) * 255
            items.append({"image": image, "instances": inst})
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
    config, images = ITERATIONS["upernet"]
    cfg = Config.fromfile(os.path.join(ROOT, config))
    model = MODELS.build(cfg.model).to(dev).train()
    hw = (ITERATION_SIZE, ITERATION_SIZE)

    def batch():
        samples = []
        for _ in range(images):
            s = SegDataSample()
            s.gt_sem_seg = PixelData(data=torch.randint(0, 5, (1, *hw), device=dev))
            s.set_metainfo({"img_shape": hw, "pad_shape": hw})
            samples.append(s)
        return model(torch.randn(images, 3, *hw, device=dev), samples, mode="loss")

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
                args.amp,
            )
            rows.append(by[attention])
        w = by["window"]
        for ref in cases:
            if ref != "window":
                w[f"time_vs_{ref}"] = w["median_s"] / by[ref]["median_s"]
                ref_mb = by[ref]["peak_mem_mb"]  # (NaN: not measured, as the ratio then)
                w[f"mem_vs_{ref}"] = w["peak_mem_mb"] / ref_mb if ref_mb > 0 else float("nan")
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
                args.amp,
            )
        )
    for kind in ("maskrcnn", "upernet"):
        rows.append(
            in_fresh_process(
                _framework_iteration, kind, args.device, args.warmup, args.repeats, args.amp
            )
        )
    return rows
