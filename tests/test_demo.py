"""The README's demo command in its quick variant, end to end, and the demo's transfer path:
the pretrained tensors are what both frameworks start fine-tuning from."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

pytest.importorskip("detectron2")
pytest.importorskip("mmseg")

from mae_transfer.checkpoint import save_atomic  # noqa: E402
from mae_transfer.registry import create_model  # noqa: E402


def test_quick_demo_runs_every_stage_and_writes_its_pictures(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, os.path.join(ROOT, "tools", "demo.py"), "--quick", "--output", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-4000:]
    strict = dict(parse_constant=lambda c: pytest.fail(f"summary.json holds {c}: not JSON"))
    summary = json.loads((out / "summary.json").read_text(), **strict)
    seeds = summary["settings"]["seeds"]
    assert len(seeds) >= 2
    for stage, keys in (("detection", {"bbox_AP", "segm_AP"}), ("segmentation", {"mIoU"})):
        for init in ("mae", "random"):
            runs = summary[stage]["runs"][init]
            assert len(runs) == len(seeds) and all(keys <= set(r) for r in runs)
    knn = summary["representation"]["runs"]
    assert all(0 <= r["knn_k20_top1"] <= 100 for side in knn.values() for r in side)
    # the k-NN curve: the initialisation (epoch -1), then every pretraining epoch (knn_every 1)
    curve = summary["pretrain"]["knn_curve_records"]
    assert [r["epoch"] for r in curve] == [-1] + list(range(summary["pretrain"]["epochs"]))
    rows = {(c["stage"], c["metric"]) for c in summary["comparison"]}
    assert {("representation", "k-NN top-1 (k 20)"), ("segmentation", "mIoU")} <= rows
    pngs = [
        summary["pretrain"]["loss_curve"],
        summary["pretrain"]["reconstruction"],
        summary["representation"]["knn_curve"],
        summary["detection"]["picture"],
        summary["segmentation"]["picture"],
        summary["chart"],
    ]
    for png in pngs:
        with open(png, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", png
    assert "mae-transfer demo finished" in r.stdout
    assert "mae init" in r.stdout and "random init" in r.stdout


def test_a_demo_output_that_is_a_file_is_refused_before_the_work(tmp_path):
    (tmp_path / "f").write_text("")
    for given in ("f", "f/sub"):
        cmd = [sys.executable, os.path.join(ROOT, "tools", "demo.py"), "--output", given]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert r.returncode == 2 and f"--output {given} must be a folder" in r.stderr, r.stderr


@pytest.fixture(scope="module")
def demo_encoder(tmp_path_factory):
    """An encoder of the demo's pretraining size (random weights) in the official format."""
    from pretrain.config import read_yaml

    values = read_yaml(os.path.join(ROOT, "configs", "pretrain", "demo_tiny.yaml"))
    torch.manual_seed(123)
    mae = create_model(values["model"], img_size=values["input_size"], **values["model_kwargs"])
    state = {k: v for k, v in mae.state_dict().items() if not k.startswith(("decoder", "mask"))}
    path = str(tmp_path_factory.mktemp("enc") / "encoder.pth")
    save_atomic({"model": state}, path)
    return path, state


def _assert_starts_from(own: dict, state: dict) -> None:
    for name in ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.3.mlp.fc2.bias"):
        assert torch.equal(own[name], state[name]), name
    # pretraining ran at the demo's size: the table is the same grid (class-token row dropped)
    assert torch.equal(own["pos_embed"], state["pos_embed"][:, 1:])


def test_detection_demo_run_starts_from_the_pretrained_tensors(demo_encoder, tmp_path):
    from detectron2.utils.env import seed_all_rng

    from mae_transfer.detection import demo
    from mae_transfer.detection.train import Trainer, build_cfg, register_coco_datasets

    path, state = demo_encoder
    datasets = demo.write_data(str(tmp_path), 4, 2)
    cfg = build_cfg(demo.CONFIG, demo.run_options(str(tmp_path / "mae"), path, 0, datasets))
    register_coco_datasets(cfg)
    seed_all_rng(0)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    _assert_starts_from(trainer.model.backbone.bottom_up.vit.state_dict(), state)
    seed_all_rng(0)
    cfg.defrost()
    cfg.MODEL.WEIGHTS = ""
    random = Trainer(cfg).model.backbone.bottom_up.vit  # the other side: not the encoder
    assert not torch.equal(random.blocks[0].attn.qkv.weight, state["blocks.0.attn.qkv.weight"])


def test_segmentation_demo_run_starts_from_the_pretrained_tensors(demo_encoder, tmp_path):
    from mmengine.hooks import Hook

    from mae_transfer.segmentation import demo
    from mae_transfer.segmentation.runner import build_cfg, make_runner

    path, state = demo_encoder
    root = demo.write_data(str(tmp_path), 4, 2)
    seen = {}

    class Snapshot(Hook):  # after the runner's weight init, before the first update
        def before_train(self, runner):
            seen.update({k: v.clone() for k, v in runner.model.backbone.vit.state_dict().items()})

    opts = demo.demo_options(root, str(tmp_path / "work"), path, iters=2, seed=0)
    opts["train_dataloader.batch_size"] = 2
    runner = make_runner(build_cfg(demo.CONFIG, opts))
    runner.register_hook(Snapshot())
    runner.train()
    _assert_starts_from(seen, state)


def test_bad_lanes_are_refused_before_pretraining(capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "demo_tool", os.path.join(ROOT, "tools", "demo.py")
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.parse_args(["--lanes", "0"]).lanes == 0
    with pytest.raises(SystemExit) as e:
        tool.parse_args(["--lanes", "-1"])
    assert e.value.code == 2 and "--lanes must be >= 0, got -1" in capsys.readouterr().err


def test_the_summary_records_the_schedule_lengths_the_configs_gave():
    """summary.json's settings said epochs 0, det_iters 0, seg_iters 0 (0: the config's)."""
    import yaml

    from mae_transfer.demo.pipeline import FULL, QUICK, _iters_opts, resolved_settings
    from mae_transfer.detection import demo as det_demo
    from mae_transfer.segmentation import demo as seg_demo

    with open(det_demo.CONFIG) as f:
        assert det_demo.schedule_length() == yaml.safe_load(f)["SOLVER"]["MAX_ITER"] > 0
    assert det_demo.schedule_length(_iters_opts(6)) == 6
    assert (
        seg_demo.schedule_length({}) > 0
        and seg_demo.schedule_length({"train_cfg.max_iters": 6}) == 6
    )
    summary = {"pretrain": {"epochs": 12, "knn_every": 3}, "detection": {"iters": 160}}
    got = resolved_settings(summary, FULL)
    assert (got["epochs"], got["knn_every"], got["det_iters"], got["seg_iters"]) == (12, 3, 160, 0)
    assert resolved_settings({}, QUICK)["det_iters"] == QUICK.det_iters  # stages not run
