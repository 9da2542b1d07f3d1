"""The benchmark's command line: parse, run the chosen sections, print markdown, write JSON."""

from __future__ import annotations

import argparse
import json
import math
import os
from typing import Callable, Dict, List

import torch

from . import measure
from .attention import bench_attention
from .classification import bench_classification
from .data import bench_data
from .pretrain import bench_maskratio, bench_pretrain, bench_table2, bench_versus_official
from .report import machine, markdown
from .transfer import NOTE as TRANSFER_NOTE
from .transfer import bench_transfer

SECTIONS: Dict[str, Callable[[argparse.Namespace], List[Dict]]] = {
    "pretrain": bench_pretrain,
    "official": bench_versus_official,
    "table2": bench_table2,
    "maskratio": bench_maskratio,
    "data": bench_data,
    "transfer": bench_transfer,
    "classification": bench_classification,
    "attention": bench_attention,
}
# the sections that build an MAE model (encoder + decoder) of --model; classification builds
# its encoder (either name works), data, transfer and matmul none
MAE_SECTIONS = ("pretrain", "official", "table2", "maskratio", "attention")
NOTES = {"transfer": TRANSFER_NOTE}  # printed under the section's heading


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
        type=_rates,
        help="data: step rates (images/s, comma-separated) to size the loader workers for",
    )
    p.add_argument("--json", default=None, help="write all numbers here (after each section)")
    return p


def _rates(text: str) -> List[float]:
    """--feed_rates: positive numbers, comma-separated (checked before anything runs)."""
    try:
        rates = [float(r) for r in text.split(",") if r.strip()]
    except ValueError:
        rates = []
    if not rates or not all(r > 0 and math.isfinite(r) for r in rates):
        raise argparse.ArgumentTypeError(f"expected positive numbers like 1000,3000, got {text!r}")
    return rates


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuses what would fail after minutes of timing (argparse's exit code 2)."""
    for flag in ("batch", "input_size", "repeats"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.warmup < 0 or args.threads < 0:
        p.error(f"--warmup and --threads must be >= 0, got {args.warmup}, {args.threads}")
    try:
        args.device = str(torch.device(args.device))
    except RuntimeError as e:
        p.error(f"--device {args.device!r}: {e}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA device is available here (use --device cpu)")
    if args.amp == "fp16" and not args.device.startswith("cuda"):
        p.error("--amp fp16 runs on CUDA only (with loss scaling); on a CPU use fp32 or auto")
    _check_models(p, args)
    if not args.tiny:  # (--tiny picks a size its patches tile)
        from mae_transfer.registry import patch_size_of

        for flag in ("model", "table2_model"):
            patch = patch_size_of(getattr(args, flag))
            if args.input_size % patch:
                p.error(
                    f"--input_size {args.input_size} is not a multiple of the patch size {patch} "
                    f"of --{flag} {getattr(args, flag)}"
                )
    if args.what in ("classification", "all") and args.batch % 2:
        p.error(f"--batch {args.batch}: fine-tuning's mixup (timm) needs an even batch")
    if args.json:
        from mae_transfer.engine.config import ConfigError
        from mae_transfer.engine.launch import refuse_folder

        try:  # a folder (or a name ending in /) failed at the first write, after the timing
            refuse_folder(args.json, "--json", "bench.json")
        except ConfigError as e:
            p.error(str(e))
        folder = os.path.dirname(os.path.abspath(args.json))
        try:  # (made now, as the other tools do; not found missing after the timing)
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            p.error(f"--json {args.json}: cannot make {folder}: {e}")
        if not os.access(folder, os.W_OK):
            p.error(f"--json {args.json}: {folder} is not a writable directory")


def _check_models(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--model must be an MAE model (``mae_vit_*``) for the sections that build one, and
    --table2_model always (table2 is its only use): an encoder-only ViT (``vit_*``, registered
    too) failed in the first case, after the peak measurement (``norm_pix_loss`` unexpected).
    classification takes either name (the MAE name means its encoder); data, transfer and
    matmul build no model of that name (``--tiny`` reads its patch size)."""
    from mae_transfer.registry import list_models, resolve_name

    mae = list_models("mae_*")
    if args.what == "all":
        builds = f"all runs {', '.join(MAE_SECTIONS)}, which build an MAE model"
    else:
        builds = f"{args.what} builds an MAE model"
    for flag, needs_mae, why in (
        ("model", args.what in (*MAE_SECTIONS, "all"), builds),
        ("table2_model", True, "table2 builds an MAE model"),
    ):
        name = getattr(args, flag)
        try:
            canonical = resolve_name(name)
        except KeyError as e:
            if needs_mae:  # (not the encoder-only names, which would be refused next)
                p.error(f"--{flag}: unknown model {name!r}; {why}: one of {', '.join(mae)}")
            p.error(f"--{flag}: {e}")
        if needs_mae and canonical not in mae:
            use = f"mae_{canonical}" if f"mae_{canonical}" in mae else "one of " + ", ".join(mae)
            p.error(
                f"--{flag} {name} is an encoder-only ViT; {why} (encoder + decoder): use {use} "
                f"(MAE models: {', '.join(mae)})"
            )


def _mark_tiny(rows) -> None:
    """Appends " (tiny)" to every row's model name: --tiny shrinks the named model."""
    if isinstance(rows, dict):
        if isinstance(rows.get("model"), str) and not rows["model"].endswith(" (tiny)"):
            rows["model"] += " (tiny)"
        for v in rows.values():
            _mark_tiny(v)
    elif isinstance(rows, list):
        for v in rows:
            _mark_tiny(v)


def _write_json(path: str, results: Dict) -> None:
    """Strict JSON (NaN, which some sections report for what was not measured, as null),
    replaced atomically: a section that fails later leaves the earlier ones on disk."""
    from mae_transfer.checkpoint import write_text_atomic
    from mae_transfer.engine.logger import json_safe

    write_text_atomic(json.dumps(json_safe(results), indent=1, allow_nan=False), path)


def main(argv=None, description: str = "") -> int:
    parser = build_parser(description)
    args = parser.parse_args(argv)
    _check_args(parser, args)
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the spawned case processes
    if args.tiny:
        from mae_transfer.registry import patch_size_of

        patch = patch_size_of(args.model)  # a whole number of patches (ViT-H/14: 56)
        args.input_size = max(patch, min(args.input_size, 64) // patch * patch)
        measure.IN_PROCESS, measure.PEAK_N = True, 512
    device = torch.device(args.device)
    results: Dict = {"machine": machine(device), "matmul": {"fp32": measure.matmul_peak(device)}}
    from mae_transfer.device import cuda_bf16_native

    if device.type == "cpu" or cuda_bf16_native(device):
        results["matmul"]["bf16"] = measure.matmul_peak(
            device, torch.bfloat16, n=512 if device.type == "cpu" else 2048, repeats=2
        )
    if args.json:
        _write_json(args.json, results)
    names = SECTIONS if args.what == "all" else ([args.what] if args.what != "matmul" else [])
    for name in names:
        results[name] = SECTIONS[name](args)
        if args.tiny:  # not the named model's figures
            _mark_tiny(results[name])
        if args.json:
            _write_json(args.json, results)
    print(markdown(results, NOTES))
    return 0
