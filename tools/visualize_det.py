#!/usr/bin/env python
"""Draw Mask R-CNN predictions on images and write one PNG.

    python tools/visualize_det.py --config-file CONFIG --weights output/model_final.pth \\
        --images img1.jpg dir/ --output predictions.png [KEY VALUE ...]

Without --images, the first images of the config's test data set are used. The KEY VALUE
overrides may come before, between or after the options (not right after --images, which
would take them as files). --output without a suffix gets .png, a folder gets
predictions.png in it.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
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
from mae_transfer.engine.launch import exit_code, pick_images, picture_path  # noqa: E402

logger = logging.getLogger("visualize_det")
CONFIG_KEY = re.compile(r"[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)+")  # MODEL.VIT.PRETRAINED


def parse_args(argv=None) -> argparse.Namespace:
    """The options, and the KEY VALUE overrides before, between or after them."""
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
    p.add_argument("--num", type=int, default=8, help="number of images drawn")
    p.add_argument(
        "--score-thresh",
        type=float,
        default=0.5,
        help="draw predictions scored at least this (below the config's "
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST, the model keeps them too)",
    )
    p.add_argument("--output", default="predictions.png", help="PNG file, or folder")
    # not REMAINDER: that would swallow the options given after the first KEY
    p.add_argument("opts", nargs="*", metavar="KEY VALUE", help="config overrides")
    args = p.parse_intermixed_args(argv)
    if args.num < 1:
        p.error(f"--num must be >= 1, got {args.num}")
    return args


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
            paths = [d["file_name"] for d in DatasetCatalog.get(name)]
        except OSError as e:
            raise ConfigError(f"DATASETS.TEST {name!r}: {e}") from e
        if not paths:
            raise ConfigError(
                f"DATASETS.TEST {name!r} holds no images: give --images FILE_OR_FOLDER ..."
            )
        return paths
    try:
        return image_files(images)
    except FileNotFoundError as e:
        # --images takes every word up to the next option, overrides after it too
        keys = [i for i in images if CONFIG_KEY.fullmatch(i) and not os.path.exists(i)]
        hint = f" ({keys[0]} is a config KEY? put the overrides before --images)" if keys else ""
        raise ConfigError(f"--images: {e}{hint}") from e


def main(argv=None) -> int:
    args = parse_args(argv)

    def body():
        cfg = build_cfg(args.config_file, args.opts, coco_val=args.coco_val)
        # --weights holds the whole trained detector: the MAE encoder that initialised its
        # training is not read (it may have been moved or deleted since)
        cfg.MODEL.VIT.PRETRAINED = ""
        # the model drops boxes below its own test threshold (0.05) before the drawing's: a
        # lower --score-thresh (an early model's weak boxes) drew nothing
        heads = cfg.MODEL.ROI_HEADS
        heads.SCORE_THRESH_TEST = min(heads.SCORE_THRESH_TEST, args.score_thresh)
        if "://" not in args.weights and not os.path.isfile(args.weights):
            raise CheckpointError(f"--weights {args.weights!r} does not exist")
        register_coco_datasets(cfg)
        listed = image_paths(cfg, args.images)
        paths = pick_images(listed, args.num, logger, say_beyond=bool(args.images))
        output = picture_path(args.output, "predictions.png")
        model = build_model(cfg)
        MAECheckpointer(model, whole_model=True).load(args.weights)
        out = draw_predictions(cfg, model, paths, output, args.score_thresh)
        print(f"wrote {out}")

    return exit_code(body, logger)


if __name__ == "__main__":
    sys.exit(main())
