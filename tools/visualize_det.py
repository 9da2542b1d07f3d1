#!/usr/bin/env python
"""Draw Mask R-CNN predictions on images and write one PNG.

    python tools/visualize_det.py --config-file CONFIG --weights output/model_final.pth \\
        --images img1.jpg dir/ --output predictions.png [KEY VALUE ...]

Without --images, the first images of the config's test data set are used.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mae_transfer.detection  # noqa: E402,F401

# isort: split
from detectron2.data import DatasetCatalog  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

from mae_transfer.checkpoint import CheckpointError  # noqa: E402
from mae_transfer.data import image_files  # noqa: E402
from mae_transfer.detection import MAECheckpointer  # noqa: E402
from mae_transfer.detection.train import (  # noqa: E402
    build_cfg,
    register_coco_datasets,
)
from mae_transfer.detection.visualize import draw_predictions  # noqa: E402
from mae_transfer.engine.config import ConfigError  # noqa: E402
from mae_transfer.engine.launch import exit_code  # noqa: E402

logger = logging.getLogger("visualize_det")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config-file", required=True)
    p.add_argument("--weights", required=True, help="detectron2 checkpoint (model_final.pth)")
    p.add_argument("--images", nargs="*", default=None)
    p.add_argument(
        "--coco-val",
        nargs=2,
        metavar=("JSON", "IMAGE_ROOT"),
        default=None,
        help="your COCO-format test set (as train_det): its images, and its class names",
    )
    p.add_argument("--num", type=int, default=8)
    p.add_argument("--score-thresh", type=float, default=0.5)
    p.add_argument("--output", default="predictions.png")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return p.parse_args(argv)


def image_paths(cfg, images) -> list:
    """The files of --images (folders searched), else those of the config's test data set."""
    if not images:
        name = cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else None
        if name not in DatasetCatalog.list():
            raise ConfigError(
                f"no --images, and the config's test data set (DATASETS.TEST) {name!r} is not "
                "registered: give --images FILE_OR_FOLDER ..., or DATASETS.COCO "
                f"\"[['{name or 'val'}', 'JSON', 'IMAGE_ROOT']]\""
            )
        try:
            return [d["file_name"] for d in DatasetCatalog.get(name)]
        except OSError as e:
            raise ConfigError(f"DATASETS.TEST {name!r}: {e}") from e
    try:
        return image_files(images)
    except FileNotFoundError as e:
        raise ConfigError(f"--images: {e}") from e


def main(argv=None) -> int:
    args = parse_args(argv)

    def body():
        cfg = build_cfg(args.config_file, args.opts, coco_val=args.coco_val)
        if "://" not in args.weights and not os.path.isfile(args.weights):
            raise CheckpointError(f"--weights {args.weights!r} does not exist")
        register_coco_datasets(cfg)
        paths = image_paths(cfg, args.images)
        model = build_model(cfg)
        MAECheckpointer(model, whole_model=True).load(args.weights)
        out = draw_predictions(cfg, model, paths[: args.num], args.output, args.score_thresh)
        print(f"wrote {out}")

    return exit_code(body, logger)


if __name__ == "__main__":
    sys.exit(main())
