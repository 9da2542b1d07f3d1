"""Pictures of a pretraining run."""

from __future__ import annotations

import json
import logging
import os
from typing import Optional

logger = logging.getLogger(__name__)


def plot_loss_curve(output_dir: str, path: Optional[str] = None) -> Optional[str]:
    """Plots the iteration losses of ``output_dir/log.jsonl`` to a PNG; returns its path."""
    log = os.path.join(output_dir, "log.jsonl")
    if not os.path.isfile(log):
        return None
    with open(log) as f:
        records = [json.loads(line) for line in f if line.strip()]
    points = sorted((r["epoch"], r["loss"]) for r in records if "loss" in r and "step" in r)
    if not points:
        return None
    try:
        import matplotlib
    except ImportError:
        logger.warning(
            "matplotlib is not installed: no loss curve picture (log.jsonl holds the losses); "
            "pip install matplotlib, or mae-transfer[train], to have it"
        )
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs, losses = zip(*points)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(epochs, losses, lw=1.2)
    ax.set_xlabel("epoch")
    ax.set_ylabel("reconstruction loss (masked patches)")
    ax.set_title("MAE pretraining")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = path or os.path.join(output_dir, "loss_curve.png")
    fig.savefig(path)
    plt.close(fig)
    return path
