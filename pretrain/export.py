"""``python -m pretrain.export CHECKPOINT OUTPUT``: encoder-only checkpoint, official format."""

from __future__ import annotations

import argparse
import os
import sys

from mae_transfer.engine.launch import exit_code, setup_logging
from pretrain.engine import export_encoder


def main(argv=None) -> int:
    p = argparse.ArgumentParser("python -m pretrain.export", description=__doc__)
    p.add_argument("checkpoint", help="pretraining checkpoint (ours or official full)")
    p.add_argument("output", help="where to write {'model': encoder state dict}")
    args = p.parse_args(argv)
    if os.path.isdir(args.output):
        p.error(f"output {args.output} is a folder: name the file to write (e.g. encoder.pth)")
    setup_logging()

    def body():
        n = export_encoder(args.checkpoint, args.output)
        print(f"wrote {n} encoder tensors to {args.output}")

    return exit_code(body)


if __name__ == "__main__":
    sys.exit(main())
