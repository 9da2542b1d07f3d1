#!/usr/bin/env python
"""Write an MAE checkpoint (official or ours) as a detectron2 checkpoint for our backbone.

    python tools/convert_to_detectron2.py mae_pretrain_vit_base.pth vit_b_d2.pth \
        --config-file configs/detectron2/mask_rcnn_vit_base_fpn_lsj_100ep.yaml

Not needed with tools/train_det.py (MODEL.WEIGHTS takes MAE files directly); useful with other
detectron2 entry points. Position tables are resized to MODEL.VIT.IMG_SIZE, a patch-14 kernel
to 16, the decoder and class token dropped; keys become ``backbone.bottom_up.vit.*``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mae_transfer.detection  # noqa: E402,F401

# isort: split
from mae_transfer.detection import convert_to_detectron2  # noqa: E402
from mae_transfer.detection.train import build_cfg  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("source", help="MAE/ViT checkpoint")
    p.add_argument("output", help="detectron2 checkpoint to write")
    p.add_argument("--config-file", required=True, help="the detection config it is for")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = build_cfg(args.config_file, args.opts)
    counts = convert_to_detectron2(args.source, args.output, cfg)
    print(f"wrote {args.output}: {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
