#!/usr/bin/env python
"""The one-command demo on embedded data: MAE pretraining, then detection and segmentation.

    python tools/demo.py                 # everything, ~15 min on 2 CPU cores
    python tools/demo.py --quick         # a 2-3 min smoke version (what the tests run)
    python tools/demo.py --skip-det --skip-seg

1. pretrains a tiny MAE on random crops of scikit-image's sample photographs and draws its
   loss curve and reconstructions;
2. fine-tunes Mask R-CNN (detectron2) on a generated COCO-format shapes data set, from the MAE
   encoder and from random initialisation, and reports box / mask AP side by side;
3. fine-tunes UperNet (mmsegmentation) on a generated ADE20K-layout data set, both ways, and
   reports mIoU side by side.

Everything lands in --output (default demo_output/); a summary is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import time
from typing import Dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pretrain.config import make_config, read_yaml  # noqa: E402
from pretrain.main import run as run_pretraining  # noqa: E402
from pretrain.samples import sample_images, write_sample_photos  # noqa: E402
from pretrain.visualize import load_mae_for_visualization, visualize  # noqa: E402

logger = logging.getLogger("demo")
INITS = ("mae", "random")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--output", default="demo_output")
    p.add_argument("--quick", action="store_true", help="few iterations: a smoke run")
    p.add_argument("--skip-det", action="store_true", help="no detectron2 stage")
    p.add_argument("--skip-seg", action="store_true", help="no mmsegmentation stage")
    return p.parse_args(argv)


def stage_pretrain(out: str, quick: bool) -> Dict:
    photos = write_sample_photos(os.path.join(out, "data", "photos"))
    values = read_yaml(os.path.join(ROOT, "configs", "pretrain", "demo_tiny.yaml"))
    run_dir = os.path.join(out, "pretrain")
    if os.path.isdir(run_dir):  # a demo run starts over (no resuming into an earlier demo's run)
        shutil.rmtree(run_dir)
    values.update(data_path=os.path.dirname(photos[0]), output_dir=run_dir)
    if quick:
        values.update(epochs=2, warmup_epochs=1, dataset_repeats=4, batch_size=16)
    stats = run_pretraining(make_config(values))
    ckpt = os.path.join(out, "pretrain", "checkpoint-last.pth")
    model = load_mae_for_visualization(ckpt)
    images = [img for _, img in sample_images()[:4]]
    grid = visualize(
        model,
        images,
        os.path.join(out, "pretrain", "reconstruction.png"),
        title="tiny MAE after the demo pretraining (mask ratio 0.75)",
    )
    return {
        "final_loss": stats.get("train_loss"),
        "checkpoint": ckpt,
        "encoder": os.path.join(out, "pretrain", "encoder.pth"),
        "loss_curve": os.path.join(out, "pretrain", "loss_curve.png"),
        "reconstruction": grid,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s", datefmt="%H:%M:%S"
    )
    out = os.path.abspath(args.output)
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    summary: Dict = {"pretrain": stage_pretrain(out, args.quick)}
    encoder = summary["pretrain"]["encoder"]
    if not args.skip_det:
        from mae_transfer.detection.demo import run_demo as run_detection

        summary["detection"] = run_detection(out, encoder, args.quick)
    if not args.skip_seg:
        from mae_transfer.segmentation.demo import run_demo as run_segmentation

        summary["segmentation"] = run_segmentation(out, encoder, args.quick)
    summary["minutes"] = round((time.time() - t0) / 60, 1)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print_summary(summary, out)
    return 0


def print_summary(summary: Dict, out: str) -> None:
    p = summary["pretrain"]
    lines = [
        "",
        "=" * 72,
        f"mae-transfer demo finished in {summary['minutes']} min; outputs in {out}",
        f"pretraining   final loss {p['final_loss']:.4f}",
        f"  checkpoint  {p['checkpoint']}",
        f"  encoder     {p['encoder']}",
        f"  loss curve  {p['loss_curve']}",
        f"  recon grid  {p['reconstruction']}",
    ]
    if "detection" in summary:
        d = summary["detection"]
        lines.append("detection (Mask R-CNN, toy shapes val)   box AP   mask AP")
        for init in INITS:
            r = d[init]
            lines.append(
                f"  {init + ' init':<38} {r.get('bbox_AP', float('nan')):6.1f}"
                f"   {r.get('segm_AP', float('nan')):6.1f}"
            )
        if any(math.isnan(d[i].get("bbox_AP", math.nan)) for i in INITS):
            lines.append("  (nan: no detection above the score threshold; --quick is too short)")
        lines.append(f"  predictions {d['predictions']}")
    if "segmentation" in summary:
        s = summary["segmentation"]
        lines.append("segmentation (UperNet, toy ADE val)      mIoU")
        for init in INITS:
            lines.append(f"  {init + ' init':<38} {s[init].get('mIoU', float('nan')):6.1f}")
        lines.append(f"  overlay     {s['overlay']}")
    lines.append("=" * 72)
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
