"""The benchmark's command line: parse, run the chosen sections, print markdown, write JSON."""

from __future__ import annotations

import argparse
import json
import os
from typing import Callable, Dict, List

import torch

from . import measure
from .classification import bench_classification
from .data import bench_data
from .pretrain import bench_maskratio, bench_pretrain, bench_table2, bench_versus_official
from .report import machine, markdown
from .transfer import bench_transfer

SECTIONS: Dict[str, Callable[[argparse.Namespace], List[Dict]]] = {
    "pretrain": bench_pretrain,
    "official": bench_versus_official,
    "table2": bench_table2,
    "maskratio": bench_maskratio,
    "data": bench_data,
    "transfer": bench_transfer,
    "classification": bench_classification,
}


def build_parser(description: str = "") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("what", choices=[*SECTIONS, "matmul", "all"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="mae_vit_base_patch16")
    p.add_argument(
        "--table2_model",
        default="mae_vit_large_patch16",
        help="model of the table2 comparison (the paper's Table 2 is ViT-L)",
    )
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--input_size", type=int, default=224)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tiny", action="store_true", help="tiny models and inputs (a smoke run)")
    p.add_argument(
        "--compile", action="store_true", help="torch.compile our model (pretrain, official)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="intra-op threads (0: torch's default, one per core). On a machine shared with other\n"
        "jobs, fewer threads than cores avoid timing OpenMP barriers that wait for a descheduled\n"
        "thread (measured on a loaded 2-core box: 1 thread 3x faster than 2)",
    )
    p.add_argument(
        "--amp",
        default="auto",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="precision of pretraining and transfer, as in training: auto = bf16 where the device "
        "has native bf16 (GPUs of compute capability >= 8.0, CPUs with AMX / AVX512-BF16), else "
        "fp32 (ratio_to_peak is then against a matrix multiply in that precision)",
    )
    p.add_argument(
        "--feed_rates",
        default="1000,3000,10000",
        help="data: step rates (images/s, comma-separated) to size the loader workers for",
    )
    p.add_argument("--json", default=None, help="write all numbers here")
    return p


def main(argv=None, description: str = "") -> int:
    args = build_parser(description).parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the spawned case processes
    if args.tiny:
        args.input_size = min(args.input_size, 64)
        measure.IN_PROCESS, measure.PEAK_N = True, 512
    device = torch.device(args.device)
    results: Dict = {"machine": machine(device), "matmul": {"fp32": measure.matmul_peak(device)}}
    from mae_transfer.device import cuda_bf16_native

    if device.type == "cpu" or cuda_bf16_native(device):
        results["matmul"]["bf16"] = measure.matmul_peak(
            device, torch.bfloat16, n=512 if device.type == "cpu" else 2048, repeats=2
        )
    names = SECTIONS if args.what == "all" else ([args.what] if args.what != "matmul" else [])
    for name in names:
        results[name] = SECTIONS[name](args)
    print(markdown(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0
