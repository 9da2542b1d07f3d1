"""Entry points of fine-tuning and linear probing (``tools/finetune.py``, ``tools/linprobe.py``,
``tools/submit.py``): one process, ``torchrun`` or Slurm, training or ``--eval``."""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Dict, Optional, Sequence, Type

from mae_transfer.device import resolve_device
from mae_transfer.engine.distributed import cleanup, init_distributed, own_device
from mae_transfer.engine.launch import RESUME_HINT, exit_code, run_training, setup_logging

from .config import ClassifyConfig, FinetuneConfig, LinprobeConfig, load_config, validate
from .trainer import BEST, FinetuneTrainer, LinprobeTrainer, evaluate_checkpoint

logger = logging.getLogger("classification")

PROTOCOLS: Dict[str, Type[ClassifyConfig]] = {
    "finetune": FinetuneConfig,
    "linprobe": LinprobeConfig,
}
TRAINERS = {FinetuneConfig: FinetuneTrainer, LinprobeConfig: LinprobeTrainer}


def run(cfg: ClassifyConfig) -> Dict[str, float]:
    """Trains (or with ``cfg.eval`` only evaluates) and returns the last metrics."""
    if cfg.eval:
        return _evaluate(cfg)
    return run_training(cfg, validate, TRAINERS[type(cfg)], finish=_finish)


def _evaluate(cfg: ClassifyConfig) -> Dict[str, float]:
    validate(cfg)
    device = resolve_device(cfg.device)
    info = init_distributed(device.type, cfg.dist_url)
    device = own_device(device, info)
    setup_logging(info.rank)
    try:
        metrics = evaluate_checkpoint(cfg, device, info)
    finally:
        cleanup(info)
    if not info.is_main:
        return {}  # rank 0 reports (and prints) for all
    if cfg.output_dir:
        from mae_transfer.checkpoint import write_text_atomic
        from mae_transfer.data.transforms import hw
        from mae_transfer.engine.logger import json_safe

        path = os.path.join(cfg.output_dir, "eval.json")
        os.makedirs(cfg.output_dir, exist_ok=True)
        size = list(hw(cfg.input_size))
        record = json_safe(
            {"checkpoint": cfg.resume or cfg.finetune, "input_size": size, **metrics}
        )
        write_text_atomic(json.dumps(record, indent=1, allow_nan=False), path)
        logger.info("wrote %s", path)
    return metrics


def _finish(trainer) -> None:
    cfg = trainer.cfg
    best = os.path.join(cfg.output_dir, BEST)
    if not os.path.isfile(best) and cfg.resume:  # the best epoch came before the resume
        best = f"reached before --resume, see {os.path.join(os.path.dirname(cfg.resume), BEST)}"
    logger.info(
        "best val top-1 %.2f: %s; last: %s",
        trainer.best_acc1,
        best,
        os.path.join(cfg.output_dir, "checkpoint-last.pth"),
    )


def main(protocol: str, argv: Optional[Sequence[str]] = None, prog: str = "") -> int:
    """CLI body of ``protocol`` (``finetune`` or ``linprobe``): exit code 0, 2 for a bad
    config, 1 for a non-finite stop."""
    setup_logging()

    def body():
        cfg, _ = load_config(PROTOCOLS[protocol], argv, prog or f"tools/{protocol}.py")
        metrics = run(cfg)
        if cfg.eval and metrics:
            top5 = metrics["acc5"]
            top5 = f"{top5:.3f}" if top5 == top5 else "n/a (5 classes or fewer)"
            print(f"top-1 {metrics['acc1']:.3f}  top-5 {top5}")

    return exit_code(body, logger, resume=RESUME_HINT)


def finetune_cli() -> int:
    """The ``mae-finetune`` command (pyproject's console script): ``tools/finetune.py``."""
    return main("finetune", prog="mae-finetune")


def linprobe_cli() -> int:
    """The ``mae-linprobe`` command (pyproject's console script): ``tools/linprobe.py``."""
    return main("linprobe", prog="mae-linprobe")


def submit_main(argv: Sequence[str]) -> int:
    """``tools/submit.py PROTOCOL [launcher flags] [protocol flags]``: a Slurm job (submitit)."""
    protocols = ["pretrain", *PROTOCOLS]
    usage = f"usage: tools/submit.py {{{','.join(protocols)}}} [launcher flags] [flags]"
    if argv and argv[0] in ("-h", "--help"):
        print(
            f"{usage}\n\nSubmits pretraining, fine-tuning or linear probing as a Slurm job "
            "(submitit). `tools/submit.py PROTOCOL --help` lists the launcher flags (--nodes, "
            "--ngpus, --partition, --timeout, ...); every other flag goes to the protocol "
            "(`python -m pretrain --help`, `tools/finetune.py --help`, `tools/linprobe.py --help`)."
        )
        return 0
    if not argv or argv[0] not in protocols:
        print(usage, file=sys.stderr)
        return 2
    protocol, rest = argv[0], list(argv[1:])
    if protocol == "pretrain":
        from pretrain.submit import main as submit_pretrain

        return submit_pretrain(rest)
    from mae_transfer.engine.slurm import checks_paths_here, parse_launcher, submit

    setup_logging()

    def body():
        prog = f"tools/submit.py {protocol}"
        args, flags = parse_launcher(prog, rest, f"tools/{protocol}.py")
        cfg, _ = load_config(PROTOCOLS[protocol], flags, f"tools/submit.py {protocol}")
        validate(cfg, check_paths=checks_paths_here(args))
        submit(cfg, run, args, f"mae_{protocol}")

    return exit_code(body, logger)
