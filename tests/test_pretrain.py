"""Pretraining: config checks, robust data, resume, NaN stop, DDP equivalence, the CLI."""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, TINY_MAE, _free_port, write_images

from mae_transfer import VIT_SIZES, create_model
from mae_transfer.data import ResumableDistributedSampler, collate
from mae_transfer.engine.distributed import DistInfo
from mae_transfer.engine.schedule import cosine_lr
from mae_transfer.models import size_of
from mae_transfer.registry import patch_size_of
from pretrain.config import ConfigError, PretrainConfig, load_config, make_config, validate
from pretrain.data import PretrainDataset
from pretrain.engine import LAST, NonFiniteLossError, Trainer
from pretrain.main import main as pretrain_main

CPU = torch.device("cpu")


def tiny_values(data, **kw) -> dict:
    """Config values of a tiny CPU run on ``data``; keyword arguments override."""
    values = dict(
        model="mae_vit_base_patch16",
        model_kwargs=TINY_MAE,
        input_size=32,
        batch_size=4,
        epochs=2,
        warmup_epochs=1,
        blr=1e-3,
        data_path=data,
        num_workers=0,
        device="cpu",
        log_every_iters=1,
        norm_pix_loss=True,
        amp="fp32",  # bitwise comparisons (resume, DDP) whatever auto picks on this CPU
    )
    values.update(kw)
    return values


def write_yaml(path, values: dict) -> str:
    path.write_text(json.dumps(values))  # JSON is YAML
    return str(path)


def tiny_cfg(tmp_path, data, **kw) -> PretrainConfig:
    cfg = make_config(tiny_values(data, output_dir=str(tmp_path / "out"), **kw))
    validate(cfg)
    return cfg


def train(cfg) -> Trainer:
    t = Trainer(cfg, torch.device("cpu"), DistInfo())
    t.train()
    t.close()
    return t


