"""The benchmark tool runs end to end on tiny models and writes well-formed JSON (no timings
are asserted: they belong to the machine, not to the code)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import ROOT


def test_benchmark_all_tiny_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable,
        os.path.join(ROOT, "tools", "benchmark.py"),
        "all",
        "--tiny",
        "--warmup",
        "0",
        "--repeats",
        "1",
        "--json",
        str(out),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    data = json.loads(out.read_text())
    assert data["matmul"]["fp32"]["gflops"] > 0
    assert {"pretrain", "table2", "maskratio", "data", "transfer"} <= set(data)
    pre = data["pretrain"][0]
    for key in ("img_s", "gmac_fwd_per_img", "achieved_gflops", "ratio_to_peak", "peak_mem_mb"):
        assert isinstance(pre[key], float) and pre[key] > 0, key
    assert data["table2"][1]["mask_tokens_in_encoder"] is True
    assert data["table2"][1]["flop_ratio"] > 1  # all tokens through the encoder cost more
    assert [r["mask_ratio"] for r in data["maskratio"]] == [0.5, 0.6, 0.7, 0.75, 0.8, 0.9]
    kinds = {r.get("backbone") or r.get("iteration") for r in data["transfer"]}
    assert kinds == {"det", "seg", "maskrcnn", "upernet"}
    assert 0 < pre["gemm_ratio_to_peak"] < 10 and 0 < pre["share_gemm"] < 1
    det = [r for r in data["transfer"] if r.get("backbone") == "det" and r["input"] == 128]
    assert len(det) == 3 and any("ViTDet" in r["attention"] for r in det)
    window = next(r for r in det if r["attention"].startswith("window"))
    assert window["time_vs_vitdet"] > 0 and window["mem_vs_vitdet"] >= 0  # tiny: memory ~0
    assert "| img_s" in r.stdout or "img_s |" in r.stdout
