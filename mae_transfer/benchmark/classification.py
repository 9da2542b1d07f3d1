"""Classification: the fine-tuning step (layer-decay AdamW, drop path, mixup / cutmix, soft-target
loss) and the linear probe's feature extraction (frozen encoder, eval mode, no gradient), each
in the precision training uses (``--amp``)."""

from __future__ import annotations

from typing import Dict, List

import torch

from .measure import TINY_VIT, fvcore_gmacs, in_fresh_process, matmul_peak, timed


def _encoder_name(model_name: str) -> str:
    """The encoder-only ViT of a model name (``mae_vit_base_patch16``: ``vit_base_patch16``),
    resolved first: an alias (``mae_vit_base_patch16_dec512d8b``) lost only its ``mae_`` and
    was an unknown model in the case's process."""
    from mae_transfer.registry import resolve_name

    name = resolve_name(model_name)
    return name[len("mae_") :] if name.startswith("mae_") else name


def _classification_case(
    model_name: str,
    what: str,
    batch: int,
    size: int,
    device: str,
    warmup: int,
    repeats: int,
    tiny: bool,
    amp: str = "auto",
) -> Dict:
    import torch.nn.functional as F
    from timm.data import Mixup

    from mae_transfer.classification.model import build_classifier
    from mae_transfer.device import resolve_amp
    from mae_transfer.engine.trainer import adamw_impl
    from mae_transfer.optim import param_groups

    dev = torch.device(device)
    amp_dtype, _ = resolve_amp(amp, dev)
    autocast = torch.autocast(dev.type, amp_dtype, enabled=amp_dtype is not None)
    torch.manual_seed(0)
    probe = what == "linprobe_features"
    model = build_classifier(
        _encoder_name(model_name),
        1000,
        size,
        "cls" if probe else "avg",
        probe=probe,
        drop_path_rate=0.0 if probe else 0.1,
        **(TINY_VIT if tiny else {}),
    ).to(dev)
    imgs = torch.randn(batch, 3, size, size, device=dev)
    if probe:  # what --cache_features (and every linear-probe step) runs: the frozen encoder
        model.eval()

        def step():
            with torch.no_grad(), autocast:
                model.pooled(imgs)

        passes = 1  # forward only
    else:
        opt = torch.optim.AdamW(
            param_groups(model.named_parameters(), 0.05, 0.65, model.depth), lr=1e-4,
            **adamw_impl(dev),
        )  # fmt: skip
        mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=1000)
        labels = torch.arange(batch, device=dev) % 1000

        def step():
            x, y = mixup(imgs.clone(), labels)
            with autocast:
                logits = model(x)
            loss = torch.sum(-y * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        passes = 3  # forward + backward (2x forward)
    t = timed(step, warmup, repeats, dev)
    peak = matmul_peak(dev, amp_dtype or torch.float32)["gflops"]
    gmac = fvcore_gmacs(model.eval(), (imgs[:1],))
    flops = passes * 2 * gmac * 1e9
    return {
        "model": _encoder_name(model_name),
        "what": what,
        "batch": batch,
        "input": size,
        "precision": str(amp_dtype or torch.float32).replace("torch.", ""),
        "img_s": batch / t["median_s"],
        "img_s_min": batch / t["max_s"],
        "img_s_max": batch / t["min_s"],
        "gmac_fwd_per_img": gmac,
        "achieved_gflops": flops * batch / t["median_s"] / 1e9,
        "ratio_to_peak": flops * batch / t["median_s"] / 1e9 / peak,
    }


def bench_classification(args) -> List[Dict]:
    """ViT fine-tuning step and linear-probe feature extraction (``args.model``'s encoder)."""
    return [
        in_fresh_process(
            _classification_case,
            args.model,
            what,
            args.batch,
            args.input_size,
            args.device,
            args.warmup,
            args.repeats,
            args.tiny,
            args.amp,
        )
        for what in ("finetune_step", "linprobe_features")
    ]
