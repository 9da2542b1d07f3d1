#!/usr/bin/env python
"""Draw Mask R-CNN predictions on images and write one PNG.

    python tools/visualize_det.py --config-file CONFIG --weights output/model_final.pth \
        --images img1.jpg dir/ --output predictions.png [KEY VALUE ...]

Without --images, the first images of the config's test data set are used.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mae_transfer.detection  # noqa: E402,F401

# isort: split
from detectron2.data import DatasetCatalog  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

from mae_transfer.data import find_images  # noqa: E402
from mae_transfer.detection import MAECheckpointer  # noqa: E402
from mae_transfer.detection.train import (
    build_cfg,  # noqa: E402
    register_coco_datasets,  # noqa: E402
)
from mae_transfer.detection.visualize import draw_predictions  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config-file", required=True)
    p.add_argument("--weights", required=True, help="detectron2 checkpoint (model_final.pth)")
    p.add_argument("--images", nargs="*", default=None)
    p.add_argument("--num", type=int, default=8)
    p.add_argument("--score-thresh", type=float, default=0.5)
    p.add_argument("--output", default="predictions.png")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = p.parse_args(argv)
    cfg = build_cfg(args.config_file, args.opts)
    register_coco_datasets(cfg)
    model = build_model(cfg)
    MAECheckpointer(model).load(args.weights)
    if args.images:
        paths = [
            f
            for item in args.images
            for f in (find_images(item) if os.path.isdir(item) else [item])
        ]
    else:
        paths = [d["file_name"] for d in DatasetCatalog.get(cfg.DATASETS.TEST[0])]
    out = draw_predictions(cfg, model, paths[: args.num], args.output, args.score_thresh)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
