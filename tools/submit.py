#!/usr/bin/env python
"""Slurm launcher (submitit) for every protocol: one task per GPU, requeued on time-out or
preemption, resuming from output_dir/checkpoint-last.pth.

    python tools/submit.py pretrain --nodes 8 --ngpus 8 --partition learnfair \
        --config configs/pretrain/mae_vit_large_in1k.yaml --data_path /datasets/imagenet
    python tools/submit.py finetune --nodes 4 --ngpus 8 --accum_iter 1 \
        --config configs/finetune/vit_large_in1k.yaml --finetune mae_pretrain_vit_large.pth \
        --data_path /datasets/imagenet --output_dir out/ft_l
    python tools/submit.py linprobe --nodes 4 --ngpus 8 --accum_iter 1 \
        --config configs/linprobe/vit_large_in1k.yaml --finetune mae_pretrain_vit_large.pth \
        --data_path /datasets/imagenet --output_dir out/lp_l

Launcher flags: --nodes, --ngpus, --timeout, --partition, --account, --qos, --constraint,
--cpus_per_task, --mem_gb_per_gpu, --job_dir, --cluster {slurm,local,debug}; the rest are the
protocol's (the shipped configs assume 8 GPUs: on 32, --accum_iter 1 keeps the effective
batch). Paths (data, checkpoints) are checked by each task on the cluster's nodes.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mae_transfer.classification.main import submit_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(submit_main(sys.argv[1:]))
