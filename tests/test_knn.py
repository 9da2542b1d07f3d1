"""k-NN: the weighted vote on constructed cases, feature extraction, several ranks, the monitor
inside pretraining (which must not change the run) and the standalone command."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from conftest import (
    ROOT,
    TINY_MAE,
    count_host_reads,
    run_ranks,
    save_mae_checkpoints,
    write_colour_classes,
    write_images,
)

from mae_transfer.classification import knn
from mae_transfer.classification.knn import (
    KNNEvaluator,
    encoder_for_checkpoint,
    extract_features,
    knn_accuracy,
    knn_scores,
)
from mae_transfer.engine.config import ConfigError
from mae_transfer.engine.distributed import DistInfo
from pretrain.config import make_config, validate
from pretrain.engine import Trainer


class MeanColour(torch.nn.Module):
    """A stand-in encoder whose class token is the image's mean colour (a separable feature)."""

    def forward_features(self, x):
        return x.mean(dim=(2, 3))[:, None, :].expand(-1, 2, -1)


def write_texture_classes(root, per_class: int, seed: int) -> str:
    """Class folders a, b, c of conftest's textures dealt in turn (image i to class i % 3): the
    texture depends on i % 5, not on the class, so a k-NN is neither always right nor always
    wrong (colour classes give 100% at every seed, and a tool's number equal to 100 says little).
    """
    pool = os.path.join(str(root), "all")
    for i, path in enumerate(write_images(pool, 3 * per_class, seed=seed)):
        os.makedirs(os.path.join(str(root), "abc"[i % 3]), exist_ok=True)
        os.rename(path, os.path.join(str(root), "abc"[i % 3], os.path.basename(path)))
    os.rmdir(pool)
    return str(root)


def test_votes_are_weighted_by_exp_similarity_over_t():
    train = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    test = torch.tensor([[2.0, 0.0]])  # normalised to (1, 0): similarities 1, 0.8, 0
    s2 = knn_scores(train, labels, test, num_classes=2, k=2, temperature=0.5)
    assert torch.allclose(s2, torch.tensor([[math.exp(2.0), math.exp(1.6)]]))
    s3 = knn_scores(train, labels, test, num_classes=2, k=3, temperature=0.5)
    assert torch.allclose(s3, torch.tensor([[math.exp(2.0), math.exp(1.6) + 1.0]]))
    big = knn_scores(train, labels, test, num_classes=2, k=200, temperature=0.5)  # k capped at 3
    assert torch.allclose(big, s3)


def test_accuracy_on_a_case_with_a_known_answer():
    """One class-0 point right next to the test points, many class-1 points a little further:
    k = 1 follows the nearest (100% class 0), k = 20 the crowd (0%)."""
    torch.manual_seed(0)
    angle = torch.tensor([0.0] + [0.3] * 20)
    train = torch.stack([angle.cos(), angle.sin()], dim=1)
    labels = torch.tensor([0] + [1] * 20)
    test = torch.tensor([[1.0, 0.01], [1.0, -0.01]])
    acc = knn_accuracy(train, labels, test, torch.tensor([0, 0]), 2, ks=(1, 20), temperature=1.0)
    assert acc == {1: 100.0, 20: 0.0}
    # two well separated clusters: perfect at any k; shuffled training labels: about chance
    centres = torch.randn(2, 16) * 5
    x = torch.cat([centres[0] + torch.randn(100, 16), centres[1] + torch.randn(100, 16)])
    y = torch.arange(2).repeat_interleave(100)
    assert knn_accuracy(x[::2], y[::2], x[1::2], y[1::2], 2) == {20: 100.0, 200: 100.0}
    shuffled = y[::2][torch.randperm(100)]
    assert knn_accuracy(x[::2], shuffled, x[1::2], y[1::2], 2)[20] < 75


def test_extract_features_normalises_and_restores_the_mode(tmp_path):
    root = write_colour_classes(tmp_path / "train", 4, seed=0)
    model = MeanColour().train()
    ev = KNNEvaluator(root, root, 32)
    feats, labels, replaced = extract_features(model, ev.loaders[0], torch.device("cpu"))
    assert (
        model.training and feats.shape == (12, 3) and labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    )
    assert torch.allclose(feats.norm(dim=1), torch.ones(12))


