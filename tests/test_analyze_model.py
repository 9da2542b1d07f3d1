"""tools/analyze_model.py: multiply-adds and parameters of the transfer models by module."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from conftest import ROOT

from mae_transfer.benchmark.measure import fvcore_gmacs

DET_CONFIG = os.path.join(ROOT, "configs", "detectron2", "demo_tiny.yaml")
SEG_CONFIG = os.path.join(ROOT, "configs", "mmseg", "demo_tiny_toy-96x96.py")


def _tool():
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import analyze_model

    return analyze_model


def test_a_detector_is_counted_by_module_its_backbone_as_fvcore_counts_it_alone(capsys):
    pytest.importorskip("detectron2")
    from detectron2.modeling import build_model

    from mae_transfer.benchmark.complexity import detector_complexity
    from mae_transfer.detection.train import build_cfg

    rows = detector_complexity(DET_CONFIG, [], (96, 96))
    assert list(rows) == ["backbone", "proposal_generator", "roi_heads", "total"]
    backbone = build_model(build_cfg(DET_CONFIG, ["MODEL.DEVICE", "cpu"])).backbone.eval()
    with torch.no_grad():  # the image as the detector hands it on: 96 px, a multiple of 32
        alone = fvcore_gmacs(backbone, (torch.zeros(1, 3, 96, 96),))
    assert rows["backbone"][0] == pytest.approx(alone, rel=1e-6) and alone > 0
    assert rows["total"][0] >= sum(macs for name, (macs, _) in rows.items() if name != "total")
    assert rows["backbone"][1] == pytest.approx(sum(p.numel() for p in backbone.parameters()) / 1e6)
    # global attention: 4x the pixels cost more than 4x the work (attention matmuls counted)
    bigger = detector_complexity(DET_CONFIG, [], (192, 192))
    assert bigger["backbone"][0] > 4.05 * rows["backbone"][0]
    assert _tool().main([DET_CONFIG, "SOLVER.BASE_LR", "0.01", "--size", "96"]) == 0
    out = capsys.readouterr().out
    assert "demo_tiny.yaml at 96 x 96 px" in out and "roi_heads" in out


def test_a_segmentor_is_counted_by_module(capsys):
    pytest.importorskip("mmseg")
    from mmseg.registry import MODELS

    import mae_transfer.segmentation  # noqa: F401
    from mae_transfer.benchmark.complexity import segmentor_complexity
    from mae_transfer.segmentation.runner import build_cfg

    rows = segmentor_complexity(SEG_CONFIG, {}, (96, 128))
    assert {"backbone", "decode_head", "total"} <= set(rows)
    model = MODELS.build(build_cfg(SEG_CONFIG, {}, for_training=False).model).eval()
    with torch.no_grad():
        alone = fvcore_gmacs(model.backbone, (torch.zeros(1, 3, 96, 128),))
    assert rows["backbone"][0] == pytest.approx(alone, rel=1e-6) and alone > 0
    assert (
        _tool().main([SEG_CONFIG, "--size", "64", "--cfg-options", "model.decode_head.channels=32"])
        == 0
    )
    assert "at 64 x 64 px" in capsys.readouterr().out


def test_bad_input_is_refused(tmp_path, capsys, caplog):
    tool = _tool()
    with pytest.raises(SystemExit) as e:
        tool.main([DET_CONFIG, "--size", "0"])
    assert e.value.code == 2 and "--size takes H or H W, positive" in capsys.readouterr().err
    other = tmp_path / "model.json"
    other.write_text("{}")
    assert tool.main([str(other)]) == 2
    assert "a detectron2 .yaml or an mmseg .py config" in caplog.text
    assert tool.main([str(tmp_path / "nothere.yaml")]) == 2
    assert "does not exist" in caplog.text


def test_the_other_framework_s_overrides_are_refused_not_ignored(capsys):
    """An mmseg config's KEY=VALUE words, or a detectron2 config's --cfg-options, were ignored:
    the counts printed were the unchanged model's."""
    tool = _tool()
    for argv, says in (
        ([SEG_CONFIG, "model.backbone.embed_dim=48"], "use --cfg-options k=v"),
        ([DET_CONFIG, "--cfg-options", "model.x=1"], "--cfg-options is for mmseg configs"),
        ([DET_CONFIG, "MODEL.VIT.EMBED_DIM"], "come in pairs, got 1: MODEL.VIT.EMBED_DIM"),
    ):
        with pytest.raises(SystemExit) as e:
            tool.main(argv)
        assert e.value.code == 2 and says in capsys.readouterr().err
