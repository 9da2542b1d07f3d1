#!/usr/bin/env python
"""End-to-end fine-tuning of a ViT classifier from an MAE checkpoint (the paper's protocol).

    python tools/finetune.py --config configs/finetune/vit_base_in1k.yaml \
        --finetune mae_pretrain_vit_base.pth --data_path /datasets/imagenet
    torchrun --nproc_per_node 8 tools/finetune.py --config ... --finetune ... --data_path ...
    python tools/submit.py finetune --nodes 4 --ngpus 8 --config ...      # Slurm
    python tools/finetune.py --eval --resume mae_finetuned_vit_base.pth --model vit_base_patch16 \
        --data_path /datasets/imagenet                                    # evaluate only

Writes config.yaml, checkpoint-last.pth (exact resume), checkpoint-best.pth (best val top-1),
log.jsonl and TensorBoard events to --output_dir.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mae_transfer.classification.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("finetune", prog="tools/finetune.py"))
