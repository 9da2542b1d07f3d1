#!/usr/bin/env python
"""Write an MAE checkpoint (official or ours) as a detectron2 checkpoint for our backbone.

    python tools/convert_to_detectron2.py mae_pretrain_vit_base.pth vit_b_d2.pth \\
        --config-file configs/detectron2/mask_rcnn_vit_base_fpn_lsj_100ep.yaml

Not needed with tools/train_det.py (MODEL.WEIGHTS takes MAE files directly); useful with other
detectron2 entry points. Position tables are resized to MODEL.VIT.IMG_SIZE, a patch-14 kernel
to 16, the decoder and class token dropped; keys become ``backbone.bottom_up.vit.*``
(``backbone.net.*`` with the simple feature pyramid, ``build_mae_vit_simple_fpn_backbone``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mae_transfer.detection  # noqa: E402,F401

# isort: split
from mae_transfer.checkpoint import CheckpointError, is_url  # noqa: E402
from mae_transfer.detection import convert_to_detectron2  # noqa: E402
from mae_transfer.detection.train import build_cfg  # noqa: E402
from mae_transfer.engine.config import ConfigError  # noqa: E402
from mae_transfer.engine.launch import exit_code, refuse_folder  # noqa: E402

logger = logging.getLogger("convert_to_detectron2")


def parse_args(argv=None) -> argparse.Namespace:
    """SRC OUT --config-file CFG [KEY VALUE ...], the options before, between or after."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("source", help="MAE/ViT checkpoint (a file or an http(s) URL)")
    p.add_argument("output", help="detectron2 checkpoint to write")
    p.add_argument("--config-file", required=True, help="the detection config it is for")
    # not REMAINDER: that would swallow a --config-file given after the positionals
    p.add_argument("opts", nargs="*", metavar="KEY VALUE", help="config overrides")
    return p.parse_intermixed_args(argv)


# detectron2 reads these by their suffix, as other formats than the torch file written here
OTHER_FORMATS = {".pkl": "a plain pickle", ".pyth": "a pycls checkpoint"}


def check_output(output: str) -> None:
    """The file to write is checked before the conversion: a folder failed at its end, and a
    .pkl name wrote a file that detectron2 could not read (the same for .pyth)."""
    refuse_folder(output, "output", "vit_d2.pth")  # (as pretrain.export)
    suffix = os.path.splitext(output)[1]
    if suffix in OTHER_FORMATS:
        raise ConfigError(
            f"output {output}: detectron2 reads a {suffix} file as {OTHER_FORMATS[suffix]}, "
            "not as the torch file written here: name it .pth"
        )
    out_dir = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(out_dir):
        raise ConfigError(f"output {output}: its folder {out_dir} does not exist")


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    def body():
        check_output(args.output)
        cfg = build_cfg(args.config_file, args.opts)
        if not (os.path.isfile(args.source) or is_url(args.source)):
            raise CheckpointError(f"source checkpoint {args.source!r} does not exist")
        counts = convert_to_detectron2(args.source, args.output, cfg)
        print(f"wrote {args.output}: {counts}")

    return exit_code(body, logger)


if __name__ == "__main__":
    sys.exit(main())
