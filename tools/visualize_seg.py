#!/usr/bin/env python
"""Colour overlays of a segmentor's predictions, written as one PNG.

python tools/visualize_seg.py CONFIG CHECKPOINT --images img1.jpg dir/ --output seg.png
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from PIL import Image  # noqa: E402

import mae_transfer.segmentation  # noqa: E402,F401
from mae_transfer.data import find_images  # noqa: E402
from mae_transfer.segmentation.visualize import comparison_grid  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("config")
    p.add_argument("checkpoint")
    p.add_argument("--images", nargs="+", required=True, help="image files or folders")
    p.add_argument("--num", type=int, default=6)
    p.add_argument("--device", default="cpu")
    p.add_argument("--output", default="segmentation.png")
    args = p.parse_args(argv)
    from mmseg.apis import init_model

    model = init_model(args.config, args.checkpoint, device=args.device)
    paths = [f for i in args.images for f in (find_images(i) if os.path.isdir(i) else [i])]
    palette = model.dataset_meta["palette"]
    grid = comparison_grid(paths[: args.num], [("prediction", model)], palette)
    Image.fromarray(grid).save(args.output)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
