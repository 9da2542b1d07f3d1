#!/usr/bin/env python
"""PNG grid of MAE reconstructions from any checkpoint that has a decoder.

    python tools/visualize_reconstruction.py --checkpoint output_dir/checkpoint-last.pth
    python tools/visualize_reconstruction.py --checkpoint mae_visualize_vit_large.pth \
        --images my_photos/ --mask_ratio 0.75 --output recon.png

Columns: original | masked | reconstruction | reconstruction with the visible patches pasted
back. Without --images, the photographs embedded in scikit-image are used.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from mae_transfer.checkpoint import CheckpointError  # noqa: E402
from mae_transfer.data import image_files, load_rgb  # noqa: E402
from mae_transfer.data.folder import UNREADABLE  # noqa: E402
from mae_transfer.engine.config import ConfigError  # noqa: E402
from mae_transfer.engine.launch import picture_path  # noqa: E402
from mae_transfer.mae import kept_patches  # noqa: E402
from pretrain.samples import sample_images  # noqa: E402
from pretrain.visualize import (  # noqa: E402
    load_mae_for_visualization,
    picture_suffixes,
    visualize,
)


def collect_images(items, limit: int):
    """Up to ``limit`` decoded images (H x W x 3 uint8) from files and folders, unreadable
    ones skipped with a warning; the embedded photographs without ``items``."""
    if not items:
        return [img for _, img in sample_images()[:limit]]
    images = []
    for path in image_files(items):
        if len(images) == limit:
            break
        try:
            images.append(np.asarray(load_rgb(path)))
        except UNREADABLE as e:
            logging.warning("skipping unreadable image %s: %s", path, e)
    return images


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="full MAE checkpoint (with decoder)")
    p.add_argument("--model", default=None, help="model name, when the checkpoint does not say")
    p.add_argument("--images", nargs="*", default=None, help="image files or folders")
    p.add_argument("--num", type=int, default=4, help="number of images (rows)")
    p.add_argument("--input_size", type=int, nargs="+", default=None, help="H [W]")
    p.add_argument("--mask_ratio", type=float, default=0.75)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="reconstruction.png")
    args = p.parse_args(argv)
    if not 0.0 <= args.mask_ratio < 1.0:
        p.error(f"--mask_ratio must be in [0, 1), got {args.mask_ratio}")
    if args.num < 1:
        p.error(f"--num must be >= 1, got {args.num}")
    if args.input_size and (len(args.input_size) > 2 or min(args.input_size) < 1):
        p.error(f"--input_size takes H or H W, each >= 1 pixel: got {args.input_size}")
    for item in args.images or []:
        if not os.path.exists(item):
            p.error(f"--images {item}: no such file or folder")
    try:
        output = picture_path(args.output, "reconstruction.png", picture_suffixes())
    except ConfigError as e:
        p.error(str(e))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    size = args.input_size[0] if args.input_size and len(args.input_size) == 1 else args.input_size
    try:
        model = load_mae_for_visualization(args.checkpoint, args.model, size)
        images = collect_images(args.images, args.num)
    except (CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    patches = model.patch_embed.num_patches
    if kept_patches(patches, args.mask_ratio) < 1:  # (as pretraining refuses it)
        print(
            f"error: --mask_ratio {args.mask_ratio} keeps no patch of the {patches}",
            file=sys.stderr,
        )
        return 2
    if not images:
        print(f"error: no readable images in {' '.join(args.images)}", file=sys.stderr)
        return 2
    title = f"{os.path.basename(args.checkpoint)}, mask ratio {args.mask_ratio}"
    path = visualize(model, images, output, args.mask_ratio, args.seed, title)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
