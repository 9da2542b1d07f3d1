#!/usr/bin/env python
"""Evaluate a segmentor checkpoint (mIoU with mmseg's IoUMetric), mmseg's tools/test.py style.

python tools/test_seg.py CONFIG CHECKPOINT [--work-dir DIR] [--cfg-options k=v ...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mae_transfer.segmentation.runner import build_cfg, make_runner  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("config")
    p.add_argument("checkpoint")
    p.add_argument("--work-dir")
    p.add_argument("--cfg-options", nargs="+", default=[], help="key=value overrides")
    p.add_argument("--launcher", choices=["none", "pytorch", "slurm", "mpi"], default="none")
    p.add_argument("--out", help="write the metrics as JSON here")
    args = p.parse_args(argv)
    from mmengine.config import DictAction

    options = {}
    if args.cfg_options:
        ns = argparse.Namespace()
        DictAction(["--cfg-options"], "o")(p, ns, args.cfg_options)
        options = ns.o
    # evaluated in fp32: the numbers do not depend on the GPU generation
    cfg = build_cfg(
        args.config, options, args.work_dir, args.launcher, amp="fp32", for_training=False
    )
    cfg.load_from = args.checkpoint
    metrics = make_runner(cfg).test()
    print(json.dumps({k: float(v) for k, v in metrics.items()}, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({k: float(v) for k, v in metrics.items()}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
