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

from mae_transfer.device import resolve_device
from mae_transfer.engine.distributed import cleanup, init_distributed
from mae_transfer.registry import list_models

from .config import ConfigError, PretrainConfig, load_config, validate
from .engine import LAST, NonFiniteLossError, Trainer, export_encoder
from .plots import plot_loss_curve

logger = logging.getLogger("pretrain")


def setup_logging(rank: int = 0) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(
        level=level, format="[%(asctime)s %(name)s] %(message)s", datefmt="%H:%M:%S", force=True
    )


def run(cfg: PretrainConfig) -> Dict[str, float]:
    """Validates ``cfg``, trains, exports the encoder and the loss curve; returns last stats."""
    validate(cfg)
    device = resolve_device(cfg.device)
    info = init_distributed(device.type, cfg.dist_url)
    setup_logging(info.rank)
    try:
        trainer = Trainer(cfg, device, info)
        stats = trainer.train()
        trainer.close()
        if info.is_main:
            _finish(cfg)
        return stats
    finally:
        cleanup(info)


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
    try:
        cfg, args = load_config(argv)
        if args.list_models:
            print("\n".join(list_models("mae_*", include_aliases=True)))
            return 0
        run(cfg)
    except (ConfigError, NonFiniteLossError) as e:
        logger.error("%s", e)
        return 2 if isinstance(e, ConfigError) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