def test_config_precedence_defaults_yaml_flags(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("batch_size: 7\nmask_ratio: 0.6\ninput_size: [32, 48]\n")
    cfg, _ = load_config(["--config", str(y), "--mask_ratio", "0.5", "--norm_pix_loss"])
    assert (cfg.batch_size, cfg.mask_ratio, cfg.input_size) == (7, 0.5, [32, 48])
    assert cfg.norm_pix_loss is True and cfg.weight_decay == 0.05


def test_booleans_take_the_official_no_underscore_spelling_too(tmp_path):
    """main_pretrain.py's --no_pin_mem (and --no_x for every boolean), beside --no-x."""
    y = tmp_path / "c.yaml"
    y.write_text("norm_pix_loss: true\n")
    assert load_config([])[0].pin_mem is True
    cfg, _ = load_config(["--config", str(y), "--no_pin_mem", "--no_norm_pix_loss"])
    assert (cfg.pin_mem, cfg.norm_pix_loss, cfg.auto_resume) == (False, False, True)
    cfg, _ = load_config(["--config", str(y), "--no-pin_mem", "--no_auto_resume"])
    assert (cfg.pin_mem, cfg.norm_pix_loss, cfg.auto_resume) == (False, True, False)


def test_a_base_lr_flag_wins_over_an_absolute_lr_in_the_yaml(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("lr: 0.0005\nblr: 0.001\n")
    cfg, _ = load_config(["--config", str(y), "--blr", "1e-4"])  # an lr sweep over a copy
    assert (cfg.blr, cfg.lr) == (1e-4, None)
    cfg, _ = load_config(["--config", str(y)])  # the file alone: its absolute lr
    assert cfg.lr == 0.0005
    cfg, _ = load_config(["--config", str(y), "--blr", "1e-4", "--lr", "2e-4"])
    assert cfg.lr == 2e-4


def test_bad_values_are_all_rejected_before_training(tmp_path, image_dir):
    cfg = make_config(
        dict(
            data_path=image_dir,
            mask_ratio=1.5,
            batch_size=0,
            amp="fp8",
            warmup_epochs=50,
            epochs=10,
            model="mae_vit_giant",
        )
    )
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    msg = str(e.value)
    for part in (
        "mask_ratio must be in (0, 1)",
        "batch_size must be an int >= 1, got 0",
        "amp must be one of",
        "warmup_epochs must be in [0, epochs=10], got 50",
        "unknown model 'mae_vit_giant'",
    ):
        assert part in msg
    with pytest.raises(ConfigError, match="unknown config key"):
        make_config({"batchsize": 3})


def test_models_that_cannot_be_built_are_named_before_training(tmp_path, image_dir):
    for kwargs, model, text in (
        ({"embed_dims": 32}, "mae_vit_base_patch16", "unexpected keyword argument 'embed_dims'"),
        ({**TINY_MAE, "num_heads": 5}, "mae_vit_base_patch16", "divisible by num_heads"),
        ({}, "vit_base_patch16", "'vit_base_patch16' is not an MAE model"),
    ):
        with pytest.raises(ConfigError, match=text):
            validate(make_config(dict(data_path=image_dir, model=model, model_kwargs=kwargs)))


def test_patch_and_schedule_problems_are_named_with_the_others(tmp_path, image_dir):
    """They were found one per run, after the others, once the trainer built the model."""
    tiny = dict(data_path=image_dir, model_kwargs={**TINY_MAE, "patch_size": 8})
    with pytest.raises(ConfigError) as e:
        validate(make_config(dict(tiny, input_size=36, blr=-1.0, lr=0.1, min_lr=1.0)))
    msg = str(e.value)
    assert "blr must be > 0" in msg and "input_size 36 is not a multiple of the patch size 8" in msg
    assert "min_lr 1.0 is above lr 0.1" in msg
    with pytest.raises(ConfigError, match="mask_ratio 0.99 keeps no patch of the 16"):
        validate(make_config(dict(tiny, input_size=32, mask_ratio=0.99)))
    # an lr from blr is known once the batch is: refused before anything is trained
    with pytest.raises(
        ConfigError, match=r"min_lr 0.5 is above the lr 1.563e-05 \(blr 0.001 x batch 4"
    ):
        Trainer(tiny_cfg(tmp_path, image_dir, min_lr=0.5), CPU, DistInfo())
    assert not (tmp_path / "out" / "checkpoint-last.pth").exists()


def test_a_bad_cpu_matmul_library_is_refused_before_training(tmp_path, image_dir, monkeypatch):
    monkeypatch.setenv("MAE_TRANSFER_CPU_MATMUL", "mkl")
    with pytest.raises(ConfigError, match="MAE_TRANSFER_CPU_MATMUL must be one of .*'mkl'"):
        Trainer(tiny_cfg(tmp_path, image_dir), CPU, DistInfo())
    assert not (tmp_path / "out" / "checkpoint-last.pth").exists()


def test_k_nn_folders_without_classes_stop_before_anything_is_written(tmp_path, image_dir):
    cfg = tiny_cfg(tmp_path, image_dir, knn_train=image_dir, knn_val=image_dir)  # flat folders
    with pytest.raises(ConfigError, match="k-NN monitor .* no class folders with images"):
        Trainer(cfg, CPU, DistInfo())
    assert not (tmp_path / "out").exists()


def test_yaml_numbers_wrong_types_zero_mask_and_empty_folders(tmp_path, image_dir):
    y = tmp_path / "c.yaml"
    y.write_text("blr: 1e-3\nepochs: '3'\nwarmup_epochs: 1\n")  # YAML reads 1e-3 as a string
    cfg, _ = load_config(["--config", str(y), "--data_path", image_dir])
    assert cfg.blr == 1e-3 and cfg.epochs == 3
    validate(cfg)
    empty = tmp_path / "empty"
    (empty / "train" / "n01").mkdir(parents=True)
    (empty / "train" / "n01" / "notes.txt").write_text("not an image")
    bad = make_config(dict(data_path=str(empty), blr="fast", epochs=2.5, mask_ratio=0.0))
    with pytest.raises(ConfigError) as e:
        validate(bad)
    msg = str(e.value)
    assert "blr must be a number, got 'fast'" in msg
    assert "epochs must be an integer, got 2.5" in msg
    assert "mask_ratio must be in (0, 1)" in msg and "holds no images" in msg


@pytest.mark.parametrize(
    "path",
    sorted(glob.glob(os.path.join(ROOT, "configs", "pretrain", "*.yaml"))),
    ids=os.path.basename,
)
def test_every_shipped_config_validates_and_builds(path):
    """Read as the command line reads it, checked without its paths (as a Slurm submission
    checks it) and built on the meta device as the trainer builds it."""
    cfg, _ = load_config(["--config", path, "--data_path", "/datasets/imagenet"])
    validate(cfg, check_paths=False)
    with torch.device("meta"):
        model = create_model(
            cfg.model, img_size=cfg.input_size, norm_pix_loss=cfg.norm_pix_loss, **cfg.model_kwargs
        )
    size = size_of(cfg.model)
    width = cfg.model_kwargs.get("embed_dim", VIT_SIZES[size]["embed_dim"])
    p = cfg.model_kwargs.get("patch_size", patch_size_of(cfg.model))
    assert model.patch_embed.proj.weight.shape == (width, 3, p, p)
    assert model.patch_embed.num_patches == (cfg.input_size // p) ** 2
    name = os.path.basename(path)
    if name != "demo_tiny.yaml":  # the paper's recipe, at the size in the file's name
        assert name == f"mae_vit_{size}_in1k.yaml" and not cfg.model_kwargs
        assert (cfg.mask_ratio, cfg.norm_pix_loss, cfg.epochs, cfg.blr) == (0.75, True, 800, 1.5e-4)


def test_cli_rejects_bad_config_and_writes_nothing(tmp_path, image_dir, capfd):
    out = tmp_path / "out"
    code = pretrain_main(["--data_path", image_dir, "--mask_ratio", "2", "--output_dir", str(out)])
    assert code == 2 and not out.exists()
    assert "mask_ratio must be in (0, 1): the loss is taken on masked patches; got 2.0" in (
        capfd.readouterr().err
    )
    code = pretrain_main(["--data_path", str(tmp_path / "missing"), "--output_dir", str(out)])
    assert code == 2 and not out.exists()
    assert f"data_path '{tmp_path / 'missing'}' is not a directory" in capfd.readouterr().err


def test_input_size_must_fit_patch(tmp_path, image_dir):
    with pytest.raises(ConfigError, match="not a multiple of the patch size 16"):
        tiny_cfg(tmp_path, image_dir, input_size=40)  # (validated)
    cfg = make_config(tiny_values(image_dir, output_dir=str(tmp_path), input_size=40))
    with pytest.raises(ConfigError, match="not a multiple of the patch size 16"):
        Trainer(cfg, torch.device("cpu"), DistInfo())  # (and by the trainer, unvalidated)


def test_corrupt_and_non_image_files_are_skipped_and_counted(tmp_path):
    d = tmp_path / "data" / "train" / "n01"
    write_images(str(d), 6)
    (d / "truncated.png").write_bytes((d / "img_001.png").read_bytes()[:80])
    (d / "not_an_image.jpg").write_text("hello")
    (d / "notes.txt").write_text("ignored: not an image extension")
    ds = PretrainDataset(str(tmp_path / "data"), 32, num_patches=4)
    assert len(ds.files) == 8  # .txt ignored; the two bad ones found by extension
    # Each bad file met is counted: items 6 and 7 are the bad ones, each replaced by a good
    # file at random (item 6's replacement may be item 7 first, then a good one)
    skips = [ds[(0, i)][2] for i in range(len(ds))]
    assert skips[:6] == [0] * 6 and 1 <= skips[6] <= 2 and 1 <= skips[7] <= 2
    cfg = tiny_cfg(tmp_path, str(tmp_path / "data"), epochs=1, batch_size=2)
    t = train(cfg)
    assert t.skipped_images >= 1
    # exactly the bad files met in its one epoch (the draws follow the run's seed)
    ds = PretrainDataset(str(tmp_path / "data"), 32, num_patches=4, seed=cfg.seed)
    assert t.skipped_images == sum(ds[(0, i)][2] for i in range(len(ds))) == 2


def test_sampler_splits_global_batches_across_processes():
    one = list(ResumableDistributedSampler(20, 4, 0, 1, seed=3))
    two = [list(ResumableDistributedSampler(20, 2, r, 2, seed=3)) for r in (0, 1)]
    for b in range(5):
        assert sorted(one[4 * b : 4 * b + 4]) == sorted(
            two[0][2 * b : 2 * b + 2] + two[1][2 * b : 2 * b + 2]
        )
    s = ResumableDistributedSampler(20, 4, 0, 1, seed=3)
    s.set_epoch(0, start_batch=2)
    assert list(s) == one[8:]


def test_augmentation_and_noise_depend_only_on_epoch_and_index(image_dir):
    ds = PretrainDataset(image_dir, 32, num_patches=4, seed=1)
    a, b = ds[(2, 5)], ds[(2, 5)]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(ds[(3, 5)][0], a[0])
    x, noise, skipped = collate([a, b])
    assert x.shape == (2, 3, 32, 32) and noise.shape == (2, 4) and skipped == 0


def test_lr_schedule_warmup_then_cosine():
    cfg = PretrainConfig(epochs=10, warmup_epochs=2, min_lr=1e-6)
    assert cosine_lr(0.0, cfg, 1e-3) == 0.0
    assert cosine_lr(1.0, cfg, 1e-3) == pytest.approx(5e-4)
    assert cosine_lr(2.0, cfg, 1e-3) == pytest.approx(1e-3)
    assert cosine_lr(6.0, cfg, 1e-3) == pytest.approx(1e-6 + (1e-3 - 1e-6) * 0.5)
    assert cosine_lr(10.0, cfg, 1e-3) == pytest.approx(1e-6)


def test_optimizer_groups_and_effective_lr(tmp_path, image_dir):
    cfg = tiny_cfg(tmp_path, image_dir, accum_iter=2, blr=1.5e-4)
    t = Trainer(cfg, torch.device("cpu"), DistInfo())
    assert t.base_lr == pytest.approx(1.5e-4 * 4 * 2 / 256)
    assert t.optimizer.defaults["betas"] == (0.9, 0.95)
    no_decay = {
        n for g in t.optimizer.param_groups if g["weight_decay"] == 0 for n in g["param_names"]
    }
    assert {
        "cls_token",
        "mask_token",
        "blocks.0.norm1.weight",
        "blocks.0.attn.qkv.bias",
    } <= no_decay
    assert "blocks.0.attn.qkv.weight" not in no_decay
    assert "pos_embed" not in no_decay  # frozen sin-cos: not optimised at all


def test_resume_after_kill_equals_uninterrupted(tmp_path, image_dir):
    ref = train(tiny_cfg(tmp_path / "a", image_dir, epochs=3, save_every_iters=1, accum_iter=1))

    class Killed(Exception):
        pass

    cfg = tiny_cfg(tmp_path / "b", image_dir, epochs=3, save_every_iters=1)
    t = Trainer(cfg, torch.device("cpu"), DistInfo())
    step, calls = t._step, []

    def dying_step(*a):
        calls.append(1)
        if len(calls) == 5:  # mid-epoch 2 (3 iterations per epoch)
            raise Killed
        return step(*a)

    t._step = dying_step
    with pytest.raises(Killed):
        t.train()
    resumed = train(cfg)  # auto-resumes from checkpoint-last.pth
    assert (resumed.epoch, resumed.iter) == (3, 0)
    for k, v in ref.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    a = ref.optimizer.state_dict()["state"]
    b = resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(a[i]["exp_avg_sq"], b[i]["exp_avg_sq"]) for i in a)


def test_resume_with_accumulation_equals_uninterrupted(tmp_path, image_dir):
    """3 iterations per epoch, accum_iter 2: the odd iteration never carries into the next epoch
    (as in the official loop), so a run resumed from an epoch end matches."""
    ref = train(tiny_cfg(tmp_path / "a", image_dir, epochs=3, accum_iter=2))
    cfg = tiny_cfg(tmp_path / "b", image_dir, epochs=3, accum_iter=2)
    part = Trainer(dataclasses.replace(cfg, epochs=3), torch.device("cpu"), DistInfo())
    part._train_epoch(__import__("tqdm").tqdm(disable=True))  # one epoch, then "killed"
    part.close()
    resumed = train(cfg)
    for k, v in ref.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k


def test_official_checkpoint_resumes_at_the_next_epoch(tmp_path, image_dir):
    """main_pretrain.py's checkpoint-N.pth holds N = the last finished epoch."""
    first = train(tiny_cfg(tmp_path / "a", image_dir, epochs=1))
    official = tmp_path / "checkpoint-0.pth"
    state = first.checkpoint_state()
    torch.save({k: state[k] for k in ("model", "optimizer", "scaler")} | {"epoch": 0}, official)
    cfg = tiny_cfg(tmp_path / "b", image_dir, epochs=2, resume=str(official))
    t = Trainer(cfg, torch.device("cpu"), DistInfo())
    assert (t.epoch, t.iter) == (1, 0)
    assert torch.equal(t.model.pos_embed, first.model.pos_embed)
    t.close()


def test_a_finished_run_returns_its_last_stats(tmp_path, image_dir):
    cfg = tiny_cfg(tmp_path, image_dir, epochs=1)
    loss = train(cfg).checkpoint_state()["epoch"]
    again = Trainer(cfg, torch.device("cpu"), DistInfo())  # auto-resumes a finished run
    stats = again.train()
    again.close()
    assert loss == 1 and stats["epoch"] == 0 and stats["train_loss"] > 0


def test_a_run_without_tensorboard_and_matplotlib_trains_and_says_so(
    tmp_path, image_dir, monkeypatch, capfd
):
    """The core install (pip install mae-transfer, no [train] extra) stopped at start-up
    without tensorboard, and after the whole run (no exit code) without matplotlib."""
    for name in ("tensorboard", "torch.utils.tensorboard", "matplotlib", "matplotlib.pyplot"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    cfg = tiny_cfg(tmp_path, image_dir, epochs=1)
    assert pretrain_main(["--config", write_yaml(tmp_path / "c.yaml", cfg.to_dict())]) == 0
    out = pathlib.Path(cfg.output_dir)
    assert (out / LAST).is_file() and (out / "encoder.pth").is_file()
    assert (out / "log.jsonl").read_text().count('"loss"') >= 1
    assert not list(out.glob("events.out.tfevents*")) and not (out / "loss_curve.png").exists()
    said = capfd.readouterr().err  # (the CLI's logging set-up replaces caplog's handler)
    assert "tensorboard is not installed: no TensorBoard event files" in said
    assert "matplotlib is not installed: no loss curve picture" in said


def test_non_finite_weights_are_never_saved(tmp_path, image_dir):
    t = train(tiny_cfg(tmp_path, image_dir, epochs=1))
    last = os.path.join(t.cfg.output_dir, LAST)
    before = pathlib.Path(last).read_bytes()
    with torch.no_grad():
        t.model.blocks[0].mlp.fc1.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteLossError, match="blocks.0.mlp.fc1.weight"):
        t.save()
    assert pathlib.Path(last).read_bytes() == before


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, image_dir):
    cfg = tiny_cfg(tmp_path, image_dir, epochs=2, save_every_iters=1)
    t = Trainer(cfg, torch.device("cpu"), DistInfo())
    forward, calls = t.ddp.forward, []

    def poisoned(*a, **k):
        calls.append(1)
        loss, pred, mask = forward(*a, **k)
        return (loss * float("nan") if len(calls) == 4 else loss), pred, mask

    t.ddp.forward = poisoned
    with pytest.raises(NonFiniteLossError, match="loss is nan at epoch 1, iteration 0"):
        t.train()
    ckpt = torch.load(os.path.join(cfg.output_dir, LAST), weights_only=True)
    assert (ckpt["epoch"], ckpt["iter"]) == (1, 0)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def _run_ddp_or_single(tmp_path, image_dir, nproc: int, batch: int) -> dict:
    out = tmp_path / f"out{nproc}"
    args = [
        "--config",
        str(tmp_path / "tiny.yaml"),
        "--output_dir",
        str(out),
        "--batch_size",
        str(batch),
    ]
    if nproc == 1:
        cmd = [sys.executable, "-m", "pretrain", *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--master_port",
            str(_free_port()),  # (a fixed one fails while another run holds it)
            "-m",
            "pretrain",
            *args,
        ]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(out / LAST, weights_only=True)


def test_two_process_gloo_ddp_equals_one_process(tmp_path, image_dir):
    write_yaml(tmp_path / "tiny.yaml", tiny_values(image_dir))
    single = _run_ddp_or_single(tmp_path, image_dir, 1, 6)
    ddp = _run_ddp_or_single(tmp_path, image_dir, 2, 3)
    assert single["epoch"] == ddp["epoch"] == 2
    for k, v in single["model"].items():
        assert torch.allclose(v, ddp["model"][k], rtol=1e-4, atol=1e-6), k


def test_the_entry_points_also_run_as_files(tmp_path):
    """``python pretrain/main.py``, as the official ``python main_pretrain.py``: the relative
    imports failed when the module was not run with -m."""
    for script, args, says in (
        ("main.py", ["--list-models"], "mae_vit_base_patch16"),
        ("submit.py", ["--help"], "--nodes"),
        ("export.py", ["--help"], "CHECKPOINT"),
    ):
        cmd = [sys.executable, os.path.join(ROOT, "pretrain", script), *args]
        env = {**os.environ, "PYTHONPATH": ROOT}  # (this tree, not another installed copy)
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert r.returncode == 0 and says in r.stdout, (script, r.stderr[-2000:])


def test_cli_end_to_end_and_reconstruction_picture(tmp_path, image_dir):
    out = tmp_path / "out"
    write_yaml(
        tmp_path / "c.yaml", tiny_values(image_dir, epochs=1, warmup_epochs=0, num_workers=1)
    )
    env = {**os.environ, "PYTHONPATH": ROOT}
    cmd = [
        sys.executable,
        "-m",
        "pretrain",
        "--config",
        str(tmp_path / "c.yaml"),
        "--output_dir",
        str(out),
        "--device",
        "cpu",
    ]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in (
        "config.yaml",
        LAST,
        "checkpoint-0.pth",
        "encoder.pth",
        "log.jsonl",
        "loss_curve.png",
    ):
        assert (out / name).is_file(), name
    assert any(p.name.startswith("events.out.tfevents") for p in out.iterdir())
    encoder = torch.load(out / "encoder.pth", weights_only=True)["model"]
    assert "blocks.0.attn.qkv.weight" in encoder and not any(
        k.startswith("decoder") for k in encoder
    )
    png = tmp_path / "recon.png"
    cmd = [
        sys.executable,
        os.path.join(ROOT, "tools", "visualize_reconstruction.py"),
        "--checkpoint",
        str(out / LAST),
        "--images",
        image_dir,
        "--num",
        "2",
        "--output",
        str(png),
    ]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a dot in the name (matplotlib refused it once the model ran); --model of another size
    named = [*cmd[:-1], str(tmp_path / "recon_mask0.9"), "--model", "mae_vit_base_patch16"]
    r = subprocess.run(named, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "recon_mask0.9.png").is_file()
    assert "--model mae_vit_base_patch16 ignored: the checkpoint records" in r.stderr
    cmd[3] = str(out / "encoder.pth")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "has no MAE decoder" in r.stderr


def test_slurm_launcher_runs_a_job_in_debug_mode(tmp_path, image_dir):
    pytest.importorskip("submitit")
    out = tmp_path / "out"
    write_yaml(tmp_path / "c.yaml", tiny_values(image_dir, epochs=1, warmup_epochs=0))
    cmd = [
        sys.executable,
        "-m",
        "pretrain.submit",
        "--cluster",
        "debug",
        "--ngpus",
        "1",
        "--config",
        str(tmp_path / "c.yaml"),
        "--output_dir",
        str(out),
    ]
    env = {**os.environ, "PYTHONPATH": ROOT}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / LAST).is_file() and (out / "submitit").is_dir()


