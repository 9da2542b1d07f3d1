"""The README's demo command, in its quick variant, end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

pytest.importorskip("detectron2")
pytest.importorskip("mmseg")


def test_quick_demo_runs_every_stage_and_writes_its_pictures(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, os.path.join(ROOT, "tools", "demo.py"), "--quick", "--output", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    for init in ("mae", "random"):
        assert {"bbox_AP", "segm_AP"} <= set(summary["detection"][init])
        assert "mIoU" in summary["segmentation"][init]
    pngs = [
        summary["pretrain"]["loss_curve"],
        summary["pretrain"]["reconstruction"],
        summary["detection"]["predictions"],
        summary["segmentation"]["overlay"],
    ]
    for png in pngs:
        with open(png, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", png
    assert "mae-transfer demo finished" in r.stdout
    assert "mae init" in r.stdout and "random init" in r.stdout
