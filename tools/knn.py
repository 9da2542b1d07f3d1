#!/usr/bin/env python
"""Weighted k-NN accuracy of a checkpoint's encoder on class folders (the pretraining monitor's
protocol, on any checkpoint: official MAE, ours, fine-tuned).

    python tools/knn.py --checkpoint mae_pretrain_vit_base.pth --model vit_base_patch16 \
        --train /datasets/imagenet/train --val /datasets/imagenet/val --max_images 50000
    torchrun --nproc_per_node 8 tools/knn.py ...      # features extracted on every GPU

Prints the top-1 for each k (default 20 and 200) and, with --json, writes them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from mae_transfer.checkpoint import is_url  # noqa: E402
from mae_transfer.classification.knn import (  # noqa: E402
    KS,
    POOLS,
    TEMPERATURE,
    KNNEvaluator,
    checkpoint_features,
    default_pool,
    encoder_for_checkpoint,
)
from mae_transfer.device import pin_memory_for, resolve_amp, resolve_device  # noqa: E402
from mae_transfer.engine.config import ConfigError  # noqa: E402
from mae_transfer.engine.distributed import cleanup, init_distributed, own_device  # noqa: E402
from mae_transfer.engine.launch import exit_code, refuse_folder, setup_logging  # noqa: E402
from mae_transfer.engine.trainer import tf32_enabled  # noqa: E402
from mae_transfer.registry import resolve_name  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--checkpoint",
        required=True,
        help="any checkpoint with a ViT encoder (a file or an http(s) URL)",
    )
    p.add_argument("--model", default="vit_base_patch16", help="registered encoder (or MAE) name")
    p.add_argument("--train", required=True, help="class folders: the k-NN memory bank")
    p.add_argument("--val", required=True, help="class folders to classify")
    p.add_argument("--input_size", type=int, nargs="+", default=[224])
    p.add_argument(
        "--pool",
        choices=POOLS,
        default=None,
        help="cls (default) or avg; avg by default for a checkpoint fine-tuned with global_pool "
        "avg (what its head read)",
    )
    p.add_argument("--k", type=int, nargs="+", default=list(KS))
    p.add_argument("--temperature", type=float, default=TEMPERATURE)
    p.add_argument("--max_images", type=int, default=0, help="per set, fixed subset (0 = all)")
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="draws the --max_images subsets (the pretraining monitor's are drawn by the run's "
        "--seed: give it to reproduce the monitor's numbers)",
    )
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--num_workers", type=int, default=8)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    for size in ("embed_dim", "depth", "num_heads", "patch_size"):
        p.add_argument(f"--{size}", type=int, default=None, help="override the model's size")
    p.add_argument("--json", default=None, help="write the accuracies here")
    args = p.parse_args(argv)
    bad = [f"--k must be >= 1, got {k}" for k in args.k if k < 1]
    if not args.temperature > 0:
        bad.append(f"--temperature must be > 0, got {args.temperature}")
    for name in ("max_images", "num_workers"):
        if getattr(args, name) < 0:
            bad.append(f"--{name} must be >= 0, got {getattr(args, name)}")
    if args.batch_size < 1:
        bad.append(f"--batch_size must be >= 1, got {args.batch_size}")
    if not (os.path.isfile(args.checkpoint) or is_url(args.checkpoint)):
        bad.append(f"--checkpoint {args.checkpoint}: no such file (nor an http(s) URL)")
    for name in ("train", "val"):
        if not os.path.isdir(getattr(args, name)):
            bad.append(f"--{name} {getattr(args, name)}: not a directory of class folders")
    try:
        resolve_name(args.model)
    except KeyError as e:
        bad.append(f"--model: {e}")
    if args.json:
        try:
            refuse_folder(args.json, "--json", "knn.json")
        except ConfigError as e:
            bad.append(str(e))
    if bad:
        p.error("; ".join(bad))  # exit code 2, before anything is loaded
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging()
    return exit_code(lambda: run(args))


def run(args) -> None:
    """Extracts the features and prints (and writes) the accuracies."""
    device = resolve_device(args.device)
    info = init_distributed(device.type)
    device = own_device(device, info)
    setup_logging(info.rank)
    if args.json and info.is_main:  # (before the work: a missing folder is not found after it)
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    size = args.input_size[0] if len(args.input_size) == 1 else args.input_size[:2]
    overrides = {k: getattr(args, k) for k in ("embed_dim", "depth", "num_heads", "patch_size")}
    try:
        model = encoder_for_checkpoint(
            args.checkpoint, args.model, size, **{k: v for k, v in overrides.items() if v}
        ).to(device)
        evaluator = KNNEvaluator(  # ConfigError for folders without classes, other classes
            args.train,
            args.val,
            size,
            info,
            args.max_images,
            args.batch_size,
            args.num_workers,
            args.seed,
            pin_memory_for(device),
        )
        amp_dtype, _ = resolve_amp(args.amp, device)
        with tf32_enabled(device):
            pool = args.pool or default_pool(model)
            feature_fn = checkpoint_features(model, pool)
            acc = evaluator(
                model, device, pool, args.k, args.temperature, amp_dtype, feature_fn, True
            )
    finally:
        cleanup(info)
    if info.is_main:
        print(f"{evaluator.describe()}, {pool} features, T = {args.temperature}:")
        for name, value in acc.items():
            print(f"  {name}: {value:.2f}" if name.endswith("top1") else f"  {name}: {value}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(acc, f, indent=1)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
