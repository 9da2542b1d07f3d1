"""``python -m pretrain.export CHECKPOINT OUTPUT``: encoder-only checkpoint, official format."""

from __future__ import annotations

import argparse
import sys

from mae_transfer.engine.config import ConfigError
from mae_transfer.engine.launch import exit_code, refuse_folder, setup_logging
from pretrain.engine import export_encoder


def main(argv=None) -> int:
    p = argparse.ArgumentParser("python -m pretrain.export", description=__doc__)
    p.add_argument("checkpoint", help="pretraining checkpoint (ours or official full)")
    p.add_argument("output", help="where to write {'model': encoder state dict}")
    args = p.parse_args(argv)
    try:  # before anything is read: a folder (or a name ending in a slash), a folder unmakeable
        refuse_folder(args.output, "output", "encoder.pth")
    except ConfigError as e:
        p.error(str(e))
    setup_logging()

    def body():
        n = export_encoder(args.checkpoint, args.output)
        print(f"wrote {n} encoder tensors to {args.output}")

    return exit_code(body)


if __name__ == "__main__":
    sys.exit(main())
