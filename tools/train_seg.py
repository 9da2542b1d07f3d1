#!/usr/bin/env python
"""UperNet on the MAE ViT with mmsegmentation: train (mmseg's tools/train.py conventions).

    python tools/train_seg.py configs/mmseg/upernet_mae_vit_base_8xb2-160k_ade20k-512x512.py
    torchrun --nproc_per_node 8 tools/train_seg.py CONFIG --launcher pytorch --amp bf16
    python tools/train_seg.py CONFIG --resume --work-dir work_dirs/x \
        --cfg-options model.backbone.pretrained=mae_pretrain_vit_base.pth

The backbone loads official mae_pretrain_vit_*.pth or our checkpoints directly (no conversion).
On a machine without CUDA: SyncBN becomes BN, the dist backend is gloo, and --amp auto follows
the CPU rule (bf16 with AMX / AVX512-BF16, else fp32).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mae_transfer.engine.launch import exit_code  # noqa: E402
from mae_transfer.segmentation.runner import (  # noqa: E402
    AMP_MODES,
    add_launcher_args,
    build_cfg,
    check_data,
    check_resume_fits,
    export_local_rank,
    make_runner,
    parse_cfg_options,
)

logger = logging.getLogger("train_seg")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train a segmentor (mmseg conventions)")
    p.add_argument("config", help="mmseg config file")
    p.add_argument("--work-dir", help="where logs and checkpoints go")
    p.add_argument(
        "--resume",
        action="store_true",
        help="resume from the latest checkpoint of the work dir (none there: from scratch, with "
        "a warning, so that a requeued job can pass it from its first run)",
    )
    p.add_argument(
        "--amp",
        nargs="?",
        const="auto",
        default=None,
        choices=AMP_MODES,
        help="precision, as pretraining's --amp: auto = bf16 autocast where this process's GPU "
        "(compute capability >= 8.0) or the CPU (AMX / AVX512-BF16) has native bf16, else fp32; "
        "fp16 = dynamic loss scaling (CUDA); bf16 = no loss scaling. Default: the config's `amp` "
        "(the ADE20K recipe: auto). A bare --amp means auto; it used to mean fp16 on GPUs "
        "without bf16, which now takes --amp fp16",
    )
    p.add_argument(
        "--auto-scale-lr",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="scale the lr by (GPUs x batch per GPU) / auto_scale_lr.base_batch_size "
        "(default: the config's auto_scale_lr.enable; on in the ADE20K recipe)",
    )
    p.add_argument(
        "--cfg-options",
        nargs="+",
        default=[],
        help="override config values: key=value (e.g. train_cfg.max_iters=100)",
    )
    add_launcher_args(p)
    args = p.parse_args(argv)
    export_local_rank(args)
    return args


def main(argv=None) -> int:
    """Exit code 0; 2 for a bad config value, missing data or a pretrained file that does not
    fit the backbone."""
    args = parse_args(argv)

    def body():
        cfg = build_cfg(
            args.config,
            parse_cfg_options(args.cfg_options),
            args.work_dir,
            args.launcher,
            amp=args.amp,
            auto_scale_lr=args.auto_scale_lr,
        )
        check_data(cfg, for_training=True)
        cfg.resume = args.resume
        check_resume_fits(cfg)
        make_runner(cfg).train()

    return exit_code(
        body,
        logger,
        resume="add --resume to the same command to continue from the work dir's last checkpoint",
    )


if __name__ == "__main__":
    sys.exit(main())