@pytest.mark.parametrize("on_device", [False, True])
def test_extraction_reads_nothing_back_batch_by_batch(tmp_path, monkeypatch, on_device):
    # on a GPU each read is a sync: the copies to the host are asynchronous instead
    root = write_colour_classes(tmp_path / "train", 4, seed=0)
    loader = list(KNNEvaluator(root, root, 32, batch_size=2).loaders[0])  # (decoded before)
    run = SimpleNamespace(
        _step=lambda: extract_features(
            MeanColour(), loader, torch.device("cpu"), on_device=on_device
        )
    )
    reads = count_host_reads(run, monkeypatch)
    feats, labels, replaced = run._step()
    assert reads == [1] and feats.shape == (12, 3) and not replaced.any()


def test_images_standing_in_for_unreadable_ones_are_left_out_of_the_knn(tmp_path):
    train = write_colour_classes(tmp_path / "train", 6, seed=0)
    val = write_colour_classes(tmp_path / "val", 3, seed=1)
    ev = KNNEvaluator(train, val, 32)
    for ds, i in ((ev.sets[0], 0), (ev.sets[1], 0), (ev.sets[1], 1)):
        with open(ds.paths[i], "wb") as f:
            f.write(b"not an image")
    spy, real = [], knn.knn_correct

    def knn_correct_spy(*args, **kwargs):
        spy.append(args[:4])
        return real(*args, **kwargs)

    with mock.patch.object(knn, "knn_correct", knn_correct_spy):
        acc = ev(MeanColour(), torch.device("cpu"), ks=(3,))
    tr_f, tr_l, va_f, va_l = spy[0]
    assert len(tr_l) == 18 and (tr_l == -1).sum() == 1  # never a neighbour
    assert len(va_l) == 9 and (va_l == -1).sum() == 2  # never counted
    assert acc == {"knn_k3_top1": 100.0, "knn_skipped_images": 3}  # (7 readable of 9)


def test_evaluator_on_class_folders(tmp_path):
    train = write_colour_classes(tmp_path / "train", 6, seed=0)
    val = write_colour_classes(tmp_path / "val", 3, seed=1)
    ev = KNNEvaluator(train, val, 32, max_images=9)
    assert [len(s) for s in ev.sets] == [9, 9]
    acc = ev(MeanColour(), torch.device("cpu"), ks=(3,))
    assert acc == {"knn_k3_top1": 100.0, "knn_skipped_images": 0}
    os.rename(os.path.join(val, "blue"), os.path.join(val, "navy"))
    with pytest.raises(ValueError, match="k-NN class folders differ"):
        KNNEvaluator(train, val, 32)


def _knn_on_ranks(info, train, val):
    import mae_transfer.classification.knn as knn

    ev = KNNEvaluator(train, val, 32, info, batch_size=4)
    torch.manual_seed(0)
    enc = torch.nn.Linear(3, 8)  # a feature that is not perfectly separable

    class Enc(torch.nn.Module):
        def forward_features(self, x):
            return enc(x.mean(dim=(2, 3)))[:, None, :]

    searched, real = [], knn.knn_correct  # (train rows, padding rows, val rows) of each search

    def spy(train_f, train_l, test_f, test_l, *args, **kwargs):
        pad = int((train_l < 0).sum())
        assert not train_f[train_l < 0].any()  # padding rows: zeros with label -1
        searched.append((len(train_l) - pad, pad, len(test_l)))
        return real(train_f, train_l, test_f, test_l, *args, **kwargs)

    knn.knn_correct = spy
    try:
        return ev(Enc(), torch.device("cpu"), ks=(1, 5)), searched
    finally:
        knn.knn_correct = real


def test_several_ranks_gather_the_training_features_and_split_the_search(tmp_path):
    train = write_colour_classes(tmp_path / "train", 7, seed=0)
    val = write_colour_classes(tmp_path / "val", 5, seed=1)
    single, searched = _knn_on_ranks(DistInfo(), train, val)
    assert searched == [(21, 0, 15)]
    results = run_ranks(_knn_on_ranks, train, val)
    assert all(status == "ok" and value[0] == single for status, value in results.values()), results
    # every rank votes with all 21 training features, for its own share of the 15 images; the
    # shards of 11 and 10 are gathered padded to 11 each (NCCL's equal sizes), on the device
    assert sorted(results[r][1][1][0] for r in results) == [(21, 1, 7), (21, 1, 8)]


