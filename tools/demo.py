#!/usr/bin/env python
"""The one-command demo: does MAE pretraining on unlabeled in-domain images pay off downstream?

    python tools/demo.py                 # everything: ~12 min on 2 idle cores (22 CPU-minutes)
    python tools/demo.py --quick         # a smoke version of about a minute (what the tests run)
    python tools/demo.py --skip-det --skip-seg

On generated scenes (sky, ground, six shape classes told apart by outline only, occlusion):
1. pretrains a tiny MAE on unlabeled scenes, with the k-NN monitor on labelled object crops;
2. k-NN accuracy of the pretrained encoder vs randomly initialised ones;
3. fine-tunes Mask R-CNN (detectron2) and UperNet (mmsegmentation) on a few labelled scenes,
   from the MAE encoder and from random initialisation, over several seeds each.

Everything lands in --output (default demo_output/); a summary is printed at the end, with the
mean and min-max over seeds of every metric, and drawn in comparison.png.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import replace
from typing import Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mae_transfer.demo import pipeline  # noqa: E402
from mae_transfer.demo.stats import Spread  # noqa: E402
from mae_transfer.engine.config import file_in_the_way  # noqa: E402
from mae_transfer.engine.logger import json_safe  # noqa: E402

logger = logging.getLogger("demo")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--output", default="demo_output")
    p.add_argument("--quick", action="store_true", help="tiny sizes, few iterations: a smoke run")
    p.add_argument("--skip-det", action="store_true", help="no detectron2 stage")
    p.add_argument("--skip-seg", action="store_true", help="no mmsegmentation stage")
    p.add_argument("--seeds", type=pipeline.seeds_arg, default=None, help="e.g. 0,1,2")
    p.add_argument(
        "--lanes", type=int, default=None, help="parallel fine-tuning processes (0: in this one)"
    )
    args = p.parse_args(argv)
    if args.lanes is not None and args.lanes < 0:
        p.error(f"--lanes must be >= 0, got {args.lanes}")  # not after 4 minutes of pretraining
    blocked = file_in_the_way(args.output)
    if blocked:
        p.error(f"--output {args.output} must be a folder (or one to make): {blocked} is a file")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s", datefmt="%H:%M:%S"
    )
    settings = pipeline.QUICK if args.quick else pipeline.FULL
    if args.seeds:
        settings = replace(settings, seeds=tuple(args.seeds))
    if args.lanes is not None:
        settings = replace(settings, lanes=args.lanes)
    out = os.path.abspath(args.output)
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    summary: Dict = {"pretrain": pipeline.pretrain(out, settings)}
    summary["representation"] = pipeline.representation_check(out, settings, summary["pretrain"])
    encoder = summary["pretrain"]["encoder"]
    summary.update(pipeline.transfer(out, settings, encoder, not args.skip_det, not args.skip_seg))
    rows = pipeline.finish(out, summary, settings)
    summary["minutes"] = round((time.time() - t0) / 60, 1)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(json_safe(summary), f, indent=1, allow_nan=False)  # NaN AP: null
    print_summary(summary, rows, out)
    return 0


def print_summary(summary: Dict, rows: List[tuple], out: str) -> None:
    p = summary["pretrain"]
    n = len(summary["settings"]["seeds"])
    lines = [
        "",
        "=" * 88,
        f"mae-transfer demo finished in {summary['minutes']} min; outputs in {out}",
        f"pretraining   {p['scenes']} unlabeled scenes, {p['epochs']} epochs, "
        f"final loss {p['final_loss']:.4f}",
        f"  k-NN curve  {summary['representation']['knn_curve']}",
        f"  recon grid  {p['reconstruction']}",
        f"MAE init vs random init, mean (min-max) over {n} seeds",
        f"  {'stage':<15} {'metric':<18} {'mae init':>18} {'random init':>18}   verdict",
    ]
    for stage, metric, spreads, verdict in rows:
        lines.append(
            f"  {stage:<15} {metric:<18} {_fmt(spreads['mae']):>18} "
            f"{_fmt(spreads['random']):>18}   {verdict}"
        )
    for stage in ("detection", "segmentation"):
        if stage in summary:
            lines.append(f"  {stage} pictures: {summary[stage]['picture']}")
    if "chart" in summary:
        lines.append(f"  chart: {summary['chart']}")
    lines.append("=" * 88)
    print("\n".join(lines))


def _fmt(s: Spread) -> str:
    return str(s) if s.n else "n/a (no result)"


if __name__ == "__main__":
    sys.exit(main())
