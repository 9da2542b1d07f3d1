"""Slurm launcher (submitit): ``python -m pretrain.submit [launcher flags] [pretrain flags]``.

    python -m pretrain.submit --nodes 8 --ngpus 8 --partition learnfair --timeout 4320 \
        --job_dir /checkpoint/$USER/mae_large --config configs/pretrain/mae_vit_large_in1k.yaml \
        --data_path /datasets/imagenet

One task per GPU; each joins the process group via the environment submitit gives it. On
time-out or preemption the job requeues itself and resumes from
``output_dir/checkpoint-last.pth``. Everything is validated before submitting except whether
``data_path``, the k-NN folders and ``--resume`` exist, which may be mounted only on the
cluster's nodes: each task checks them when it starts. ``--cluster local`` / ``debug`` try the
set-up without Slurm. The same launcher serves every protocol: ``tools/submit.py``.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Optional, Sequence

from mae_transfer.engine.launch import exit_code, setup_logging
from mae_transfer.engine.slurm import checks_paths_here, parse_launcher, submit
from pretrain.config import load_config, validate
from pretrain.main import run

logger = logging.getLogger("pretrain.submit")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """0 once submitted (or run, for ``--cluster local / debug``); 2 for a bad config."""
    setup_logging()
    result = []

    def body():
        args, rest = parse_launcher("python -m pretrain.submit", argv, "python -m pretrain")
        cfg, _ = load_config(rest)
        validate(cfg, check_paths=checks_paths_here(args))
        if cfg.data_path and not os.path.isdir(cfg.data_path):
            logger.info(
                "data_path %s not found here: the job checks it on its nodes", cfg.data_path
            )
        result.append(submit(cfg, run, args, "mae_pretrain"))

    code = exit_code(body, logger)
    return code or result[0]


if __name__ == "__main__":
    sys.exit(main())