def test_too_few_images_for_one_batch_is_a_config_error(tmp_path, image_dir):
    cfg = tiny_cfg(tmp_path, image_dir, batch_size=64)
    with pytest.raises(ConfigError, match="12 images are fewer than one global batch"):
        Trainer(cfg, torch.device("cpu"), DistInfo())


def test_auto_resume_refuses_a_run_with_other_training_settings(tmp_path, image_dir, caplog):
    train(tiny_cfg(tmp_path, image_dir, epochs=1))
    config = (tmp_path / "out" / "config.yaml").read_text()
    # an ablation pointed at the old output_dir: it would have continued (or been "finished")
    with pytest.raises(
        ConfigError, match=r"other settings: blr 0.001 -> 0.005, mask_ratio 0.75 -> 0.5\. Give"
    ):
        Trainer(tiny_cfg(tmp_path, image_dir, mask_ratio=0.5, blr=5e-3), CPU, DistInfo())
    assert (tmp_path / "out" / "config.yaml").read_text() == config  # not overwritten
    # how it runs may change (more epochs, another batch size, workers): it continues
    longer = Trainer(tiny_cfg(tmp_path, image_dir, epochs=2, batch_size=2), CPU, DistInfo())
    assert longer.epoch == 1
    longer.close()
    # an explicit --resume continues with the new values, saying which
    last = str(tmp_path / "out" / LAST)
    again = Trainer(tiny_cfg(tmp_path, image_dir, mask_ratio=0.5, resume=last), CPU, DistInfo())
    assert again.epoch == 1 and "changed settings: mask_ratio 0.75 -> 0.5" in caplog.text
    again.close()


