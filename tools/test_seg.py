#!/usr/bin/env python
"""Evaluate a segmentor checkpoint (mIoU with mmseg's IoUMetric), mmseg's tools/test.py style.

python tools/test_seg.py CONFIG CHECKPOINT [--work-dir DIR] [--out metrics.json] \\
    [--tta [--tta-ratios R ...] [--tta-no-flip]] [--pred-dir DIR] [--show-dir DIR] \\
    [--cfg-options k=v ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mae_transfer.engine.config import ConfigError  # noqa: E402
from mae_transfer.engine.launch import exit_code, refuse_folder  # noqa: E402
from mae_transfer.segmentation.runner import (  # noqa: E402
    add_launcher_args,
    export_local_rank,
    parse_cfg_options,
)
from mae_transfer.segmentation.testing import evaluate_segmentor  # noqa: E402

logger = logging.getLogger("test_seg")


def prepare_out(out: str) -> None:
    """Prepares ``--out`` before the evaluation (a bad one failed only once it was over): a
    folder is refused (as pretrain.export and convert_to_detectron2 refuse one), a missing
    folder is made.

    Raises:
        ConfigError: a folder, or a folder that cannot be made.
    """
    refuse_folder(out, "--out", "metrics.json")
    try:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot make its folder: {e}") from e


def main(argv=None) -> int:
    """Exit code 0; 2 for a bad config value, missing data, a folder as --out, or a checkpoint
    that does not fill the model of CONFIG (as trained: give the same --cfg-options)."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("config")
    p.add_argument("checkpoint", help="a trained segmentor (iter_N.pth), every weight of it")
    p.add_argument("--work-dir")
    p.add_argument("--cfg-options", nargs="+", default=[], help="key=value overrides")
    p.add_argument("--out", help="write the metrics as JSON to this file (its folder is made)")
    p.add_argument(
        "--tta",
        action="store_true",
        help="multi-scale + flip test ('ms+flip'): the test resize at each --tta-ratios of its "
        "scale, each also flipped, softmax averaged",
    )
    p.add_argument(
        "--tta-ratios",
        type=float,
        nargs="+",
        help="scales of the test resize for --tta (default: the config's img_ratios, else "
        "0.5 0.75 1.0 1.25 1.5 1.75)",
    )
    p.add_argument("--tta-no-flip", action="store_true", help="--tta without the flipped copies")
    p.add_argument(
        "--pred-dir",
        help="also write each prediction as an 8-bit label PNG named as its image (ADE20K's "
        "numbering where the data set reduces the zero label, as its server takes them)",
    )
    p.add_argument(
        "--show-dir", help="also draw image, ground truth and prediction of every test image here"
    )
    add_launcher_args(p)
    args = p.parse_args(argv)
    if (args.tta_ratios or args.tta_no_flip) and not args.tta:
        p.error("--tta-ratios and --tta-no-flip go with --tta")
    export_local_rank(args)

    def body():
        if args.out:
            prepare_out(args.out)
        metrics = evaluate_segmentor(
            args.config,
            args.checkpoint,
            parse_cfg_options(args.cfg_options),
            args.work_dir,
            args.launcher,
            tta_ratios=(args.tta_ratios or []) if args.tta else None,
            tta_flip=not args.tta_no_flip,
            pred_dir=args.pred_dir,
            show_dir=args.show_dir,
        )
        print(json.dumps(metrics, indent=1))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(metrics, f, indent=1)

    return exit_code(body, logger)


if __name__ == "__main__":
    sys.exit(main())
