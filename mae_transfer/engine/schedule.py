"""The learning-rate schedule of MAE's recipes: linear warmup, then half-cycle cosine."""

from __future__ import annotations


def cosine_lr(epoch: float, cfg, base_lr: float) -> float:
    """lr at a fractional ``epoch``: linear warmup for ``cfg.warmup_epochs``, then half-cycle
    cosine to ``cfg.min_lr`` at ``cfg.epochs`` (updated per iteration, as the official code)."""
    import math

    if epoch < cfg.warmup_epochs:
        return base_lr * epoch / cfg.warmup_epochs
    span = max(cfg.epochs - cfg.warmup_epochs, 1e-12)
    progress = min((epoch - cfg.warmup_epochs) / span, 1.0)
    return cfg.min_lr + (base_lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
