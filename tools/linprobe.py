#!/usr/bin/env python
"""Linear probing of a frozen MAE encoder (the paper's protocol, encoder in eval mode).

    python tools/linprobe.py --config configs/linprobe/vit_base_in1k.yaml \
        --finetune mae_pretrain_vit_base.pth --data_path /datasets/imagenet
    torchrun --nproc_per_node 8 tools/linprobe.py --config ... --finetune ... --data_path ...
    python tools/linprobe.py ... --cache_features      # features extracted once: quick sweeps
    python tools/linprobe.py --eval --resume checkpoint-best.pth --data_path ...

Writes config.yaml, checkpoint-last.pth, checkpoint-best.pth, log.jsonl and TensorBoard events
to --output_dir.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mae_transfer.classification.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("linprobe", prog="tools/linprobe.py"))