def _pretrain_cfg(out, data, **kw):
    values = dict(
        model="mae_vit_base_patch16",
        model_kwargs=TINY_MAE,
        input_size=32,
        batch_size=4,
        epochs=2,
        warmup_epochs=1,
        data_path=data,
        num_workers=0,
        device="cpu",
        amp="fp32",
        log_every_iters=1,
        output_dir=str(out),
        **kw,
    )
    cfg = make_config(values)
    validate(cfg)
    return cfg


def test_the_monitor_logs_a_curve_and_leaves_pretraining_unchanged(tmp_path, image_dir):
    train = write_colour_classes(tmp_path / "knn_train", 4, seed=0)
    val = write_colour_classes(tmp_path / "knn_val", 2, seed=1)
    # global mask noise: masks drawn in the forward from torch's global generator, which a
    # k-NN pass would move on (every DataLoader iterator draws a seed from it)
    noise = dict(mask_noise="global")
    plain = Trainer(
        _pretrain_cfg(tmp_path / "a", image_dir, **noise), torch.device("cpu"), DistInfo()
    )
    plain.train()
    plain.close()
    cfg = _pretrain_cfg(tmp_path / "b", image_dir, knn_train=train, knn_val=val, **noise)
    monitored = Trainer(cfg, torch.device("cpu"), DistInfo())
    monitored.train()
    monitored.close()
    for k, v in plain.model.state_dict().items():
        assert torch.equal(v, monitored.model.state_dict()[k]), k
    with open(tmp_path / "b" / "log.jsonl") as f:
        records = [json.loads(line) for line in f]
    curve = [(r["epoch"], r["knn_k20_top1"]) for r in records if "knn_k20_top1" in r]
    assert [e for e, _ in curve] == [-1, 0, 1] and all(0 <= a <= 100 for _, a in curve)
    # the evaluation's time beside the training's
    epochs = [r for r in records if "train_loss" in r]
    assert len(epochs) == 2 and all(r["eval_time_s"] > 0 and r["time_s"] > 0 for r in epochs)
    assert "knn" in monitored.bar_extras
    # the same curve in TensorBoard
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "b" / "epoch")).Reload()  # per-epoch curves
    points = [(e.step, e.value) for e in events.Scalars("epoch/knn_k20_top1")]
    assert [(s, round(v, 4)) for s, v in points] == [(e, round(a, 4)) for e, a in curve]


