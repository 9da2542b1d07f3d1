"""The mmseg backbone: shapes, configs, weights through init_cfg, layer decay, train + test."""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch

pytest.importorskip("mmseg")

from conftest import (  # noqa: E402
    ROOT,
    _free_port,
    save_mae_checkpoints,
    write_deep_colour_png,
    write_images,
)
from mmengine.config import Config  # noqa: E402
from mmengine.optim import build_optim_wrapper  # noqa: E402
from mmseg.registry import MODELS  # noqa: E402
from mmseg.utils import register_all_modules  # noqa: E402

import mae_transfer.segmentation  # noqa: E402,F401
from mae_transfer.datasets import write_toy_ade  # noqa: E402
from mae_transfer.pyramid import build_vit_pyramid  # noqa: E402
from mae_transfer.segmentation import MAEViT  # noqa: E402
from mae_transfer.segmentation.demo import demo_options  # noqa: E402
from mae_transfer.segmentation.runner import build_cfg, make_runner  # noqa: E402

register_all_modules(init_default_scope=True)
CONFIG_DIR = os.path.join(ROOT, "configs", "mmseg")
TINY_CONFIG = os.path.join(CONFIG_DIR, "demo_tiny_toy-96x96.py")
TINY = dict(model="vit_base_patch16", embed_dim=32, depth=4, num_heads=2, img_size=64)