def test_resuming_a_finished_run_into_a_new_output_dir_says_what_to_do(tmp_path, image_dir):
    """It said "nothing to do", then crashed exporting an encoder the new dir did not have."""
    train(tiny_cfg(tmp_path, image_dir, epochs=1))
    last = str(tmp_path / "out" / LAST)
    cfg = make_config(
        tiny_values(image_dir, output_dir=str(tmp_path / "new"), epochs=1, resume=last)
    )
    validate(cfg)
    trainer = Trainer(cfg, CPU, DistInfo())
    with pytest.raises(ConfigError, match=r"has finished all 1 epochs: nothing to train into"):
        trainer.train()
    trainer.close()
    # the run's own output_dir: still "nothing to do", and its encoder is exported again
    assert pretrain_main(["--config", write_yaml(tmp_path / "c.yaml", tiny_values(
        image_dir, output_dir=str(tmp_path / "out"), epochs=1))]) == 0  # fmt: skip


def test_export_takes_pretraining_checkpoints_only(tmp_path, capfd):
    from conftest import save_mae_checkpoints

    from pretrain.export import main as export_main

    enc, paths = save_mae_checkpoints(tmp_path, img_size=32, depth=2)
    out = str(tmp_path / "enc.pth")
    assert export_main([paths["ours"], out]) == 0
    for folder, text in (
        (str(tmp_path), "names a folder: name the file (e.g. encoder.pth)"),
        (str(tmp_path / "new") + "/", "names a folder: name the file"),  # one to make
        (out + "/x.pth", f"its folder cannot be made, {out} is a file"),
    ):
        with pytest.raises(SystemExit) as e:  # said before anything is read
            export_main([paths["ours"], folder])
        assert e.value.code == 2 and text in capfd.readouterr().err, folder
    assert set(torch.load(out, weights_only=True)["model"]) == set(enc)
    detector = {f"backbone.bottom_up.vit.{k}": v for k, v in enc.items()}
    torch.save({"model": detector}, tmp_path / "det.pth")
    classifier = {**enc, "head.weight": torch.zeros(3, 32), "fc_norm.weight": torch.ones(32)}
    torch.save({"model": classifier}, tmp_path / "cls.pth")
    (tmp_path / "page.pth").write_text("<html><body>404 Not Found</body></html>")
    for src, text in (
        ("det.pth", "its ViT sits under 'backbone.bottom_up.vit.'"),
        ("cls.pth", "is a fine-tuned classifier"),
        ("page.pth", "is not a PyTorch checkpoint (it starts with b'<html"),
        ("missing.pth", "checkpoint not found"),
    ):
        assert export_main([str(tmp_path / src), out]) == 2, src
        assert text in capfd.readouterr().err, src