def test_the_monitor_of_a_cpu_run_on_a_gpu_node_pins_no_batches(tmp_path, image_dir, monkeypatch):
    """Its loaders pinned whenever a GPU existed, not when the run used one: pinning opens a
    CUDA context, so a --device cpu run on a GPU node took memory on GPU 0."""
    train = write_colour_classes(tmp_path / "knn_train", 2, seed=0)
    val = write_colour_classes(tmp_path / "knn_val", 1, seed=1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = _pretrain_cfg(tmp_path / "out", image_dir, knn_train=train, knn_val=val)
    t = Trainer(cfg, torch.device("cpu"), DistInfo())
    t.close()
    assert len(t.knn.loaders) == 2 and not any(loader.pin_memory for loader in t.knn.loaders)


def test_monitor_config_is_checked(tmp_path, image_dir):
    with pytest.raises(ConfigError, match="needs both knn_train and knn_val"):
        _pretrain_cfg(tmp_path, image_dir, knn_train=image_dir)
    with pytest.raises(ConfigError, match="knn_pool must be one of"):
        _pretrain_cfg(tmp_path, image_dir, knn_train=image_dir, knn_val=image_dir, knn_pool="max")


def test_standalone_command_on_an_official_format_checkpoint(tmp_path):
    _, paths = save_mae_checkpoints(tmp_path, img_size=32, patch_size=8, depth=2)
    train = write_texture_classes(tmp_path / "train", 4, seed=0)
    val = write_texture_classes(tmp_path / "val", 2, seed=1)
    out = tmp_path / "not" / "yet" / "acc.json"  # (made before the work, not after it)
    cmd = [
        sys.executable,
        os.path.join(ROOT, "tools", "knn.py"),
        "--checkpoint",
        paths["official"],
        "--model",
        "mae_vit_base_patch16",  # (no --patch_size: 8 is read from the weights)
        "--embed_dim",
        "32",
        "--depth",
        "2",
        "--num_heads",
        "2",
        "--train",
        train,
        "--val",
        val,
        "--input_size",
        "32",
        "--k",
        "5",
        "200",
        "--max_images",
        "9",
        "--seed",
        "3",
        "--num_workers",
        "0",
        "--device",
        "cpu",
        "--amp",
        "fp32",  # as the evaluator below (auto is bf16 on CPUs with AVX512-BF16 or AMX)
        "--json",
        str(out),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    acc = json.loads(out.read_text())
    assert set(acc) == {"knn_k5_top1", "knn_k200_top1", "knn_skipped_images"}
    assert "knn_k5_top1" in r.stdout and "loaded" in r.stderr
    assert "patch size 8, read from its patch embedding" in r.stderr and "resized" not in r.stderr
    assert "k 200 is more than the 9 images of the bank" in r.stderr
    assert "k-NN bank: 100%" in r.stderr and "k-NN val: 100%" in r.stderr  # (hours on a CPU)
    # the same numbers as the evaluator in this process, with that seed's subsets
    encoder = encoder_for_checkpoint(
        paths["official"], "mae_vit_base_patch16", 32, embed_dim=32, depth=2, num_heads=2
    )
    expected = KNNEvaluator(train, val, 32, max_images=9, seed=3)(
        encoder, torch.device("cpu"), ks=(5, 200)
    )
    assert acc == pytest.approx(expected)
    assert all(0 < acc[f"knn_k{k}_top1"] < 100 for k in (5, 200))  # (a wrong tool would differ)


def test_images_outside_class_folders_are_refused_with_what_to_do(tmp_path):
    train = write_colour_classes(tmp_path / "train", 2, seed=0)
    val = write_colour_classes(tmp_path / "val", 2, seed=1)
    for name in os.listdir(val):  # ImageNet's val/ as released: the images, no classes
        for image in os.listdir(os.path.join(val, name)):
            os.rename(os.path.join(val, name, image), os.path.join(val, f"{name}-{image}"))
        os.rmdir(os.path.join(val, name))
    with pytest.raises(ConfigError, match="sort them into one folder per class"):
        KNNEvaluator(train, val, 32)


def test_the_similarity_search_asks_for_full_fp32_and_an_empty_set_gives_nan(monkeypatch):
    """Evaluation allows TF32 on GPUs, but exp(sim / 0.07) amplifies its 1e-3 errors: the
    search turns it off (on a CPU the request is a no-op, so it is recorded here)."""
    import contextlib

    import mae_transfer.classification.knn as knn

    asked = []

    @contextlib.contextmanager
    def record(device, enabled=True):
        asked.append(enabled)
        yield

    monkeypatch.setattr(knn, "tf32_enabled", record)
    x, y = torch.eye(4), torch.tensor([0, 1, 0, 1])
    assert knn_accuracy(x, y, x, y, 2, ks=(1,)) == {1: 100.0}
    assert asked and not any(asked)
    empty = knn_accuracy(x, y, x[:0], y[:0], 2, ks=(1,))
    assert empty[1] != empty[1]  # NaN, not a ZeroDivisionError


def _knn_tool():
    import importlib.util

    spec = importlib.util.spec_from_file_location("knn_tool", os.path.join(ROOT, "tools", "knn.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_standalone_command_rejects_meaningless_values_before_loading(tmp_path, capsys):
    tool = _knn_tool()
    ckpt = tmp_path / "c.pth"
    torch.save({}, ckpt)
    os.makedirs(tmp_path / "t")
    base = ["--checkpoint", str(ckpt), "--train", str(tmp_path / "t"), "--val", str(tmp_path / "t")]
    assert tool.parse_args(base).k  # the defaults are fine
    url = "https://example.invalid/mae_pretrain_vit_base.pth"  # downloaded when it is read
    assert tool.parse_args(["--checkpoint", url] + base[2:]).checkpoint == url
    for bad, text in (
        (["--k", "20", "0"], "--k must be >= 1, got 0"),
        (["--temperature", "0"], "--temperature must be > 0, got 0.0"),
        (["--temperature", "-0.07"], "--temperature must be > 0"),
        (["--max_images", "-1"], "--max_images must be >= 0"),
        (["--checkpoint", "missing.pth"], "--checkpoint missing.pth: no such file"),
        (["--val", str(tmp_path / "nothere")], "not a directory of class folders"),
        (["--model", "vit_foo"], "--model:"),
        (["--json", str(tmp_path / "t")], "names a folder: name the file (e.g. knn.json)"),
        (["--json", str(ckpt / "k.json")], f"its folder cannot be made, {ckpt} is a file"),
    ):
        with pytest.raises(SystemExit) as e:  # argparse's error: exit code 2
            tool.parse_args(base + bad)
        assert e.value.code == 2 and text in capsys.readouterr().err, bad


def test_standalone_command_names_what_does_not_fit_with_exit_code_2(tmp_path, capfd):
    """A checkpoint of another width, folders without classes: one message, exit 2."""
    tool = _knn_tool()
    _, paths = save_mae_checkpoints(tmp_path, img_size=32, depth=2)
    train = write_colour_classes(tmp_path / "train", 2, seed=0)
    flat = tmp_path / "flat"
    os.makedirs(flat)
    common = ["--input_size", "32", "--num_workers", "0", "--device", "cpu", "--k", "1"]
    tiny = ["--embed_dim", "32", "--depth", "2", "--num_heads", "2"]
    wide = ["--embed_dim", "64", "--depth", "2", "--num_heads", "2"]
    ck = ["--checkpoint", paths["official"]]
    assert tool.main(ck + ["--train", train, "--val", train] + common + wide) == 2
    assert "tensors match" in capfd.readouterr().err
    assert tool.main(ck + ["--train", str(flat), "--val", train] + common + tiny) == 2
    assert str(flat) in capfd.readouterr().err
    odd = ["--embed_dim", "32", "--depth", "2", "--num_heads", "3"]  # was a traceback, exit 1
    assert tool.main(ck + ["--train", train, "--val", train] + common + odd) == 2
    assert "--num_heads 3: embed dim 32 is not divisible by num_heads 3" in capfd.readouterr().err


def test_an_avg_pool_fine_tuned_checkpoint_gives_the_feature_its_head_saw(tmp_path, caplog):
    """A checkpoint fine-tuned on fc_norm(mean of the patches) has no final norm: the k-NN
    reads fc_norm of the mean (before: the mean through an untrained LayerNorm per token)."""
    from mae_transfer.classification.knn import (
        checkpoint_features,
        default_pool,
        encoder_for_checkpoint,
        pool_tokens,
    )
    from mae_transfer.classification.model import build_classifier
    from mae_transfer.registry import create_model

    tiny = dict(embed_dim=32, depth=2, num_heads=2, patch_size=8)
    torch.manual_seed(0)
    pooled = build_classifier("vit_base_patch16", 3, 32, "avg", **tiny).eval()
    assert "norm.weight" not in pooled.state_dict()
    with torch.no_grad():
        pooled.fc_norm.weight.uniform_(0.5, 2.0)
        pooled.fc_norm.bias.normal_()
    path = str(tmp_path / "avg.pth")
    torch.save({"model": pooled.state_dict()}, path)

    model = encoder_for_checkpoint(path, "vit_base_patch16", 32, **tiny).eval()
    fn = checkpoint_features(model, "avg")
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(fn(x), pooled.pooled(x), atol=1e-5)
        old = create_model("vit_base_patch16", img_size=32, **tiny).eval()
        old.load_state_dict(pooled.state_dict(), strict=False)
        assert not torch.allclose(pool_tokens(old.forward_features(x), "avg"), fn(x), atol=1e-2)
    assert checkpoint_features(model, "cls") is None and "never trained" in caplog.text
    assert default_pool(model) == "avg"  # what the tool reads it by unless --pool says

    train = write_texture_classes(tmp_path / "train", 4, seed=0)
    val = write_texture_classes(tmp_path / "val", 2, seed=1)
    tool = _knn_tool()
    out = tmp_path / "acc.json"
    sizes = ["--embed_dim", "32", "--depth", "2", "--num_heads", "2", "--patch_size", "8"]
    args = ["--checkpoint", path, "--train", train, "--val", val, "--input_size", "32",
            "--k", "1", "3", "--num_workers", "0", "--device", "cpu",
            "--amp", "fp32", "--json", str(out)] + sizes  # fmt: skip
    assert tool.main(args) == 0
    ev = KNNEvaluator(train, val, 32)
    with torch.no_grad():
        want = ev(pooled, torch.device("cpu"), "avg", ks=(1, 3), feature_fn=pooled.pooled)
    got = json.loads(out.read_text())
    assert got == pytest.approx(want)
    assert all(0 < got[f"knn_k{k}_top1"] < 100 for k in (1, 3))


def test_a_checkpoint_without_the_final_norm_is_named(tmp_path, caplog):
    from mae_transfer.classification.knn import encoder_for_checkpoint

    enc, paths = save_mae_checkpoints(tmp_path, img_size=32, depth=2)
    tiny = dict(embed_dim=32, depth=2, num_heads=2)
    encoder_for_checkpoint(paths["official"], "vit_base_patch16", 32, **tiny)
    assert "has no final norm" not in caplog.text
    torch.save({k: v for k, v in enc.items() if not k.startswith("norm.")}, tmp_path / "bare.pth")
    encoder_for_checkpoint(str(tmp_path / "bare.pth"), "vit_base_patch16", 32, **tiny)
    assert "has no final norm" in caplog.text


def test_a_checkpoint_without_a_class_token_runs_without_one(tmp_path, caplog):
    from mae_transfer.classification.knn import (
        checkpoint_features,
        default_pool,
        encoder_for_checkpoint,
        extract_features,
    )

    enc, paths = save_mae_checkpoints(tmp_path, img_size=32, depth=2)
    tiny = dict(embed_dim=32, depth=2, num_heads=2)
    assert (
        default_pool(encoder_for_checkpoint(paths["official"], "vit_base_patch16", 32, **tiny))
        == "cls"
    )
    # e.g. a detectron2 backbone's weights: no cls_token. A stand-in token would be random and
    # every patch would attend to it: the encoder runs without one, as the backbone did
    torch.save({k: v for k, v in enc.items() if k != "cls_token"}, tmp_path / "no_cls.pth")
    feats = []
    for seed in (0, 1):  # whatever the random state, the same features
        torch.manual_seed(seed)
        model = encoder_for_checkpoint(str(tmp_path / "no_cls.pth"), "vit_base_patch16", 32, **tiny)
        assert model.num_prefix_tokens == 0 and default_pool(model) == "avg"
        imgs = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
        loader = [(imgs, torch.tensor([0, 1]))]
        feats.append(extract_features(model, loader, torch.device("cpu"), "avg")[0])
    assert torch.equal(feats[0], feats[1]) and "has no class token" in caplog.text
    with pytest.raises(ConfigError, match="no class token; use --pool avg"):
        extract_features(model, loader, torch.device("cpu"), "cls")
    assert checkpoint_features(model, "avg") is None


def test_padding_rows_of_a_gathered_bank_are_never_neighbours():
    """Zero rows (label -1) pad the parts of a gathered bank; with similarities below 0 they
    would be the nearest "neighbours" (and their label no class)."""
    from mae_transfer.classification.knn import knn_correct

    train = torch.tensor([[-1.0, 0.0], [-1.0, 0.1], [0.0, -1.0]])
    labels = torch.tensor([0, 0, 1])
    test, truth = torch.tensor([[1.0, 0.2], [0.1, 1.0]]), torch.tensor([1, 0])
    plain = knn_correct(train, labels, test, truth, 2, ks=(1, 3))
    padded = knn_correct(
        torch.cat([train, torch.zeros(2, 2)]), torch.cat([labels, torch.tensor([-1, -1])]),
        test, truth, 2, ks=(1, 3),
    )  # fmt: skip
    assert padded == plain