@pytest.mark.parametrize("hw", [(64, 64), (70, 90), (129, 33)])
def test_output_shapes_for_odd_sizes(hw):
    bb = MAEViT(**TINY, norm="BN", rel_pos="bias", init_values=0.1, drop_path_rate=0.1)
    outs = bb(torch.randn(2, 3, *hw))
    assert isinstance(outs, tuple) and len(outs) == 4
    g = (-(-hw[0] // 16), -(-hw[1] // 16))
    expect = [(4 * g[0], 4 * g[1]), (2 * g[0], 2 * g[1]), g, (-(-g[0] // 2), -(-g[1] // 2))]
    assert [tuple(o.shape) for o in outs] == [(2, 32, *e) for e in expect]
    assert all(torch.isfinite(o).all() for o in outs)
    assert bb.out_indices == (0, 1, 2, 3)


def test_every_parameter_gets_a_gradient():
    """mmengine's DDP wrapper has find_unused_parameters=False: no parameter may sit idle."""
    bb = MAEViT(**TINY, norm="BN", rel_pos="bias", init_values=0.1)
    # (a random direction: the sum of a BatchNorm's output does not depend on its input)
    sum((o * torch.randn_like(o)).sum() for o in bb(torch.randn(2, 3, 64, 64))).backward()
    assert not [n for n, p in bb.named_parameters() if p.requires_grad and p.grad is None]
    # (where a gradient is zero, rounding leaves ~1e-6; the smallest real ones here are ~0.1)
    zero = [n for n, p in bb.named_parameters() if p.requires_grad and p.grad.abs().max() < 1e-3]
    # but one: the bias of the deconvolution before BatchNorm, whose training-mode statistics
    # subtract it again (as in BEiT's and mmseg's MAE pyramids)
    assert zero == ["rescale.0.0.bias"], f"zero gradient on {zero}"


def test_default_stage_indices_follow_beit():
    with torch.device("meta"):
        assert MAEViT(model="vit_base_patch16").out_indices == (3, 5, 7, 11)
        assert MAEViT(model="vit_large_patch16").out_indices == (7, 11, 15, 23)
        huge = MAEViT(model="vit_huge_patch14")
    assert huge.out_indices == (7, 15, 23, 31) and huge.vit.patch_size == 16


@pytest.mark.parametrize("depth", [2, 3])
def test_default_stage_indices_need_four_blocks(depth):
    """The default used to be (0, 1, 1, 1), refused as 'out_indices must be 4 increasing block
    indices': a value the caller never gave."""
    expected = f"a four-stage pyramid needs depth >= 4 .*, got depth {depth}"
    with pytest.raises(ValueError, match=expected):
        MAEViT(**{**TINY, "depth": depth})
    with pytest.raises(ValueError, match=expected):
        build_vit_pyramid(**{**TINY, "depth": depth})


@pytest.mark.parametrize("path", sorted(p for p in glob.glob(os.path.join(CONFIG_DIR, "*.py"))))
def test_every_config_builds(path):
    cfg = Config.fromfile(path)
    cfg.model.backbone.pretrained = None
    with torch.device("meta"):
        model = MODELS.build(cfg.model)
    assert type(model.backbone).__name__ == "MAEViT"
    d = model.backbone.channels
    assert cfg.model.decode_head.in_channels == [d] * 4


@pytest.mark.parametrize("form", ["official", "ours"])
def test_checkpoints_load_through_init_cfg_with_report(form, tmp_path):
    enc, files = save_mae_checkpoints(tmp_path)
    bb = MAEViT(**TINY, norm="BN", init_cfg=dict(type="Pretrained", checkpoint=files[form]))
    bb.init_weights()
    r = bb.load_report
    assert r.ok and len(r.loaded) == len(enc) - 3  # all but the class token and final norm
    assert {"cls_token", "norm.weight", "norm.bias"} <= set(r.dropped)
    assert any(x.startswith("pos_embed (1, 5, 32)->(1, 16, 32)") for x in r.resized)
    assert r.new and all("relative_position_bias_table" in k for k in r.new)
    assert ("mask_token" in r.dropped) == (form == "ours")
    assert torch.equal(bb.vit.blocks[3].mlp.fc2.weight, enc["blocks.3.mlp.fc2.weight"])


def test_an_openmmlab_file_at_a_url_loads_through_pretrained(tmp_path, fake_download):
    """model.backbone.pretrained may be an https URL (downloaded once into torch hub's cache,
    accepted by the config check) of a file in OpenMMLab's names (backbone.layers.N.ln1, ...)."""
    from test_checkpoint import their_names

    enc, _ = save_mae_checkpoints(tmp_path)
    src = tmp_path / "mmseg.pth"
    torch.save({"state_dict": their_names(enc, "OpenMMLab", "backbone.")}, src)
    served, fetched = fake_download
    url = "https://example.invalid/mmseg/mae_pretrain_vit_base_mmcls.pth"
    served[url] = src
    build_cfg(TINY_CONFIG, {"model.backbone.pretrained": url})  # no 'file not found'
    bb = MAEViT(**TINY, norm="BN", class_token=True, pretrained=url)
    bb.init_weights()
    r = bb.load_report
    assert fetched == [url] and r.ok and "cls_token" in r.loaded
    assert "(OpenMMLab names read as ours; prefix 'backbone.' stripped)" in r.source
    assert torch.equal(bb.vit.blocks[3].mlp.fc2.weight, enc["blocks.3.mlp.fc2.weight"])


def test_class_token_backbone_loads_the_checkpoints_class_token(tmp_path):
    """class_token=True (the ADE20K configs, as BEiT / mmseg): the checkpoint's class token and
    its position row load; the maps are of the patches; every parameter trains."""
    enc, files = save_mae_checkpoints(tmp_path)
    bb = MAEViT(**TINY, norm="BN", class_token=True, pretrained=files["official"])
    bb.init_weights()
    r = bb.load_report
    assert r.ok and "cls_token" in r.loaded and "cls_token" not in r.dropped
    assert torch.equal(bb.vit.cls_token, enc["cls_token"])
    table = bb.vit.blocks[0].attn.relative_position_bias_table
    assert table.shape == ((2 * 4 - 1) ** 2 + 3, 2)
    outs = bb(torch.randn(2, 3, 70, 90))
    assert [tuple(o.shape[-2:]) for o in outs] == [(20, 24), (10, 12), (5, 6), (3, 3)]
    sum(o.sum() for o in outs).backward()
    assert not [n for n, p in bb.named_parameters() if p.requires_grad and p.grad is None]


def test_pretrained_path_loads_when_the_runner_inits_the_model(tmp_path):
    enc, files = save_mae_checkpoints(tmp_path)
    cfg = Config.fromfile(TINY_CONFIG)
    cfg.model.backbone.update(embed_dim=32, num_heads=2, pretrained=files["official"])
    cfg.model.decode_head.in_channels = [32] * 4
    cfg.model.auxiliary_head.in_channels = 32
    model = MODELS.build(cfg.model)
    model.init_weights()
    assert torch.equal(
        model.backbone.vit.blocks[0].attn.qkv.weight, enc["blocks.0.attn.qkv.weight"]
    )


def test_optimizer_constructor_layer_scales():
    cfg = Config.fromfile(TINY_CONFIG)
    model = MODELS.build(cfg.model)
    wrapper_cfg = dict(cfg.optim_wrapper)
    wrapper_cfg["paramwise_cfg"] = dict(layer_decay_rate=0.5)
    wrapper = build_optim_wrapper(model, wrapper_cfg)
    base = cfg.optim_wrapper.optimizer.lr
    groups = wrapper.optimizer.param_groups
    by_param = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    scale = {n: by_param[id(p)]["lr"] / base for n, p in named.items()}
    assert scale["backbone.vit.pos_embed"] == pytest.approx(0.5**5)
    assert scale["backbone.vit.blocks.0.attn.qkv.weight"] == pytest.approx(0.5**4)
    assert scale["backbone.vit.blocks.3.attn.qkv.weight"] == pytest.approx(0.5)
    assert scale["decode_head.conv_seg.weight"] == pytest.approx(1.0)
    wd = {n: by_param[id(p)]["weight_decay"] for n, p in named.items()}
    assert wd["backbone.vit.blocks.0.attn.relative_position_bias_table"] == 0
    assert wd["backbone.vit.blocks.0.norm1.weight"] == 0
    assert wd["backbone.vit.blocks.0.attn.qkv.weight"] == cfg.optim_wrapper.optimizer.weight_decay


def test_bad_config_values_get_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="model.backbone.norm must be one of"):
        build_cfg(TINY_CONFIG, {"model.backbone.norm": "BatchNorm"})
    with pytest.raises(ValueError, match="model.backbone.pretrained: file not found"):
        build_cfg(TINY_CONFIG, {"model.backbone.pretrained": str(tmp_path / "nope.pth")})
    with pytest.raises(ValueError, match="layer_decay_rate must be in"):
        build_cfg(TINY_CONFIG, {"optim_wrapper.paramwise_cfg.layer_decay_rate": 0})
    # mmseg's MAE configs have this neck: it trained on maps at strides 1-64, without a word
    neck = {"model.neck": dict(type="Feature2Pyramid", embed_dim=32, rescales=[4, 2, 1, 0.5])}
    with pytest.raises(ValueError, match="model.neck Feature2Pyramid rescales the maps MAEViT"):
        build_cfg(TINY_CONFIG, neck)
    from mae_transfer.segmentation.runner import parse_cfg_options

    assert build_cfg(TINY_CONFIG, {**neck, **parse_cfg_options(["model.neck=None"])})
    # testing a trained checkpoint does not need the pretraining file
    missing = {"model.backbone.pretrained": str(tmp_path / "nope.pth")}
    cfg = build_cfg(TINY_CONFIG, missing, for_training=False)
    assert cfg.model.backbone.pretrained is None


def test_training_lowers_loss_testing_returns_miou_and_resume_works(tmp_path):
    root = str(tmp_path / "toy_ade")
    write_toy_ade(root, num_train=16, num_val=4, size=64)
    _, files = save_mae_checkpoints(tmp_path)
    opts = demo_options(root, str(tmp_path / "work"), files["official"], iters=30)
    opts.update(
        {
            "model.backbone.embed_dim": 32,
            "model.backbone.num_heads": 2,
            "model.decode_head.in_channels": [32] * 4,
            "model.auxiliary_head.in_channels": 32,
            "default_hooks.checkpoint.interval": 15,
            "train_dataloader.batch_size": 4,
        }
    )
    runner = make_runner(build_cfg(TINY_CONFIG, opts))
    runner.train()
    losses = runner.message_hub.get_scalar("train/loss").data[0]
    assert losses[-5:].mean() < losses[:5].mean()
    metrics = runner.val()
    assert {"mIoU", "aAcc", "mAcc"} <= set(metrics) and 0 <= metrics["mIoU"] <= 100
    # tools/train_seg.py --resume, as users run it: continues from iter_30.pth to 35
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import train_seg

    opts.update({"train_cfg.max_iters": 35, "train_cfg.val_begin": 36})
    cli = [f"{k}={v}".replace(" ", "") for k, v in opts.items()]
    assert train_seg.main([TINY_CONFIG, "--resume", "--cfg-options", *cli]) == 0
    assert (tmp_path / "work" / "iter_35.pth").is_file()
    state = torch.load(tmp_path / "work" / "iter_35.pth", map_location="cpu", weights_only=False)
    assert state["meta"]["iter"] == 35
    logs = "".join(p.read_text() for p in (tmp_path / "work").glob("*/*.log"))
    assert "resumed epoch: 0, iter: 30" in logs
    _check_test_and_visualize_tools(tmp_path, root, opts)


@pytest.fixture
def deterministic():
    """torch's deterministic kernels: the relative-position table's gradient (an indexed
    accumulation) is summed in another order from run to run on several CPU threads."""
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)


def test_a_resumed_run_ends_with_the_weights_of_the_uninterrupted_one(tmp_path, deterministic):
    """The model's draws (drop path) restarted from the seed on resume: loss and weights
    drifted from the uninterrupted run's (mmengine replays only the data). A validation at
    the checkpoint's iteration (the ADE20K recipe's 16,000) drew from torch's generator in
    the uninterrupted run only: it no longer moves it."""
    root = str(tmp_path / "toy_ade")
    write_toy_ade(root, num_train=8, num_val=2, size=64)
    opts = demo_options(root, "", None, iters=4)
    opts.update({"model.backbone.drop_path_rate": 0.5, "default_hooks.checkpoint.interval": 2})
    opts.update({"train_cfg.val_interval": 2, "train_cfg.val_begin": 1})
    opts.update({"train_dataloader.batch_size": 2})
    from mmengine.hooks import Hook

    class Kill(Hook):  # after the checkpoint of iteration 2 (CheckpointHook is VERY_LOW)
        priority = "LOWEST"

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            if runner.iter + 1 == 2:
                raise KeyboardInterrupt

    for run, killed in (("whole", False), ("cut", True), ("cut", False)):
        cfg = build_cfg(TINY_CONFIG, {**opts, "work_dir": str(tmp_path / run)})
        cfg.resume = run == "cut" and not killed
        runner = make_runner(cfg)
        if killed:
            runner.register_hook(Kill())
            with pytest.raises(KeyboardInterrupt):
                runner.train()
        else:
            runner.train()
    whole, resumed = (
        torch.load(tmp_path / run / "iter_4.pth", map_location="cpu", weights_only=False)
        for run in ("whole", "cut")
    )
    for k, v in whole["state_dict"].items():
        assert torch.equal(v, resumed["state_dict"][k]), k


def test_the_random_state_hook_can_be_named_in_a_config_and_is_added_once(tmp_path):
    """mmseg's own tools/train.py users name it in custom_hooks (it was not registered)."""
    from mae_transfer.segmentation import TorchRNGStateHook

    opts = {"work_dir": str(tmp_path), "custom_hooks": [dict(type="TorchRNGStateHook")]}
    runner = make_runner(build_cfg(TINY_CONFIG, opts))
    assert sum(isinstance(h, TorchRNGStateHook) for h in runner.hooks) == 1
    runner = make_runner(build_cfg(TINY_CONFIG, {"work_dir": str(tmp_path)}))
    assert sum(isinstance(h, TorchRNGStateHook) for h in runner.hooks) == 1
    # a checkpoint of an earlier version (its state under "cpu") still resumes its draws
    from types import SimpleNamespace

    saved = torch.get_rng_state()
    expected = torch.rand(3)
    resuming = SimpleNamespace(_resume=True, _randomness_cfg={})
    old = {"meta": {"torch_rng_state": {"cpu": saved}}}
    TorchRNGStateHook().after_load_checkpoint(resuming, old)
    assert torch.equal(torch.rand(3), expected)
    new = {}
    TorchRNGStateHook().before_save_checkpoint(resuming, new)
    expected = torch.rand(3)
    TorchRNGStateHook().after_load_checkpoint(resuming, new)
    assert torch.equal(torch.rand(3), expected)


def test_a_resume_with_more_iterations_says_the_schedule_keeps_its_end(tmp_path):
    """mmengine restores the schedulers' end: the added iterations trained at lr 0 while the
    log said 'PolyLR: end 200 -> 24, following train_cfg.max_iters'; and fewer iterations than
    the checkpoint's trained nothing, silently."""
    root = str(tmp_path / "toy_ade")
    write_toy_ade(root, num_train=4, num_val=2, size=64)
    from mae_transfer.segmentation.demo import schedule

    opts = demo_options(root, str(tmp_path / "work"), None, iters=2)
    opts.update({"train_dataloader.batch_size": 2, "param_scheduler": schedule(2)})
    make_runner(build_cfg(TINY_CONFIG, opts)).train()
    opts.update({"train_cfg.max_iters": 3, "train_cfg.val_begin": 4})
    opts["param_scheduler"] = schedule(3)
    cfg = build_cfg(TINY_CONFIG, opts)
    cfg.resume = True
    make_runner(cfg).train()
    logs = "".join(p.read_text() for p in (tmp_path / "work").glob("*/*.log"))
    assert "PolyLR: resumed with the checkpoint's end 2, not the config's 3" in logs
    # resumed past the new end: mmengine trained nothing without a word
    opts.update({"train_cfg.max_iters": 2, "param_scheduler": schedule(2)})
    cfg = build_cfg(TINY_CONFIG, opts)
    cfg.resume = True
    make_runner(cfg).train()
    logs = "".join(p.read_text() for p in (tmp_path / "work").glob("*/*.log"))
    assert "ends at iteration 3, train_cfg.max_iters is 2: nothing left to train" in logs


def _check_test_and_visualize_tools(tmp_path, root, opts):
    """tools/test_seg.py and tools/visualize_seg.py on the checkpoint the runner wrote."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import test_seg
    import visualize_seg

    ckpt = str(tmp_path / "work" / "iter_35.pth")
    cfg_opts = [
        f"{k}={v}"
        for k, v in opts.items()
        if k.endswith("data_root") or "channels" in k or k.endswith(("embed_dim", "num_heads"))
    ]
    metrics_json = tmp_path / "metrics.json"
    assert (
        test_seg.main(
            [
                TINY_CONFIG,
                ckpt,
                "--work-dir",
                str(tmp_path / "test"),
                "--out",
                str(metrics_json),
                "--cfg-options",
                *cfg_opts,
            ]
        )
        == 0
    )
    plain = json.loads(metrics_json.read_text())
    assert "mIoU" in plain

    def tta(*options) -> dict:
        out = tmp_path / "tta.json"
        argv = [TINY_CONFIG, ckpt, "--work-dir", str(tmp_path / "test"), "--out", str(out)]
        assert test_seg.main([*argv, "--tta", *options, "--cfg-options", *cfg_opts]) == 0
        return json.loads(out.read_text())

    # the test scale alone, unflipped, is the plain test to the digit; other scales are not
    assert tta("--tta-ratios", "1.0", "--tta-no-flip") == plain
    # predictions written and drawn, one file per validation image, as the metrics saw them
    preds, shown = tmp_path / "preds", tmp_path / "shown"
    scaled = tta("--tta-ratios", "0.75", "1.5", "--pred-dir", str(preds), "--show-dir", str(shown))
    assert scaled != plain
    assert _pixel_accuracy(root, preds) == pytest.approx(scaled["aAcc"], abs=0.01)
    assert len(list(shown.rglob("*.png"))) == 4  # a drawing per validation image
    png = tmp_path / "overlay.png"
    val = os.path.join(root, "images", "validation")
    dumped = tmp_path / "work" / os.path.basename(TINY_CONFIG)  # the config mmengine saved
    assert (
        visualize_seg.main([str(dumped), ckpt, "--images", val, "--num", "2", "--output", str(png)])
        == 0
    )
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _pixel_accuracy(root: str, preds) -> float:
    """The accuracy (%) of the label PNGs --pred-dir wrote, one per validation image, of its
    label's size, numbered as the labels are (0 = unlabeled, 1.. the classes: the toy set
    reduces the zero label), over the labelled pixels: the metric's aAcc if they are right."""
    import numpy as np
    from PIL import Image

    labels = sorted(glob.glob(os.path.join(root, "annotations", "validation", "*.png")))
    written = sorted(preds.glob("*.png"))
    assert [p.name for p in written] == [os.path.basename(p) for p in labels]
    right = labelled = 0
    for pred, label in zip(written, labels):
        pred, label = np.asarray(Image.open(pred)), np.asarray(Image.open(label))
        assert pred.shape == label.shape and pred.dtype == np.uint8 and pred.min() >= 1
        right += int(((pred == label) & (label > 0)).sum())
        labelled += int((label > 0).sum())
    return 100 * right / labelled


def _lr_after(cfg, iters: int) -> float:
    """The lr the config's schedulers give after ``iters`` iterations, from 1."""
    from mmengine.registry import PARAM_SCHEDULERS

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    schedulers = [PARAM_SCHEDULERS.build({**s, "optimizer": opt}) for s in cfg.param_scheduler]
    for _ in range(iters):
        opt.step()
        for s in schedulers:
            s.step()
    return opt.param_groups[0]["lr"]


@pytest.fixture
def mmengine_log():
    """What print_log(logger='current') says meanwhile, as 'LEVEL - message' lines, read from
    the current MMLogger (its own handlers may write to a stream another test captured)."""
    from mmengine.logging import MMLogger

    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(f"{record.levelname} - {record.getMessage()}")
    logger = MMLogger.get_current_instance()
    logger.addHandler(handler)
    yield lines
    logger.removeHandler(handler)


def test_a_shortened_run_s_lr_decay_follows_train_cfg_max_iters(mmengine_log):
    """train_cfg.max_iters=30 kept PolyLR's end at the file's 200: the lr was still 0.91x its
    peak when the run stopped."""

    def said() -> str:
        out = "\n".join(mmengine_log)
        mmengine_log.clear()
        return out

    cfg = build_cfg(TINY_CONFIG, {"train_cfg.max_iters": 30})
    assert [s.end for s in cfg.param_scheduler] == [13, 30]
    assert _lr_after(cfg, 30) == 0.0
    out = said()
    assert "INFO - param_scheduler.1 PolyLR: end 200 -> 30, following train_cfg.max_iters" in out
    # a run shorter than the warmup: said, and the decay that never acts is left as it is
    cfg = build_cfg(TINY_CONFIG, {"train_cfg.max_iters": 10})
    assert [s.end for s in cfg.param_scheduler] == [13, 200]
    out = said()
    assert "WARNING - param_scheduler.0 LinearLR runs over iterations 0-13, beyond " in out
    assert "it is cut short, its lr change left unfinished" in out
    assert "param_scheduler.1 PolyLR runs over iterations 13-200" in out and "never acts" in out
    # the schedule as given: an end of one's own, a schedule of one's own, the file's length
    cfg = build_cfg(TINY_CONFIG, {"train_cfg.max_iters": 30, "param_scheduler.1.end": 50})
    assert [s.end for s in cfg.param_scheduler] == [13, 50]
    assert "param_scheduler.1 PolyLR runs over iterations 13-50" in said()
    own = [dict(type="PolyLR", begin=0, end=200, by_epoch=False)]
    cfg = build_cfg(TINY_CONFIG, {"train_cfg.max_iters": 30, "param_scheduler": own})
    assert cfg.param_scheduler[0].end == 200
    for options in ({}, {"train_cfg.max_iters": 200}):
        assert [s.end for s in build_cfg(TINY_CONFIG, options).param_scheduler] == [13, 200]
    assert "param_scheduler" not in said()


def _one_iteration_resumable(tmp_path, work_name: str):
    """A toy ADE20K and the tiny config's options for one iteration in ``tmp_path/work_name``:
    (work dir, options, train_seg's arguments with --resume)."""
    root = str(tmp_path / "toy_ade")
    write_toy_ade(root, num_train=2, num_val=2, size=32)
    work = tmp_path / work_name
    opts = demo_options(root, str(work), None, iters=1)
    opts.update({**TINY_OPTS, "train_dataloader.batch_size": 2})
    return work, opts, [TINY_CONFIG, "--resume", "--work-dir", str(work)]


def test_resume_in_a_work_dir_without_checkpoints_warns_and_starts_afresh(tmp_path):
    """--resume into an empty or mistyped work dir trained from scratch with exit 0 and
    mmengine's 'Auto resumed from the latest checkpoint None.'; it still starts afresh (a
    requeued job's first run passes --resume too), saying so."""
    work, opts, argv = _one_iteration_resumable(tmp_path, "typo")
    assert _tool("train_seg").main(argv + ["--cfg-options", *_cli_options(opts)]) == 0
    assert (work / "iter_1.pth").is_file()
    logs = "".join(p.read_text() for p in work.glob("*/*.log"))
    assert f"WARNING - --resume: no checkpoint to resume in the work dir {work} (no" in logs
    assert "training starts from scratch" in logs
    assert "latest checkpoint None" not in logs


def test_resume_under_options_its_checkpoint_does_not_fit_is_refused(tmp_path, caplog):
    """--resume with another head width (or num_classes, backbone size): mmengine warned about
    each tensor of another shape, then the first step failed in AdamW ('The size of tensor a
    (64) must match the size of tensor b (32)'), naming no option."""
    work, opts, argv = _one_iteration_resumable(tmp_path, "work")
    assert _tool("train_seg").main(argv + ["--cfg-options", *_cli_options(opts)]) == 0
    opts.update({"train_cfg.max_iters": 2, "model.decode_head.channels": 32})
    code = _tool("train_seg").main(argv + ["--cfg-options", *_cli_options(opts)])
    _refused(caplog, code, "iter_1.pth does not fit the segmentor of this config", "shape")
    assert not (work / "iter_2.pth").exists()


TINY_OPTS = {  # the tiny config at width 32, as the tests' checkpoints
    "model.backbone.embed_dim": 32,
    "model.backbone.num_heads": 2,
    "model.decode_head.in_channels": [32] * 4,
    "model.auxiliary_head.in_channels": 32,
}


def _cli_options(opts) -> list:
    return [f"{k}={v}".replace(" ", "") for k, v in opts.items()]


def _refused(caplog, code: int, *expected: str) -> None:
    """Exit code 2 and one error record holding every expected piece (no traceback)."""
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert code == 2 and len(errors) == 1, (code, errors)
    assert all(e in errors[0] for e in expected), errors[0]


def _tool(name: str):
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    return __import__(name)


@pytest.fixture
def tiny_segmentor(tmp_path):
    """A width-32 segmentor checkpoint of the tiny config (mmengine's form), the config's
    overrides and a folder of 2 images."""
    cfg = build_cfg(TINY_CONFIG, dict(TINY_OPTS), for_training=False)
    model = MODELS.build(cfg.model)
    path = str(tmp_path / "seg.pth")
    torch.save({"meta": {"iter": 1}, "state_dict": model.state_dict()}, path)
    images = tmp_path / "images"
    write_images(str(images), 2, size=(48, 64))
    return path, dict(TINY_OPTS), str(images)


@pytest.mark.parametrize("tool", ["test_seg", "visualize_seg"])
@pytest.mark.parametrize("case", ["pretraining", "other_width", "no_auxiliary_head", "class_token"])
def test_seg_tools_refuse_a_checkpoint_that_does_not_fill_the_model(
    tiny_segmentor, tmp_path, caplog, tool, case
):
    """mmengine loads what fits and reports the rest: these printed an mIoU / drew a PNG from
    random heads, with exit 0."""
    path, opts, images = tiny_segmentor
    expected = ["does not fit the segmentor of this config"]
    if case == "pretraining":
        _, files = save_mae_checkpoints(tmp_path)
        path = files["official"]
        expected += ["auxiliary_head (8)", "a backbone only", "model.backbone.pretrained="]
    elif case == "other_width":
        opts = {}  # the config's own width, 96
        expected += ["of another shape", "width 32", "width 96"]
    elif case == "class_token":  # trained without it, tested with it: the error says which
        opts = {**opts, "model.backbone.class_token": True}
        expected += ["trained without the class token", "model.backbone.class_token=False"]
    else:
        state = torch.load(path, weights_only=True)["state_dict"]
        state = {k: v for k, v in state.items() if not k.startswith("auxiliary_head.")}
        torch.save({"state_dict": state}, path)
        expected += ["tensors missing (auxiliary_head (8))"]
    # no data: the checkpoint is checked before the data sets
    opts["test_dataloader.dataset.data_root"] = str(tmp_path / "nodata")
    png = str(tmp_path / "out.png")
    if tool == "test_seg":
        args = ["--work-dir", str(tmp_path / "w")]
    else:
        args = ["--images", images, "--output", png]
    argv = [TINY_CONFIG, path, *args, "--cfg-options", *_cli_options(opts)]
    _refused(caplog, _tool(tool).main(argv), *expected)
    assert not os.path.exists(png)


def test_a_segmentor_as_pretrained_file_reports_what_it_left_out_as_dropped(tiny_segmentor):
    """A trained segmentor's iter_N.pth as model.backbone.pretrained: the report said 'loaded 55
    tensors ... (prefix 'backbone.vit.' stripped)' and nothing of backbone.rescale and the
    heads, which were left out with the prefix. As a path (MAEViT) and as a read state dict
    (detection's MAECheckpointer passes one), every key of the file is in one list."""
    from mae_transfer.checkpoint import load_pretrained

    path, opts, _ = tiny_segmentor
    whole = torch.load(path, weights_only=True)["state_dict"]
    cfg = build_cfg(TINY_CONFIG, {**opts, "model.backbone.pretrained": path})
    backbone = MODELS.build(cfg.model).backbone
    backbone.init_weights()
    state_report = load_pretrained(backbone.vit, {"state_dict": whole}, log=False, source=path)
    for r in (backbone.load_report, state_report):
        assert r.ok and len(r.loaded) == sum(k.startswith("backbone.vit.") for k in whole)
        left_out = [k for k in whole if not k.startswith("backbone.vit.")]
        assert left_out and set(left_out) <= set(r.dropped)
        assert len(r.loaded) + len(r.dropped) == len(whole)
        assert {"backbone.rescale.0.0.weight", "auxiliary_head.conv_seg.weight"} <= set(r.dropped)
        summary = r.summary()
        assert "(prefix 'backbone.vit.' stripped)" in summary
        title = "dropped from checkpoint (not used by this model)"
        assert f"{title} ({len(r.dropped)}): backbone.rescale.*.*.weight" in summary


def test_a_storage_backend_checkpoint_is_read_the_way_mmengine_reads_it(tmp_path, monkeypatch):
    from mmengine.runner import CheckpointLoader

    from mae_transfer.segmentation.checkpoint import read_segmentor

    seen = []

    def fake(path, map_location=None, logger=None):
        seen.append(path)
        return {"state_dict": {"module.backbone.x": torch.zeros(1)}, "meta": {"iter": 5}}

    monkeypatch.setattr(CheckpointLoader, "load_checkpoint", staticmethod(fake))
    url = "s3://bucket/work_dir/iter_160000.pth"
    state, meta = read_segmentor(url)
    assert seen == [url] and list(state) == ["backbone.x"] and meta == {"iter": 5}


def test_an_https_checkpoint_is_downloaded_and_read_with_weights_only(tmp_path, fake_download):
    """mmengine's http loader unpickles whatever the file holds: an http(s) URL goes through
    our download into torch hub's cache and load_file instead."""
    from mae_transfer.segmentation.checkpoint import read_segmentor

    src = tmp_path / "iter_160000.pth"
    torch.save({"state_dict": {"module.backbone.x": torch.ones(1)}, "meta": {"iter": 7}}, src)
    served, fetched = fake_download
    url = "https://example.invalid/work_dir/iter_160000.pth"
    served[url] = src
    state, meta = read_segmentor(url)
    assert fetched == [url] and list(state) == ["backbone.x"] and meta == {"iter": 7}


def test_visualize_seg_takes_cfg_options(tiny_segmentor, tmp_path):
    """A model trained with overrides is drawn from the original config with the same
    --cfg-options; the palette comes from the data set type when the checkpoint has none."""
    path, opts, images = tiny_segmentor
    png = tmp_path / "seg.png"
    argv = [TINY_CONFIG, path, "--images", images, "--output", str(png)]
    assert _tool("visualize_seg").main(argv + ["--cfg-options", *_cli_options(opts)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_visualize_seg_output_a_folder_a_name_without_suffix_a_folder_to_make(
    tiny_segmentor, tmp_path, capsys, monkeypatch
):
    """A missing folder failed once the model had run (FileNotFoundError), a folder or a name
    without a suffix in PIL: as visualize_det, through engine.launch.picture_path."""
    path, opts, images = tiny_segmentor
    tool = _tool("visualize_seg")
    made_first, init = [], tool.init_segmentor

    def init_segmentor(*args):
        made_first.append((tmp_path / "new" / "sub").is_dir())
        return init(*args)

    monkeypatch.setattr(tool, "init_segmentor", init_segmentor)
    (tmp_path / "folder").mkdir()
    for given, written in (
        ("named", "named.png"),
        ("folder", "folder/segmentation.png"),
        ("new/sub/s.png", "new/sub/s.png"),
    ):
        argv = [TINY_CONFIG, path, "--images", images, "--num", "1"]
        argv += ["--output", str(tmp_path / given), "--cfg-options", *_cli_options(opts)]
        assert tool.main(argv) == 0, given
        png = tmp_path / written
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", given
        assert f"wrote {png}" in capsys.readouterr().out, given  # said as written
    assert made_first[-1]  # the folder was made before the model was built


def test_visualize_seg_skips_unreadable_images(tiny_segmentor, tmp_path, caplog):
    """One unreadable file among --images was a traceback from mmcv (after the model was
    built); now skipped with a warning, and none readable is refused (exit 2)."""

    path, opts, images = tiny_segmentor
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "a_bad.jpg").write_text("not an image")
    shutil.copy(sorted(glob.glob(os.path.join(images, "*")))[0], folder / "b_good.jpg")
    png = tmp_path / "s.png"
    argv = [TINY_CONFIG, path, "--images", str(folder), "--output", str(png)]
    argv += ["--cfg-options", *_cli_options(opts)]
    with caplog.at_level(logging.WARNING):
        assert _tool("visualize_seg").main(argv) == 0
    assert png.is_file() and "skipped 1 unreadable file(s), e.g. " in caplog.text
    (folder / "b_good.jpg").unlink()
    assert _tool("visualize_seg").main(argv) == 2


def test_visualize_seg_refuses_num_0_before_the_model_is_built(
    tiny_segmentor, tmp_path, capsys, monkeypatch
):
    """--num 0 ended in ``max() arg is an empty sequence`` after the model had run."""
    path, opts, images = tiny_segmentor
    tool = _tool("visualize_seg")
    monkeypatch.setattr(tool, "init_segmentor", lambda *a: pytest.fail("the model was built"))
    argv = [TINY_CONFIG, path, "--images", images, "--num", "0"]
    with pytest.raises(SystemExit) as e:
        tool.main([*argv, "--output", str(tmp_path / "s.png")])
    assert e.value.code == 2 and "--num must be >= 1, got 0" in capsys.readouterr().err


def test_test_seg_out_a_folder_is_refused_a_missing_folder_made_before_the_evaluation(
    tiny_segmentor, tmp_path, caplog, monkeypatch
):
    """Both failed once the whole evaluation was over (IsADirectoryError, FileNotFoundError)."""
    path, opts, _ = tiny_segmentor
    root = str(tmp_path / "toy_ade")
    write_toy_ade(root, num_train=0, num_val=1, size=32)
    from mae_transfer.segmentation import testing

    tool = _tool("test_seg")
    made_first, make = [], testing.make_runner

    def make_runner(cfg):
        made_first.append((tmp_path / "new" / "sub").is_dir())
        return make(cfg)

    monkeypatch.setattr(testing, "make_runner", make_runner)
    argv = [TINY_CONFIG, path, "--work-dir", str(tmp_path / "w"), "--cfg-options"]
    argv += _cli_options({**opts, "test_dataloader.dataset.data_root": root})
    out = tmp_path / "new" / "sub" / "metrics.json"
    assert tool.main([*argv, "--out", str(out)]) == 0
    assert made_first == [True] and "mIoU" in json.loads(out.read_text())
    code = tool.main([*argv, "--out", str(tmp_path)])
    _refused(caplog, code, f"--out {tmp_path} names a folder: name the file")
    assert made_first == [True]  # refused before the evaluation


def _bad_inputs(tmp_path, checkpoint: str, images: str) -> dict:
    """case: (tool, argv, expected pieces of the message)."""
    nothere = str(tmp_path / "nothere")
    train = [TINY_CONFIG, "--work-dir", str(tmp_path / "w")]
    data = [f"val_dataloader.dataset.data_root={images}"]
    return {
        "pretrained": (
            "train_seg",
            [*train, "--cfg-options", f"model.backbone.pretrained={nothere}.pth"],
            ("model.backbone.pretrained: file not found", "nothere.pth"),
        ),
        "fp16_on_cpu": ("train_seg", [*train, "--amp", "fp16"], ("amp fp16 needs CUDA",)),
        # mmengine's DictAction: 'not enough values to unpack (expected 2, got 1)'
        "option_without_equals": (
            "train_seg",
            [*train, "--cfg-options", "train_cfg.max_iters", "5"],
            ("--cfg-options takes key=value pairs", "'train_cfg.max_iters', '5'"),
        ),
        # 'invalid literal for int()' once the Runner was built, naming no key
        "option_not_a_number": (
            "train_seg",
            [*train, "--cfg-options", "train_cfg.max_iters=abc"],
            ("train_cfg.max_iters takes a number (the config has 200), got 'abc'",),
        ),
        "option_not_a_flag": (
            "train_seg",
            [*train, "--cfg-options", "model.backbone.class_token=yes"],
            ("model.backbone.class_token takes True or False, got 'yes'",),
        ),
        # a traceback once the Runner had built the data (the model is built on meta first)
        "misspelt_key": (
            "train_seg",
            [*train, "--cfg-options", "model.backbone.embeddim=64"],
            ("unexpected keyword argument 'embeddim'", "(did you mean 'embed_dim'?)"),
        ),
        "out_indices": (
            "train_seg",
            [*train, "--cfg-options", "model.backbone.out_indices=(0,1,2,9)"],
            ("model (EncoderDecoder):", "(0, 1, 2, 9)"),
        ),
        "data_root": (
            "train_seg",
            [*train, "--cfg-options", f"train_dataloader.dataset.data_root={nothere}", *data],
            ("train_dataloader.dataset.data_root", "nothere does not exist"),
        ),
        "test_config": ("test_seg", [nothere + ".py", checkpoint], ("nothere.py' does not",)),
        "test_checkpoint": ("test_seg", [TINY_CONFIG, nothere + ".pth"], ("nothere.pth' does",)),
        "vis_config": (
            "visualize_seg",
            [nothere + ".py", checkpoint, "--images", images],
            ("nothere.py' does not exist",),
        ),
        "vis_checkpoint": (
            "visualize_seg",
            [TINY_CONFIG, nothere + ".pth", "--images", images],
            ("checkpoint", "nothere.pth' does not exist"),
        ),
        "vis_images": (
            "visualize_seg",
            [TINY_CONFIG, checkpoint, "--images", nothere],
            ("--images", "nothere does not exist"),
        ),
    }


def test_a_data_set_and_its_pipeline_must_agree_on_reduce_zero_label_and_counts_are_positive():
    """Setting the data set's alone (labels counted from 0) failed on mmseg's assertion when
    the first sample loaded, after the Runner was built."""
    from mae_transfer.engine.config import ConfigError

    with pytest.raises(
        ConfigError,
        match=r"train_dataloader.dataset.reduce_zero_label is False "
        r"but train_dataloader.dataset.pipeline.1 \(LoadAnnotations\) has "
        r"reduce_zero_label=True",
    ):
        build_cfg(TINY_CONFIG, {"train_dataloader.dataset.reduce_zero_label": False})
    for key in ("train_cfg.val_interval", "train_dataloader.batch_size"):  # (tracebacks)
        with pytest.raises(ConfigError, match=f"{key} must be > 0, got 0"):
            build_cfg(TINY_CONFIG, {key: 0})
    both = {"train_dataloader.dataset.reduce_zero_label": False}
    both["train_dataloader.dataset.pipeline.1.reduce_zero_label"] = False
    build_cfg(TINY_CONFIG, both)


def test_a_key_the_config_lacks_is_said_with_the_closest_one(monkeypatch):
    """optim_wrapper.paramwise_cfg.layer_decay=0.9 was silently ignored (the constructor reads
    layer_decay_rate): the run said 'layer decay 0.75'."""
    from mae_transfer.engine.config import ConfigError
    from mae_transfer.segmentation import runner

    said = []  # (mmengine's current logger may print to an earlier test's stream)
    monkeypatch.setattr(runner, "print_log", lambda msg, **kw: said.append(msg))
    build_cfg(TINY_CONFIG, {"optim_wrapper.paramwise_cfg.layer_decay": 0.9})
    text = " ".join(said)
    assert "optim_wrapper.paramwise_cfg has no 'layer_decay' in the config" in text
    assert "(did you mean optim_wrapper.paramwise_cfg.layer_decay_rate?)" in text
    # arguments the backbone takes (its ViT's sizes) are not "added keys", a typo still is
    said.clear()
    build_cfg(TINY_CONFIG, {"model.backbone.mlp_ratio": 2.0, "model.backbone.qkv_bias": False})
    assert not said
    with pytest.raises(ConfigError, match="did you mean 'embed_dim'"):
        build_cfg(TINY_CONFIG, {"model.backbone.embed_dims": 32})
    assert "model.backbone has no 'embed_dims'" in " ".join(said)


@pytest.mark.parametrize(
    "case",
    ["pretrained", "fp16_on_cpu", "option_without_equals", "option_not_a_number",
     "option_not_a_flag", "misspelt_key", "out_indices", "data_root", "test_config",
     "test_checkpoint", "vis_config", "vis_checkpoint", "vis_images"],
)  # fmt: skip
def test_seg_tools_refuse_bad_input_with_exit_2(tiny_segmentor, tmp_path, caplog, case):
    """Each of these ended in a traceback (exit 1)."""
    if case == "fp16_on_cpu" and torch.cuda.is_available():
        pytest.skip("fp16 is allowed with CUDA")
    path, opts, images = tiny_segmentor
    tool, argv, expected = _bad_inputs(tmp_path, path, images)[case]
    if tool == "visualize_seg":
        argv += ["--cfg-options", *_cli_options(opts)]
    _refused(caplog, _tool(tool).main(argv), *expected)


RECIPE = os.path.join(CONFIG_DIR, "upernet_mae_vit_base_8xb2-160k_ade20k-512x512.py")


@pytest.fixture
def fresh_precision(monkeypatch):
    """Fakes the CPU / GPU precision checks per test (see tests/test_precision.py)."""
    from mae_transfer import device

    monkeypatch.setattr(device, "_logged", set())
    device.cpu_bf16_check.cache_clear()
    yield monkeypatch
    device.cpu_bf16_check.cache_clear()


@pytest.mark.parametrize(
    "hardware,amp,wrapper,dtype",
    [
        ("avx2", None, "OptimWrapper", None),  # the recipe's amp = "auto" on a CPU without bf16
        ("amx", None, "AutocastOptimWrapper", "bfloat16"),  # ... on an AMX CPU
        ("sm75", None, "OptimWrapper", None),  # T4: emulated bf16, so fp32
        ("sm80", None, "AutocastOptimWrapper", "bfloat16"),  # A100: bf16, no loss scaler
        ("sm90", "auto", "AutocastOptimWrapper", "bfloat16"),
        ("sm70", "fp16", "AmpOptimWrapper", "float16"),  # V100: fp16 + loss scaling on request
        ("sm80", "fp32", "OptimWrapper", None),
        ("avx2", "bf16", "AutocastOptimWrapper", "bfloat16"),  # on request (with a warning)
    ],
)
def test_precision_sets_the_optim_wrapper(fresh_precision, hardware, amp, wrapper, dtype):
    from test_precision import fake_cpu, fake_cuda

    if hardware.startswith("sm"):
        fake_cuda(fresh_precision, hardware)
    else:
        fake_cpu(fresh_precision, {"amx_bf16"} if hardware == "amx" else {"avx2"})
    cfg = build_cfg(RECIPE, {"model.backbone.pretrained": None}, amp=amp)
    w = cfg.optim_wrapper
    assert (w.type, w.get("dtype")) == (wrapper, dtype)
    assert w.get("loss_scale") == ("dynamic" if dtype == "float16" else None)


def test_fp16_without_cuda_and_unknown_modes_are_refused(fresh_precision):
    from test_precision import fake_cpu

    fake_cpu(fresh_precision, {"avx2"})
    with pytest.raises(ValueError, match="amp fp16 needs CUDA"):
        build_cfg(RECIPE, {"model.backbone.pretrained": None}, amp="fp16")
    with pytest.raises(ValueError, match="must be one of"):
        build_cfg(RECIPE, {"model.backbone.pretrained": None, "amp": "fp8"})


SLURM_TASK_3 = {
    "SLURM_PROCID": "3",
    "SLURM_NTASKS": "8",
    "SLURM_NODELIST": "n1",
    "SLURM_LOCALID": "3",
}
# what torchrun sets in each process (rank 5 of 8 here)
TORCHRUN_RANK_5 = {"RANK": "5", "WORLD_SIZE": "8", "MASTER_ADDR": "n1", "MASTER_PORT": "29500"}


@pytest.mark.parametrize(
    "launcher,env,gpu",
    [
        ("pytorch", {"LOCAL_RANK": "5", **TORCHRUN_RANK_5}, 5),
        ("slurm", {"LOCAL_RANK": "0", **SLURM_TASK_3}, 3),
    ],
)
def test_the_precision_check_reads_this_ranks_gpu(fresh_precision, launcher, env, gpu):
    """Each rank looks at its own GPU (as mmengine will set it), not at GPU 0, and allocates
    nothing before mmengine sets the device."""
    from test_precision import fake_cuda

    touched = fake_cuda(fresh_precision, "sm80", count=8)
    for k, v in env.items():
        fresh_precision.setenv(k, v)
    cfg = build_cfg(RECIPE, {"model.backbone.pretrained": None}, launcher=launcher)
    assert cfg.optim_wrapper.type == "AutocastOptimWrapper"
    assert touched and set(touched) == {gpu}


def test_bf16_autocast_wrapper_trains_a_step_on_cpu():
    """AutocastOptimWrapper (bf16, no loss scaler): the forward runs in bf16 on CPU, the loss
    is finite and the weights move (what `auto` picks on an AMX CPU)."""
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    cfg = Config.fromfile(TINY_CONFIG)
    cfg.model.backbone.update(embed_dim=32, num_heads=2)
    cfg.model.decode_head.update(in_channels=[32] * 4, channels=16)
    cfg.model.auxiliary_head.update(in_channels=32, channels=16)
    cfg.model.data_preprocessor.size = (64, 64)
    model = MODELS.build(cfg.model)
    wrapper = build_optim_wrapper(
        model, {**cfg.optim_wrapper, "type": "AutocastOptimWrapper", "dtype": "bfloat16"}
    )
    dtypes = []
    model.backbone.register_forward_hook(lambda m, i, out: dtypes.append(out[0].dtype))
    samples = []
    for _ in range(2):
        s = SegDataSample()
        s.gt_sem_seg = PixelData(data=torch.randint(0, 5, (1, 64, 64)))
        s.set_metainfo(dict(img_shape=(64, 64), ori_shape=(64, 64), pad_shape=(64, 64)))
        samples.append(s)
    data = dict(
        inputs=[torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8)] * 2, data_samples=samples
    )
    before = model.backbone.vit.blocks[0].attn.qkv.weight.detach().clone()
    log = model.train_step(data, wrapper)
    assert dtypes == [torch.bfloat16]
    assert torch.isfinite(log["loss"])
    assert not torch.equal(before, model.backbone.vit.blocks[0].attn.qkv.weight)


def test_recipe_scales_the_lr_with_the_total_batch(tmp_path):
    """auto_scale_lr (base batch 16) is on in the ADE20K recipe and applied by mmengine's Runner:
    a run of total batch 2 trains at lr x 2 / 16; --no-auto-scale-lr turns it off."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import train_seg

    recipe = Config.fromfile(RECIPE)
    assert recipe.auto_scale_lr == dict(enable=True, base_batch_size=16)
    assert recipe.amp == "auto" and recipe.optim_wrapper.type == "OptimWrapper"
    args = train_seg.parse_args([RECIPE, "--no-auto-scale-lr", "--amp"])
    assert (args.auto_scale_lr, args.amp) == (False, "auto")
    assert train_seg.parse_args([RECIPE]).amp is None
    cfg = build_cfg(RECIPE, {"model.backbone.pretrained": None}, auto_scale_lr=False)
    assert cfg.auto_scale_lr == dict(enable=False, base_batch_size=16)
    with pytest.raises(ValueError, match="auto_scale_lr.base_batch_size"):
        build_cfg(TINY_CONFIG, auto_scale_lr=True)

    root = str(tmp_path / "toy_ade")
    write_toy_ade(root, num_train=4, num_val=2, size=64)
    opts = demo_options(root, str(tmp_path / "work"), None, iters=1)
    opts.update({"train_dataloader.batch_size": 2, "auto_scale_lr.base_batch_size": 16})
    opts.update({"model.backbone.embed_dim": 32, "model.backbone.num_heads": 2})
    opts.update({"model.decode_head.in_channels": [32] * 4, "model.auxiliary_head.in_channels": 32})
    runner = make_runner(build_cfg(TINY_CONFIG, opts, auto_scale_lr=True))
    runner.train()
    base = Config.fromfile(TINY_CONFIG).optim_wrapper.optimizer.lr
    initial = max(g["initial_lr"] for g in runner.optim_wrapper.optimizer.param_groups)
    assert initial == pytest.approx(base * 2 / 16)


@pytest.mark.parametrize("launcher", ["none", "pytorch"])
def test_cpu_runs_use_plain_batchnorm_with_any_launcher(launcher, monkeypatch):
    """torch's SyncBatchNorm raises in training on a CPU once a process group exists (gloo
    included): a CPU run under torchrun must get BN, as a single process does."""
    if torch.cuda.is_available():
        pytest.skip("CUDA keeps the recipe's SyncBN")
    for k, v in TORCHRUN_RANK_5.items():  # (as under torchrun)
        monkeypatch.setenv(k, v)
    cfg = build_cfg(RECIPE, {"model.backbone.pretrained": None}, launcher=launcher)
    assert "SyncBN" in str(Config.fromfile(RECIPE)._cfg_dict)  # the recipe asks for it
    assert "SyncBN" not in str(cfg._cfg_dict)
    assert cfg.env_cfg.dist_cfg.backend == "gloo"


def _two_process_options(tmp_path) -> list:
    """--cfg-options of a 2-iteration run on toy data in tmp_path/work, by two CPU processes
    (skipped with CUDA: mmengine then sets the device itself)."""
    if torch.cuda.is_available():
        pytest.skip("the CPU path: with CUDA mmengine sets the device itself")
    root = str(tmp_path / "toy_ade")
    write_toy_ade(root, num_train=4, num_val=2, size=64)
    opts = demo_options(root, str(tmp_path / "work"), None, iters=2)
    opts.update({**TINY_OPTS, "train_dataloader.batch_size": 2})
    return _cli_options(opts)


def _two_process_logs(tmp_path) -> str:
    """The run's logs, once its last checkpoint is there."""
    assert (tmp_path / "work" / "iter_2.pth").is_file()
    return "".join(p.read_text() for p in (tmp_path / "work").glob("*/*.log"))


def test_two_cpu_processes_train_under_torchrun_with_gloo(tmp_path):
    """torchrun --launcher pytorch without CUDA: mmengine's init_dist called
    torch.cuda.set_device on every rank ('Found no NVIDIA driver'), gloo or not."""
    options = _two_process_options(tmp_path)
    run = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    run += ["--master_port", str(_free_port()), os.path.join(ROOT, "tools", "train_seg.py")]
    cmd = [*run, TINY_CONFIG, "--launcher", "pytorch", "--cfg-options", *options]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    logs = _two_process_logs(tmp_path)
    assert "Distributed training: True" in logs


def test_two_cpu_processes_train_under_a_slurm_job_step(tmp_path):
    """--launcher slurm without CUDA (srun faked: two processes with its variables): mmengine's
    set-up called torch.cuda.set_device too."""
    options = _two_process_options(tmp_path)
    cmd = [sys.executable, os.path.join(ROOT, "tools", "train_seg.py"), TINY_CONFIG]
    cmd += ["--launcher", "slurm", "--cfg-options", *options]
    job = {"SLURM_NTASKS": "2", "SLURM_NODELIST": "localhost", "MASTER_ADDR": "127.0.0.1"}
    job.update(MASTER_PORT=str(_free_port()), PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            cmd,
            env={**os.environ, **job, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    outs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-3000:] + outs[1][1][-3000:]
    logs = _two_process_logs(tmp_path)
    assert "Distributed launcher: slurm" in logs and "Distributed training: True" in logs


def test_slurm_and_mpi_variables_become_torch_distributed_ones():
    from mae_transfer.engine.config import ConfigError
    from mae_transfer.segmentation.runner import launcher_env

    slurm = {"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"}
    env = launcher_env("slurm", {**slurm, "SLURM_NODELIST": "node7"})  # no scontrol here
    assert env == {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_PORT": "29500",
                   "MASTER_ADDR": "node7"}  # fmt: skip
    given = {**slurm, "SLURM_NODELIST": "gpu[03-05]", "MASTER_ADDR": "10.0.0.3"}
    assert launcher_env("slurm", given)["MASTER_ADDR"] == "10.0.0.3"
    mpi = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2"}
    with pytest.raises(ConfigError, match="MASTER_ADDR"):
        launcher_env("mpi", mpi)
    env = launcher_env("mpi", {**mpi, "MASTER_ADDR": "h0", "MASTER_PORT": "1234"})
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_PORT"]) == (
        "1",
        "2",
        "0",
        "1234",
    )
    with pytest.raises(ConfigError, match="SLURM_PROCID.*srun"):
        launcher_env("slurm", {"SLURM_NTASKS": "2", "SLURM_NODELIST": "a"})
    torchrun = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h0", "MASTER_PORT": "1234"}
    assert launcher_env("pytorch", torchrun) == {}


def test_launcher_pytorch_without_torchrun_is_refused_before_the_data_checks(
    monkeypatch, tmp_path, caplog
):
    """python tools/train_seg.py CONFIG --launcher pytorch (torchrun forgotten) ended in a
    traceback, 'environment variable RANK expected, but not set', after the data checks."""
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    argv = [TINY_CONFIG, "--launcher", "pytorch", "--work-dir", str(tmp_path / "work")]
    argv += ["--cfg-options", f"train_dataloader.dataset.data_root={tmp_path / 'no_data'}"]
    code = _tool("train_seg").main(argv)
    _refused(caplog, code, "--launcher pytorch needs RANK, WORLD_SIZE, MASTER_ADDR", "torchrun")


def test_the_comparison_grid_takes_images_of_different_sizes(tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image

    from mae_transfer.segmentation import visualize

    paths = []
    for i, (h, w) in enumerate(((40, 60), (64, 32))):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(paths[-1])
    monkeypatch.setattr(
        visualize, "predict", lambda model, p: np.zeros(Image.open(p).size[::-1], int)
    )
    grid = visualize.comparison_grid(paths, [("model", None)], [(255, 0, 0)], scale=1)
    bar = grid.shape[0] - 2 * (64 + 4)  # the titles
    assert 12 < bar < 40 and grid.shape[1:] == (2 * (60 + 4), 3)  # cells padded to 64 x 60
    named = visualize.comparison_grid(paths, [("m", None)], [(255, 0, 0)], scale=1, classes=["x"])
    swatches = named[grid.shape[0] :]  # the legend of the classes drawn: a red swatch
    assert len(swatches) > 12 and ((swatches == (255, 0, 0)).all(-1)).sum() > 50


def test_the_demo_config_tests_a_photo_at_its_training_scale(tmp_path):
    """Its whole-image test ran a 2048 x 1536 photo at full size (38 GB asked for); the toy
    scenes (96 x 96) pass unchanged, so the demo's numbers are those of before."""
    import numpy as np
    from mmengine.dataset import Compose
    from mmengine.registry import init_default_scope
    from PIL import Image

    init_default_scope("mmseg")
    pipeline = Compose(Config.fromfile(TINY_CONFIG).test_pipeline[:2])  # load, resize
    for (w, h), expected in (((2048, 1536), (96, 128)), ((96, 96), (96, 96))):
        Image.fromarray(np.full((h, w, 3), 50, np.uint8)).save(tmp_path / "p.jpg")
        out = pipeline(dict(img_path=str(tmp_path / "p.jpg")))
        assert out["img"].shape[:2] == expected and out["ori_shape"] == (h, w)


def test_the_grid_zooms_small_images_and_reduces_photos(tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image

    from mae_transfer.segmentation import visualize

    monkeypatch.setattr(
        visualize, "predict", lambda model, p: np.zeros(Image.open(p).size[::-1], int)
    )
    widths = {}
    for w in (96, 1280):
        Image.fromarray(np.full((w // 2, w, 3), 90, np.uint8)).save(tmp_path / f"{w}.png")
        grid = visualize.comparison_grid([str(tmp_path / f"{w}.png")], [("m", None)], [(0, 0, 0)])
        widths[w] = grid.shape[1] / 2  # per cell (padding included)
    assert widths[96] == 2 * (96 + 4)  # the toy scenes drawn 2x
    assert widths[1280] == (1280 + 4) * visualize.MAX_CELL_WIDTH / 1280  # (was 2x: 2568)


def test_the_overlay_shows_each_class_in_its_colour_and_its_borders():
    """At alpha 0.5 the objects' own colours showed through (a red square and a yellow ring
    both came out orange); regions now carry their class colour mostly, and fully at borders."""
    import numpy as np

    from mae_transfer.segmentation.visualize import overlay

    image = np.zeros((8, 8, 3), np.uint8)
    image[:, :4] = (230, 40, 40)  # a red object
    labels = np.full((8, 8), 255, np.uint8)
    labels[2:6, 2:6] = 1
    out = overlay(image, labels, [(0, 0, 0), (250, 220, 30)])
    assert (out[0, 0] == image[0, 0]).all()  # ignore: the image as it is
    assert tuple(out[2, 2]) == (250, 220, 30)  # a border: the class colour
    inside = out[3, 3].astype(int)  # 0.7 of the class colour over the red object
    assert abs(inside - (0.3 * np.array([230, 40, 40]) + 0.7 * np.array([250, 220, 30]))).max() <= 1


def _three_pairs(root):
    """``root/img/{0,1,2}.png`` (48x32) and their labels ``root/ann/{0,1,2}.png``."""
    import numpy as np
    from PIL import Image

    for d in ("img", "ann"):
        (root / d).mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.zeros((32, 48, 3), np.uint8)).save(root / "img" / f"{i}.png")
        Image.fromarray(np.zeros((32, 48), np.uint8)).save(root / "ann" / f"{i}.png")
    return root


def test_data_folders_are_checked_for_pairs_before_training(tmp_path):
    import numpy as np
    from PIL import Image

    from mae_transfer.engine.config import ConfigError
    from mae_transfer.segmentation.runner import check_data

    root = _three_pairs(tmp_path / "data")
    ds = dict(type="BaseSegDataset", data_root=str(root))
    ds["data_prefix"] = dict(img_path="img", seg_map_path="ann")
    cfg = Config(dict(train_dataloader=dict(dataset=ds)))
    with pytest.raises(ConfigError, match=r"no '.jpg' images in .*img \(found: .png\); set"):
        check_data(cfg)  # BaseSegDataset's default suffix is .jpg: mmseg found nothing
    ds["img_suffix"] = ".png"
    check_data(Config(dict(train_dataloader=dict(dataset=ds))))
    Image.fromarray(np.zeros((64, 96), np.uint8)).save(root / "ann" / "1.png")
    with pytest.raises(ConfigError, match="image 1.png is 48x32 but its label .* is 96x64"):
        check_data(Config(dict(train_dataloader=dict(dataset=ds))))
    (root / "ann" / "1.png").unlink()
    with pytest.raises(ConfigError, match=r"1 of 3 images have no label '<name>.png'"):
        check_data(Config(dict(train_dataloader=dict(dataset=ds))))


def test_the_images_a_split_file_lists_are_checked_before_training(tmp_path):
    """With ``ann_file`` (a split file of names, as Pascal VOC's) nothing was checked: an
    image it listed that was absent stopped training with a FileNotFoundError when drawn."""
    import numpy as np
    from PIL import Image

    from mae_transfer.engine.config import ConfigError
    from mae_transfer.segmentation.runner import check_data

    root = _three_pairs(tmp_path / "data")
    (root / "train.txt").write_text("0\n2\n")
    ds = dict(type="BaseSegDataset", data_root=str(root), img_suffix=".png")
    ds.update(data_prefix=dict(img_path="img", seg_map_path="ann"), ann_file="train.txt")
    check_data(Config(dict(train_dataloader=dict(dataset=ds))))
    (root / "train.txt").write_text("0\n2\n7\n")
    with pytest.raises(ConfigError, match=r"1 of the 3 images .*train.txt lists are not in"):
        check_data(Config(dict(train_dataloader=dict(dataset=ds))))
    (root / "train.txt").write_text("0\n2\n")
    (root / "ann" / "2.png").unlink()
    with pytest.raises(ConfigError, match=r"1 of 2 images have no label '<name>.png'"):
        check_data(Config(dict(train_dataloader=dict(dataset=ds))))
    Image.fromarray(np.zeros((64, 96), np.uint8)).save(root / "ann" / "2.png")
    with pytest.raises(ConfigError, match="image 2.png is 48x32 but its label .* is 96x64"):
        check_data(Config(dict(train_dataloader=dict(dataset=ds))))


def test_images_of_more_than_8_bits_are_warned_about(tmp_path, mmengine_log):
    """mmcv's cv2 loading keeps a 16-bit value's high byte (a 12-bit scan: 0..15); our loader
    (build_cfg's) stretches them, except with color_type 'unchanged'."""
    import numpy as np
    from PIL import Image

    from mae_transfer.segmentation.runner import check_data

    root = tmp_path / "data"
    for d in ("img", "ann"):
        (root / d).mkdir(parents=True)
    scan = np.linspace(0, 4095, 32 * 48).reshape(32, 48).astype(np.uint16)
    Image.fromarray(scan).save(root / "img" / "0.png")
    # 16-bit colour, its orientation tag (half a turn) last: the size check's getexif loaded it
    write_deep_colour_png(root / "img" / "1.png", np.stack([scan] * 3, axis=-1), orientation=3)
    Image.fromarray(np.zeros((32, 48, 3), np.uint8)).save(root / "img" / "2.png")
    for i in range(3):
        Image.fromarray(np.zeros((32, 48), np.uint8)).save(root / "ann" / f"{i}.png")
    ds = dict(type="BaseSegDataset", data_root=str(root), img_suffix=".png")
    ds["data_prefix"] = dict(img_path="img", seg_map_path="ann")
    check_data(Config(dict(train_dataloader=dict(dataset=ds))))
    said = "\n".join(mmengine_log)
    assert "WARNING - train_dataloader.dataset: 2 of 3 sampled images have more than 8" in said
    assert "1.png (RGB, 16 bits)" in said
    assert "(e.g. 0.png (I;16), 1.png (RGB, 16 bits)), which LoadImageFromFile(color_type=" in said
    mmengine_log.clear()
    ds["pipeline"] = [dict(type="LoadImageAnyDepth")]  # what build_cfg puts in: stretched
    check_data(Config(dict(train_dataloader=dict(dataset=ds))))
    assert not any("more than 8 bits" in line for line in mmengine_log)
    ds["pipeline"][0]["color_type"] = "unchanged"  # the raw values
    check_data(Config(dict(train_dataloader=dict(dataset=ds))))
    assert "which LoadImageAnyDepth(color_type='unchanged') does not" in "\n".join(mmengine_log)
    mmengine_log.clear()
    ds["pipeline"][0] = dict(type="LoadImageAnyDepth", imdecode_backend="tifffile")  # raw too
    check_data(Config(dict(train_dataloader=dict(dataset=ds))))
    assert "sampled images have more than 8 bits" in "\n".join(mmengine_log)


def test_images_of_more_than_8_bits_load_stretched_others_as_mmcv_loads_them(tmp_path):
    """mmcv's LoadImageFromFile kept a 16-bit value's high byte (cv2: a 12-bit scan loaded as
    0..15) or clipped it (pillow): LoadImageAnyDepth stretches such images to 0..255 as
    pretraining does, EXIF orientation and grey as color_type says, and loads every other
    image bit for bit as mmcv does."""
    import numpy as np
    import tifffile
    from mmcv.transforms import LoadImageFromFile
    from PIL import Image

    from mae_transfer.data.decode import stretch_to_uint8
    from mae_transfer.segmentation.loading import read_rgb
    from mae_transfer.segmentation.transforms import LoadImageAnyDepth

    def load(kind, path, **args):
        return kind(**args).transform(dict(img_path=str(path)))

    scan = np.linspace(0, 4095, 32 * 48).reshape(32, 48).astype(np.uint16)  # 12 bits
    exif = Image.Exif()
    exif[0x0112] = 6  # turned a quarter clockwise on loading (cv2, pillow)
    Image.fromarray(scan).save(tmp_path / "scan.png", exif=exif)
    colour = np.stack([scan, scan // 2, 4095 - scan], axis=-1)  # RGB, 16 bits per channel
    write_deep_colour_png(tmp_path / "colour.png", colour, orientation=6)
    Image.fromarray(scan.astype(np.float32) / 7).save(tmp_path / "float.tif")
    _write_turned_jpeg(tmp_path / "photo.jpg", 32, 48)
    Image.fromarray(scan.astype(np.uint8)).save(tmp_path / "grey.png")
    for name in ("photo.jpg", "grey.png"):  # 8 bits: exactly as mmcv, for every color_type
        for args in (
            {},
            dict(color_type="grayscale"),
            dict(color_type="color_ignore_orientation"),
            dict(color_type="unchanged"),
            dict(imdecode_backend="pillow"),
            dict(to_float32=True),
        ):
            ours, theirs = (
                load(LoadImageAnyDepth, tmp_path / name, **args),
                load(LoadImageFromFile, tmp_path / name, **args),
            )
            assert ours["img"].dtype == theirs["img"].dtype, (name, args)
            assert np.array_equal(ours["img"], theirs["img"]), (name, args)
            assert ours["ori_shape"] == theirs["ori_shape"] == ours["img_shape"]

    assert load(LoadImageFromFile, tmp_path / "scan.png")["img"].max() <= 15  # the high byte
    stretched = stretch_to_uint8(scan)
    img = load(LoadImageAnyDepth, tmp_path / "scan.png")["img"]
    assert img.shape == (48, 32, 3) and img.dtype == np.uint8  # turned, as mmcv turns it
    assert np.array_equal(img, np.repeat(np.rot90(stretched, -1)[:, :, None], 3, axis=2))
    img = load(LoadImageAnyDepth, tmp_path / "scan.png", color_type="grayscale_ignore_orientation")
    assert np.array_equal(img["img"], stretched) and img["ori_shape"] == (32, 48)
    img = load(LoadImageAnyDepth, tmp_path / "colour.png", color_type="color_ignore_orientation")
    assert np.array_equal(img["img"], stretch_to_uint8(colour)[:, :, ::-1])  # BGR, as mmcv
    img = load(LoadImageAnyDepth, tmp_path / "colour.png")["img"]  # its tag read last
    assert np.array_equal(img, np.rot90(stretch_to_uint8(colour)[:, :, ::-1], -1))
    assert load(LoadImageFromFile, tmp_path / "colour.png")["img"].shape == img.shape
    img = load(LoadImageAnyDepth, tmp_path / "float.tif")["img"]
    assert img.min() == 0 and img.max() == 255
    raw = load(LoadImageAnyDepth, tmp_path / "scan.png", color_type="unchanged")["img"]
    assert raw.dtype == np.uint16 and raw.max() == 4095  # raw values, as mmcv keeps them
    tifffile.imwrite(tmp_path / "scan.tif", scan)  # the tifffile backend: raw, as mmcv
    raw = load(LoadImageAnyDepth, tmp_path / "scan.tif", imdecode_backend="tifffile")["img"]
    assert raw.dtype == np.uint16 and np.array_equal(raw, scan)
    # inference reads the image it draws through the test pipeline's loader
    rgb = read_rgb(str(tmp_path / "scan.png"), [dict(type="LoadImageAnyDepth")])
    assert np.array_equal(rgb[:, :, 0], np.rot90(stretched, -1))
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(OSError, match="failed to load image: .*junk.png"):  # mmcv: assert
        load(LoadImageAnyDepth, tmp_path / "junk.png")
    assert load(LoadImageAnyDepth, tmp_path / "junk.png", ignore_empty=True) is None


def test_labels_of_several_channels_are_refused_before_training(tmp_path):
    """An RGB(A) rendering of a label passed the check; training died on a shape error
    naming no file. 16-bit labels with values above 255 trained on their low byte."""
    import numpy as np
    from PIL import Image

    from mae_transfer.engine.config import ConfigError
    from mae_transfer.segmentation.runner import check_data

    root = tmp_path / "data"
    for d in ("img", "ann"):
        (root / d).mkdir(parents=True)
    for i, mode in enumerate(("L", "P", "RGB", "RGBA")):
        Image.fromarray(np.zeros((32, 48, 3), np.uint8)).save(root / "img" / f"{i}.jpg")
        Image.new(mode, (48, 32)).save(root / "ann" / f"{i}.png")
    ds = dict(type="BaseSegDataset", data_root=str(root))
    ds["data_prefix"] = dict(img_path="img", seg_map_path="ann")
    with pytest.raises(ConfigError, match=r"2 of 4 sampled labels have several channels") as e:
        check_data(Config(dict(train_dataloader=dict(dataset=ds))))
    assert "2.png (RGB), " in str(e.value) and "3.png (RGBA)" in str(e.value)
    assert "single-channel PNG (mode L or P)" in str(e.value)
    # 16-bit labels: below 256 they load as they are; above, mmseg kept each value's low byte
    for i in (2, 3):
        Image.new("L", (48, 32)).save(root / "ann" / f"{i}.png")
    label = np.zeros((32, 48), np.uint16)
    Image.fromarray(label + 7).save(root / "ann" / "0.png")
    check_data(Config(dict(train_dataloader=dict(dataset=ds))))
    label[0, 0] = 300
    Image.fromarray(label).save(root / "ann" / "1.png")
    with pytest.raises(ConfigError, match=r"1 of 4 sampled labels hold values above 255") as e:
        check_data(Config(dict(train_dataloader=dict(dataset=ds))))
    assert "1.png (I;16, values up to 300)" in str(e.value) and "class 44" in str(e.value)


def _toy_dataset(tmp_path, split: str, label, **opts):
    """The tiny config's train or val data set (as build_cfg leaves it) on 2 toy scenes, the
    first one's label replaced by ``label`` (a PIL image)."""
    from mmengine.registry import init_default_scope
    from mmseg.registry import DATASETS

    root = str(tmp_path / "toy_ade")
    write_toy_ade(root, num_train=2, num_val=2, size=32)
    name = "training" if split == "train" else "validation"
    label.save(os.path.join(root, "annotations", name, f"{name}_00000.png"))
    opts.update({f"{split}_dataloader.dataset.data_root": root})
    cfg = build_cfg(TINY_CONFIG, opts)
    init_default_scope("mmseg")
    return DATASETS.build(cfg[f"{split}_dataloader"].dataset)


@pytest.mark.parametrize("split", ["train", "val"])
def test_label_values_beyond_the_classes_name_the_file(tmp_path, split):
    """A label value >= num_classes (not 255) crashed training ('index 39 is out of bounds
    for dimension 1 with size 8', no file named), and evaluation dropped those pixels from
    the mIoU without a word."""
    import numpy as np
    from PIL import Image

    from mae_transfer.engine.config import ConfigError

    values = np.full((32, 32), 3, np.uint8)
    values[:4, :4], values[4:8, :4], values[8:, :4] = 40, 0, 255  # 0 and 255 are ignored
    ds = _toy_dataset(tmp_path, split, Image.fromarray(values))
    assert ds[1]["data_samples"].gt_sem_seg.data.max() == 255  # the good scene loads
    with pytest.raises(ConfigError) as e:
        ds[0]
    name = "training" if split == "train" else "validation"
    message = str(e.value)
    assert f"{name}_00000.png holds class values 39 (40 in the file, reduce_zero_label" in message
    assert "outside [0, 8) and not the ignore index 255: set num_classes" in message


def test_a_label_of_another_size_than_its_image_as_loaded_names_both(tmp_path):
    """The check before training reads a sample of the pairs: a pair outside it whose sizes
    differ (e.g. a photo turned by its EXIF tag) failed when batched ('stack expects each
    tensor to be equal size')."""
    import numpy as np
    from PIL import Image

    from mae_transfer.engine.config import ConfigError

    ds = _toy_dataset(tmp_path, "train", Image.fromarray(np.ones((24, 32), np.uint8)))
    with pytest.raises(ConfigError) as e:
        ds[0]
    assert "training_00000.jpg loads as 32x32 (height x width)" in str(e.value)
    assert "training_00000.png is 24x32" in str(e.value) and "EXIF" in str(e.value)


def test_a_label_loaded_after_the_test_resize_is_compared_with_the_image_as_stored():
    """mmseg's test pipelines resize the image before loading the label (ADE20K's: to a short
    side of 512): the check compared the resized image with the label and refused every
    ADE20K validation image of another size."""
    import numpy as np

    from mae_transfer.engine.config import ConfigError
    from mae_transfer.segmentation.transforms import CheckSegLabels

    check = CheckSegLabels(num_classes=150)
    resized = dict(img=np.zeros((512, 683, 3), np.uint8), ori_shape=(384, 512))
    check.transform({**resized, "gt_seg_map": np.zeros((384, 512), np.uint8)})
    with pytest.raises(ConfigError, match=r"loads as 384x512 .* is 300x512"):
        check.transform({**resized, "gt_seg_map": np.zeros((300, 512), np.uint8)})


def test_label_checks_follow_the_config_and_are_added_once(tmp_path):
    """Labels counted from 0 without reduce_zero_label: the value num_classes is refused with
    the other way out; an RGB label beyond the checked sample is refused as it loads; a config
    mmengine saved (the check already in it) gets no second one."""
    import numpy as np
    from PIL import Image

    from mae_transfer.engine.config import ConfigError

    values = np.full((32, 32), 8, np.uint8)
    no_reduce = {
        "train_dataloader.dataset.reduce_zero_label": False,
        "train_dataloader.dataset.pipeline.1.reduce_zero_label": False,
    }
    ds = _toy_dataset(tmp_path / "a", "train", Image.fromarray(values), **no_reduce)
    with pytest.raises(ConfigError, match=r"values 8, outside \[0, 8\) .* or reduce_zero_label=Tr"):
        ds[0]
    ds = _toy_dataset(tmp_path / "b", "val", Image.fromarray(np.zeros((32, 32, 3), np.uint8)))
    with pytest.raises(ConfigError, match="validation_00000.png has 3 channels"):
        ds[0]
    cfg = build_cfg(TINY_CONFIG)
    types = [t["type"] for t in cfg.train_dataloader.dataset.pipeline]
    assert types[:3] == ["LoadImageAnyDepth", "LoadAnnotations", "CheckSegLabels"]
    check = cfg.train_dataloader.dataset.pipeline[2]
    assert (check["num_classes"], check["ignore_index"]) == (8, 255)
    cfg.dump(str(tmp_path / "saved.py"))
    again = build_cfg(str(tmp_path / "saved.py"))
    for loader in ("train_dataloader", "val_dataloader", "test_dataloader"):
        types = [t["type"] for t in again[loader].dataset.pipeline]
        assert types.count("CheckSegLabels") == 1, (loader, types)


def _write_turned_jpeg(path, h: int, w: int) -> None:
    """An (h, w) JPEG (left half dark, right half light) tagged EXIF orientation 6: cv2 and
    PIL's exif_transpose turn it 90 degrees clockwise, to (w, h)."""
    import numpy as np
    from PIL import Image

    pixels = np.full((h, w, 3), 40, np.uint8)
    pixels[:, w // 2 :] = 220
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(path, exif=exif, quality=95)


def test_the_size_check_sees_images_turned_by_their_exif_orientation(tmp_path):
    """mmcv's loading (color_type 'color') applies the EXIF orientation, PIL's header does not:
    a turned image whose label has the stored size passed the check, and training died with
    'stack expects each tensor to be equal size' naming no file."""
    import numpy as np
    from PIL import Image

    from mae_transfer.engine.config import ConfigError
    from mae_transfer.segmentation.runner import check_data

    root = tmp_path / "data"
    for d in ("img", "ann"):
        (root / d).mkdir(parents=True)
    for i in range(2):
        _write_turned_jpeg(root / "img" / f"{i}.jpg", 32, 48)
        Image.fromarray(np.zeros((32, 48), np.uint8)).save(root / "ann" / f"{i}.png")
    ds = dict(type="BaseSegDataset", data_root=str(root))
    ds["data_prefix"] = dict(img_path="img", seg_map_path="ann")
    ds["pipeline"] = [dict(type="LoadImageFromFile"), dict(type="LoadAnnotations")]
    with pytest.raises(ConfigError, match=r"2 of 2 sampled images \(e.g. 0.jpg, 1.jpg\) carry an"):
        check_data(Config(dict(train_dataloader=dict(dataset=ds))))
    with pytest.raises(ConfigError, match="color_type='color_ignore_orientation' in Load"):
        check_data(Config(dict(train_dataloader=dict(dataset=ds))))
    ds["pipeline"][0]["color_type"] = "color_ignore_orientation"  # mmcv loads them as stored
    check_data(Config(dict(train_dataloader=dict(dataset=ds))))
    ds["pipeline"][0]["color_type"] = "color"  # labels drawn on the turned images fit
    for i in range(2):
        Image.fromarray(np.zeros((48, 32), np.uint8)).save(root / "ann" / f"{i}.png")
    check_data(Config(dict(train_dataloader=dict(dataset=ds))))


def test_the_orientation_advice_reaches_every_pipeline():
    """The refusal said 'in LoadImageFromFile of the train and test pipelines'; the keys a user
    tried (train_pipeline.0...) changed nothing: mmengine had copied them into the loaders."""
    from mae_transfer.segmentation.loading import IGNORE_ORIENTATION
    from mae_transfer.segmentation.runner import parse_cfg_options

    cfg = build_cfg(RECIPE, {"model.backbone.pretrained": None, **parse_cfg_options(
        IGNORE_ORIENTATION.split())})  # fmt: skip
    loaders = [cfg[k].dataset.pipeline for k in ("train_dataloader", "val_dataloader")]
    loaders += [cfg.test_dataloader.dataset.pipeline, cfg.test_pipeline]
    for pipeline in loaders:
        first = pipeline[0]
        assert first["type"] == "LoadImageAnyDepth"  # mmseg's LoadImageFromFile, replaced
        assert first["color_type"] == "color_ignore_orientation"


@pytest.mark.parametrize("hw", [(32, 48), (40, 40)])
def test_the_overlay_shows_the_image_turned_as_the_prediction_is(tiny_segmentor, tmp_path, hw):
    """visualize read images with PIL, which ignores the EXIF orientation that mmcv applies for
    the prediction: a turned non-square photo crashed ('boolean index did not match'), a
    square one was drawn under a prediction made on the turned image."""
    import mmcv

    from mae_transfer.segmentation.visualize import comparison_grid, init_segmentor

    path, opts, _ = tiny_segmentor
    model = init_segmentor(build_cfg(TINY_CONFIG, opts, for_training=False), path)
    photo = str(tmp_path / "photo.jpg")
    _write_turned_jpeg(photo, *hw)
    grid = comparison_grid([photo], [("model", model)], model.dataset_meta["palette"], scale=1)
    turned = mmcv.imread(photo)[:, :, ::-1]  # as the test pipeline loads it, in RGB
    assert turned.shape[:2] == hw[::-1]
    top = grid.shape[0] - hw[1] - 2  # under the titles, padded by 2
    assert (grid[top : top + hw[1], 2 : 2 + hw[0]] == turned).all()


def test_visualization_colours_come_from_the_config_s_own_classes():
    from types import SimpleNamespace

    from mae_transfer.segmentation.visualize import dataset_meta

    model = SimpleNamespace(decode_head=SimpleNamespace(num_classes=2))
    own = dict(classes=("sky", "road"), palette=[[0, 0, 255], [128, 128, 128]])
    cfg = Config(dict(test_dataloader=dict(dataset=dict(type="BaseSegDataset", metainfo=own))))
    meta = dataset_meta(cfg, model)
    assert meta["classes"] == ("sky", "road") and meta["palette"] == own["palette"]
    cfg.test_dataloader.dataset.metainfo = dict(classes=("sky", "road"))  # no palette given
    meta = dataset_meta(cfg, model)
    assert meta["classes"] == ("sky", "road") and len(meta["palette"]) == 2


def test_every_launcher_gets_the_local_rank_mmengine_wraps_ddp_with(monkeypatch, tmp_path):
    """mmengine builds DDP with device_ids=[LOCAL_RANK]; its MPI set-up selects the GPU but
    exports no LOCAL_RANK (every rank's DDP was built for GPU 0), and test_seg.py refused the
    --local-rank flag that torch.distributed.launch passes."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import test_seg
    import train_seg

    monkeypatch.setenv("LOCAL_RANK", "0")  # recorded, so that the test's changes are undone
    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "3")
    train_seg.parse_args([RECIPE, "--launcher", "mpi"])
    assert os.environ["LOCAL_RANK"] == "3"
    monkeypatch.delenv("LOCAL_RANK")
    missing = str(tmp_path / "none.pth")
    assert test_seg.main([TINY_CONFIG, missing, "--launcher", "pytorch", "--local-rank=2"]) == 2
    assert os.environ["LOCAL_RANK"] == "2"


def test_tta_repeats_the_test_resize_at_each_ratio_of_its_scale_with_flips():
    """The recipe's test resize is (2048, 512): ratio 0.5 is (1024, 256), not mmseg 1.x's
    tta_pipeline (the stored image x 0.5, whatever the test scale); labels loaded, checked and
    packed once per augmentation, the image loaded once."""
    from mae_transfer.segmentation.testing import apply_tta

    recipe = os.path.join(CONFIG_DIR, "upernet_mae_vit_base_8xb2-160k_ade20k-512x512.py")
    cfg = build_cfg(recipe, for_training=False)
    assert apply_tta(cfg, (0.5, 1.0)) == 4
    assert cfg.model.type == "SegTTAModel" and cfg.model.module.backbone.type == "MAEViT"
    load, aug = cfg.test_dataloader.dataset.pipeline
    assert load["type"] == "LoadImageAnyDepth" and aug["type"] == "TestTimeAug"
    resizes, flips, *rest = aug["transforms"]
    assert [r["scale"] for r in resizes] == [(1024, 256), (2048, 512)]
    assert all(r["keep_ratio"] for r in resizes)
    assert [f["prob"] for f in flips] == [0.0, 1.0]
    assert [[t["type"] for t in choice] for choice in rest] == [
        ["LoadAnnotations"],
        ["CheckSegLabels"],
        ["PackSegInputs"],
    ]


def test_tta_without_a_test_resize_scales_the_image_and_refuses_what_it_cannot_do():
    from mae_transfer.engine.config import ConfigError
    from mae_transfer.segmentation.testing import tta_pipeline

    plain = [dict(type="LoadImageAnyDepth"), dict(type="LoadAnnotations"), dict(type="Pack")]
    load, aug = tta_pipeline(plain, (0.5, 2), flip=False)
    assert load == plain[0] and len(aug["transforms"]) == 3  # no flips
    assert [r["scale_factor"] for r in aug["transforms"][0]] == [(0.5, 0.5), (2, 2)]
    with pytest.raises(ConfigError, match=r"--tta-ratios must be numbers above 0, got \[0\]"):
        tta_pipeline(plain, (0,), flip=True)
    with pytest.raises(ConfigError, match="TestTimeAug already"):
        tta_pipeline([plain[0], aug], (1.0,), flip=True)


def test_test_seg_refuses_tta_options_without_tta_and_ratios_below_0(capsys, caplog):
    tool = _tool("test_seg")
    with pytest.raises(SystemExit) as e:
        tool.main([TINY_CONFIG, "nothere.pth", "--tta-no-flip"])
    assert e.value.code == 2
    assert "--tta-ratios and --tta-no-flip go with --tta" in capsys.readouterr().err
    # before the checkpoint is read (it does not exist)
    code = tool.main([TINY_CONFIG, "nothere.pth", "--tta", "--tta-ratios", "1", "-0.5"])
    _refused(caplog, code, "--tta-ratios must be numbers above 0, got [1.0, -0.5]")


def test_tta_refuses_a_test_pipeline_that_resizes_otherwise():
    """A Resize put before ResizeShortestEdge would be undone at every ratio: single-scale
    numbers reported as multi-scale."""
    from mae_transfer.engine.config import ConfigError
    from mae_transfer.segmentation.testing import tta_pipeline

    pipeline = [
        dict(type="LoadImageAnyDepth"),
        dict(type="ResizeShortestEdge", scale=512),
        dict(type="LoadAnnotations"),
        dict(type="PackSegInputs"),
    ]
    with pytest.raises(ConfigError, match="it has ResizeShortestEdge: give a test_pipeline"):
        tta_pipeline(pipeline, (0.5, 1.0), flip=True)
    # rounding to a multiple after the Resize is kept after each scale
    pipeline[1:2] = [dict(type="Resize", scale=(96, 96)), dict(type="ResizeToMultiple")]
    _, aug = tta_pipeline(pipeline, (0.5, 1.0), flip=False)
    assert [c[0]["type"] for c in aug["transforms"]] == [
        "Resize",
        "ResizeToMultiple",
        "LoadAnnotations",
        "PackSegInputs",
    ]


def test_show_dir_is_refused_with_several_processes_pred_dir_made_on_every_rank(tmp_path):
    """mmseg's visualizer draws on rank 0 only; IoUMetric made --pred-dir on rank 0 only (the
    other ranks failed writing their first file)."""
    from mae_transfer.engine.config import ConfigError
    from mae_transfer.segmentation.testing import write_outputs

    cfg = build_cfg(TINY_CONFIG, dict(TINY_OPTS), for_training=False)
    with pytest.raises(ConfigError, match="--show-dir with 2 processes would draw rank 0's"):
        write_outputs(cfg, show_dir=str(tmp_path / "drawn"), world_size=2)
    write_outputs(cfg, pred_dir=str(tmp_path / "preds"), world_size=2)
    assert (tmp_path / "preds").is_dir() and cfg.test_evaluator["output_dir"] == str(
        tmp_path / "preds"
    )
