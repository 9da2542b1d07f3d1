"""Reporting: the machine (CPU, bf16 capability, GPU) and a markdown table per section."""

from __future__ import annotations

import json
import math
import os
import platform
from typing import Dict, List, Optional

import torch


def machine(device: torch.device) -> Dict:
    from mae_transfer.device import cpu_has_native_bf16, cpuinfo
    from mae_transfer.matmul import cpu_linear_check

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": cpu_has_native_bf16(),
        "cpu_fp32_linear": "oneDNN" if cpu_linear_check()[0] else "torch's default",
        "device": str(device),
    }
    info["cpu"] = next(iter(cpuinfo("model name")), info["cpu"])
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def markdown(results: Dict, notes: Optional[Dict[str, str]] = None) -> str:
    """The results as markdown: the machine, the matmul peak, then a table per kind of row of
    each section, under its ``notes`` (e.g. what a section times whatever the arguments)."""
    out = [f"machine: {json.dumps(results['machine'])}", ""]
    p = results["matmul"]
    out.append(
        f"fp32 matmul peak: {p['fp32']['gflops']:.1f} GFLOP/s"
        + (f" ({p['fp32']['library']})" if p["fp32"].get("library", "torch") != "torch" else "")
        + (f"; bf16: {p['bf16']['gflops']:.2f} GFLOP/s" if "bf16" in p else "")
    )
    for section, rows in results.items():
        if section in ("machine", "matmul") or not rows:
            continue
        out += ["", f"### {section}"]
        if notes and section in notes:
            out += ["", notes[section]]
        for table in _tables(rows):
            keys = [k for k in table[0] if not k.endswith(("min_s", "max_s"))]
            for r in table[1:]:
                keys += [k for k in r if k not in keys and not k.endswith(("min_s", "max_s"))]
            out += ["", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            for r in table:
                out.append("| " + " | ".join(_fmt(r.get(k, "")) for k in keys) + " |")
    return "\n".join(out)


def _tables(rows: List[Dict]) -> List[List[Dict]]:
    """Consecutive rows with the same first key share a table (a section may hold several
    kinds of rows, e.g. the data section's per-core, loader and worker rows)."""
    tables: List[List[Dict]] = []
    for r in rows:
        if tables and next(iter(tables[-1][0])) == next(iter(r)):
            tables[-1].append(r)
        else:
            tables.append([r])
    return tables


def _fmt(v) -> str:
    """A cell: floats to 3 significant digits; what was not measured (NaN, None: null in the
    JSON) as n/a, not as a number."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)
