"""The installed stack: what the set-up promises is importable and builds on CPU."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
from conftest import ROOT


def test_core_needs_only_torch_and_timm():
    """Importing the core and pretraining pulls in no detection/segmentation framework."""
    code = (
        "import sys, mae_transfer, mae_transfer.pyramid, pretrain.engine, pretrain.main\n"
        "print(sorted(m for m in ('detectron2', 'mmseg', 'mmcv', 'mmengine') if m in sys.modules))"
    )
    env = {**os.environ, "PYTHONPATH": ROOT}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "module",
    [
        "detectron2",
        "mmcv.ops",
        "mmseg",
        "mmengine",
        "fvcore",
        "pycocotools.coco",
        "submitit",
        "skimage",
    ],
)
def test_framework_imports(module):
    importlib.import_module(module)


def test_mmcv_has_compiled_ops():
    import torch
    from mmcv.ops import nms

    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]])
    _, keep = nms(boxes, torch.tensor([0.9, 0.8, 0.7]), iou_threshold=0.5)
    assert keep.tolist() == [0, 2]


def test_detectron2_compat_is_applied_and_honest():
    import detectron2

    from mae_transfer.compat import detectron2_compat as compat

    assert detectron2.__version__
    if not compat.HAS_COMPILED_OPS:
        from detectron2 import _C

        with pytest.raises(compat.MissingCompiledOp, match="pure-Python build") as e:
            _ = _C.deform_conv_forward
        assert "use_fast_impl" not in str(e.value)
        # the fast COCO evaluation's (COCOEvaluator's default): the way round it is said
        with pytest.raises(compat.MissingCompiledOp, match=r"COCOEvaluator\(\.\.\., use_fast_"):
            _ = _C.InstanceAnnotation


def test_every_console_script_names_a_command_that_runs(monkeypatch, capsys):
    """pyproject's [project.scripts] (what pip installs): each target imports, and its --help
    names the command as typed."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python < 3.11 (requires-python is >= 3.9): its backport
        tomllib = pytest.importorskip("tomli")

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    assert {"mae-pretrain", "mae-finetune", "mae-linprobe"} <= set(scripts)
    for name, target in scripts.items():
        module, function = target.split(":")
        monkeypatch.setattr(sys, "argv", [name, "--help"])
        with pytest.raises(SystemExit) as e:
            getattr(importlib.import_module(module), function)()
        assert e.value.code == 0, name
        assert f"usage: {name}" in capsys.readouterr().out, name
