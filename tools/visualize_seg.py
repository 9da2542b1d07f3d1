#!/usr/bin/env python
"""Colour overlays of a segmentor's predictions, written as one PNG.

python tools/visualize_seg.py CONFIG CHECKPOINT --images img1.jpg dir/ --output seg.png \\
    [--cfg-options k=v ...]

The checkpoint must fill the model of CONFIG with the --cfg-options it was trained with (or
give the config mmengine saved in the work_dir). --output without a suffix gets .png, a folder
gets segmentation.png in it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from PIL import Image  # noqa: E402

import mae_transfer.segmentation  # noqa: E402,F401
from mae_transfer.data import image_files  # noqa: E402
from mae_transfer.engine.config import ConfigError  # noqa: E402
from mae_transfer.engine.launch import exit_code, pick_images, picture_path  # noqa: E402
from mae_transfer.segmentation.runner import build_cfg, parse_cfg_options  # noqa: E402
from mae_transfer.segmentation.visualize import comparison_grid, init_segmentor  # noqa: E402

logger = logging.getLogger("visualize_seg")


def main(argv=None) -> int:
    """Exit code 0; 2 for a bad config value, missing images, or a checkpoint that does not
    fill the model."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("config")
    p.add_argument("checkpoint", help="a trained segmentor (iter_N.pth), every weight of it")
    p.add_argument("--images", nargs="+", required=True, help="image files or folders")
    p.add_argument("--num", type=int, default=6, help="number of images drawn")
    p.add_argument("--device", default="cpu")
    p.add_argument("--output", default="segmentation.png", help="PNG file, or folder")
    p.add_argument("--cfg-options", nargs="+", default=[], help="key=value overrides")
    args = p.parse_args(argv)
    if args.num < 1:
        p.error(f"--num must be >= 1, got {args.num}")

    def body():
        options = parse_cfg_options(args.cfg_options)
        cfg = build_cfg(args.config, options, amp="fp32", for_training=False)
        try:
            paths = image_files(args.images)
        except FileNotFoundError as e:
            raise ConfigError(f"--images: {e}") from e
        paths = pick_images(paths, args.num, logger)
        output = picture_path(args.output, "segmentation.png")
        model = init_segmentor(cfg, args.checkpoint, args.device)
        meta = model.dataset_meta
        grid = comparison_grid(
            paths, [("prediction", model)], meta["palette"], classes=meta.get("classes")
        )
        Image.fromarray(grid).save(output)
        print(f"wrote {output}")

    return exit_code(body, logger)


if __name__ == "__main__":
    sys.exit(main())
