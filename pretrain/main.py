"""Entry point: ``python -m pretrain [--config file.yaml] [--flag value ...]``.

Runs as one process (CPU or one GPU), under ``torchrun`` (DDP, multi-node included) or under
Slurm (see ``pretrain/submit.py``). Writes to ``output_dir``: ``config.yaml`` (resolved),
``checkpoint-last.pth`` (atomic, resumable), ``checkpoint-{epoch}.pth``, ``log.jsonl``,
TensorBoard events, and at the end ``encoder.pth`` (official encoder-only format) and
``loss_curve.png``.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Dict, Optional, Sequence

from mae_transfer.engine.launch import RESUME_HINT, exit_code, run_training, setup_logging
from mae_transfer.registry import list_models
from pretrain.config import PretrainConfig, load_config, validate
from pretrain.engine import LAST, Trainer, export_encoder
from pretrain.plots import plot_loss_curve

logger = logging.getLogger("pretrain")


def run(cfg: PretrainConfig) -> Dict[str, float]:
    """Validates ``cfg``, trains, exports the encoder and the loss curve; returns last stats."""
    return run_training(cfg, validate, Trainer, finish=lambda trainer: _finish(cfg))


def _finish(cfg: PretrainConfig) -> None:
    out = cfg.output_dir
    n = export_encoder(os.path.join(out, LAST), os.path.join(out, "encoder.pth"))
    png = plot_loss_curve(out)
    logger.info("checkpoint: %s", os.path.join(out, LAST))
    logger.info("encoder (official format, %d tensors): %s", n, os.path.join(out, "encoder.pth"))
    if png:
        logger.info("loss curve: %s", png)


def main(argv: Optional[Sequence[str]] = None) -> int:
    setup_logging()

    def body():
        cfg, args = load_config(argv)
        if args.list_models:
            print("\n".join(list_models("mae_*", include_aliases=True)))
            return
        run(cfg)

    return exit_code(body, logger, resume=RESUME_HINT)


if __name__ == "__main__":
    sys.exit(main())
