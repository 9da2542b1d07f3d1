#!/usr/bin/env python
"""Multiply-adds (GMACs; fvcore's "flops") and parameters of a detector or segmentor built from
its config, by top-level module, for one image of --size as the model runs at test time.

python tools/analyze_model.py configs/detectron2/mask_rcnn_vit_base_fpn_lsj_100ep.yaml \\
    [KEY VALUE ...] [--size 1024 [1024]]
python tools/analyze_model.py configs/mmseg/upernet_mae_vit_base_8xb2-160k_ade20k-512x512.py \\
    [--size 512 [512]] [--cfg-options k=v ...]

A .yaml file is a detectron2 config (tools/train_det.py's keys), a .py file an mmseg config
(tools/train_seg.py's). No weights are loaded. A detector's count depends on its detections
(the heads run on the proposals it keeps); a segmentor's is one whole-image pass (a sliding
window test runs it once per window).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mae_transfer.benchmark.complexity import (  # noqa: E402
    detector_complexity,
    segmentor_complexity,
)
from mae_transfer.engine.config import ConfigError  # noqa: E402
from mae_transfer.engine.launch import exit_code  # noqa: E402

logger = logging.getLogger("analyze_model")


def main(argv=None) -> int:
    """Exit code 0; 2 for a missing config, a bad value or size."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("config", help="a detectron2 .yaml or mmseg .py config")
    p.add_argument("--size", type=int, nargs="+", help="H [W] of the image (default: 1024 / 512)")
    p.add_argument("--cfg-options", nargs="+", default=[], help="mmseg: key=value overrides")
    p.add_argument("opts", nargs="*", help="detectron2: KEY VALUE overrides (before --size)")
    args = p.parse_intermixed_args(argv)
    detector = args.config.endswith((".yaml", ".yml"))
    size = args.size or [1024 if detector else 512]
    if len(size) > 2 or min(size) < 1:
        p.error(f"--size takes H or H W, positive, got {size}")
    size = (size[0], size[-1])
    # each framework's overrides only: the other's were ignored, and the counts were then not
    # those of the model asked for
    if detector and args.cfg_options:
        p.error(f"--cfg-options is for mmseg configs; give {args.config} KEY VALUE pairs")
    if not detector and args.opts:
        given = " ".join(args.opts)
        p.error(f"{given}: KEY VALUE pairs are for detectron2 configs; use --cfg-options k=v")
    if len(args.opts) % 2:
        p.error(f"KEY VALUE overrides come in pairs, got {len(args.opts)}: {' '.join(args.opts)}")

    def body():
        if detector:
            rows = detector_complexity(args.config, args.opts, size)
        elif args.config.endswith(".py"):
            from mae_transfer.segmentation.runner import parse_cfg_options

            rows = segmentor_complexity(args.config, parse_cfg_options(args.cfg_options), size)
        else:
            raise ConfigError(f"{args.config}: a detectron2 .yaml or an mmseg .py config")
        print(f"{args.config} at {size[0]} x {size[1]} px, one image")
        print(f"{'module':<24}{'GMACs':>10}{'M params':>10}")
        for name, (gmacs, params) in rows.items():
            print(f"{name:<24}{gmacs:>10.2f}{params:>10.2f}")

    return exit_code(body, logger)


if __name__ == "__main__":
    sys.exit(main())