def test_visualization_refuses_what_it_cannot_draw(tmp_path, capfd):
    import importlib.util

    from mae_transfer import create_model

    spec = importlib.util.spec_from_file_location(
        "recon_tool", os.path.join(ROOT, "tools", "visualize_reconstruction.py")
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    mae = create_model("mae_vit_base_patch16", img_size=32, **TINY_MAE)
    path = str(tmp_path / "full.pth")
    torch.save({"model": mae.state_dict(), "args": {"model": "mae_vit_base_patch16",
                "model_kwargs": TINY_MAE, "input_size": 32}}, path)  # fmt: skip
    base = ["--checkpoint", path, "--output", str(tmp_path / "r.png"), "--num", "1"]
    os.makedirs(tmp_path / "empty")
    assert tool.main(base) == 0 and (tmp_path / "r.png").is_file()
    photos = tmp_path / "photos"  # an unreadable file first: skipped, the next one drawn
    write_images(str(photos), 2)
    (photos / "aaa_zero.jpg").write_bytes(b"")
    assert tool.main(base + ["--images", str(photos)]) == 0
    (photos / "img_000.jpg").write_bytes(b"")
    (photos / "img_001.png").write_bytes(b"")
    assert tool.main(base + ["--images", str(photos)]) == 2
    assert "no readable images" in capfd.readouterr().err
    for extra, text in (
        (["--input_size", "30"], "not a multiple of"),
        (["--images", str(tmp_path / "empty")], "no images (.jpg"),
        (["--mask_ratio", "0.99"], "--mask_ratio 0.99 keeps no patch of the 4"),
    ):
        assert tool.main(base + extra) == 2, extra
        assert text in capfd.readouterr().err, extra
    # --output: a name without a suffix, a folder, a folder still to make; said as written
    for given, written in (
        ("named", "named.png"),
        ("empty", "empty/reconstruction.png"),
        ("new/sub/r.png", "new/sub/r.png"),
    ):
        assert tool.main([*base[:2], "--output", str(tmp_path / given), "--num", "1"]) == 0
        assert (
            tmp_path / written
        ).is_file() and f"wrote {tmp_path / written}" in capfd.readouterr().out
    bare = str(tmp_path / "bare.pth")  # no args: the model is read from the weights or given
    torch.save({"model": mae.state_dict()}, bare)
    for extra, text in (
        (["--model", "mae_vit_large_patch16"], "does not fit mae_vit_large_patch16"),
        ([], "cannot tell the model"),
    ):
        assert tool.main(["--checkpoint", bare, "--num", "1", *extra]) == 2, extra
        assert text in capfd.readouterr().err, extra
    for extra, text in (
        (["--mask_ratio", "1.5"], "--mask_ratio must be in [0, 1)"),
        (["--images", str(tmp_path / "nothere")], "no such file or folder"),
    ):
        with pytest.raises(SystemExit) as e:
            tool.main(base + extra)
        assert e.value.code == 2 and text in capfd.readouterr().err, extra


def test_bad_yaml_output_dir_and_device_are_config_errors(tmp_path, image_dir):
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(["--config", str(broken)])
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        validate(make_config(tiny_values(image_dir, output_dir=str(tmp_path / "afile"))))
    with pytest.raises(ConfigError, match="output_dir must name a folder, got ''"):
        validate(make_config(tiny_values(image_dir, output_dir="")))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available here"):
            validate(make_config(tiny_values(image_dir, device="cuda")))
        # a Slurm submission host checks without paths: no GPU needed there
        validate(make_config(tiny_values(image_dir, device="cuda")), check_paths=False)


def test_resume_hint_names_only_flags_the_protocol_has(tmp_path, image_dir):
    from conftest import save_mae_checkpoints

    _, paths = save_mae_checkpoints(tmp_path, img_size=32, depth=2)  # encoder-only: no decoder
    cfg = tiny_cfg(tmp_path, image_dir, resume=paths["official"])
    with pytest.raises(ConfigError, match="does not hold this run's model") as e:
        Trainer(cfg, CPU, DistInfo())
    assert "--finetune" not in str(e.value)
