"""Fine-tuning and linear probing: layer-decay groups, the LARS step, the frozen probe, mixup,
exact resume, official-format checkpoints through --eval, several ranks, the command lines."""

from __future__ import annotations

import glob
import json
import math
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import (
    ROOT,
    count_host_reads,
    run_ranks,
    save_mae_checkpoints,
    train_until_killed,
    write_colour_classes,
)
from torch.utils.data import DataLoader

from mae_transfer.checkpoint import CheckpointError
from mae_transfer.classification.config import (
    ConfigError,
    FinetuneConfig,
    LinprobeConfig,
    eval_crop_pct,
    make_config,
    validate,
)
from mae_transfer.classification.model import build_classifier, load_classifier_checkpoint
from mae_transfer.classification.trainer import (
    BEST,
    FinetuneTrainer,
    LinprobeTrainer,
    ValEvaluator,
    evaluate_checkpoint,
    lars_param_groups,
)
from mae_transfer.data import (
    ClassFolderDataset,
    eval_transform,
    find_classes,
    read_good,
    sample_seed,
)
from mae_transfer.engine.config import read_yaml
from mae_transfer.engine.distributed import DistInfo, barrier
from mae_transfer.models import size_of
from mae_transfer.optim import param_groups

TINY = dict(embed_dim=32, depth=2, num_heads=2, patch_size=8)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """3 colour classes: 8 training and 5 validation images each; and tiny MAE checkpoints."""
    root = tmp_path_factory.mktemp("cls")
    torch.manual_seed(0)  # (module fixtures run before the per-test seed: whichever test is first)
    write_colour_classes(root / "data" / "train", 8, seed=0)
    write_colour_classes(root / "data" / "val", 5, seed=1)
    _, ckpts = save_mae_checkpoints(root, img_size=32, patch_size=8, depth=2)
    return {"root": str(root / "data"), **ckpts}


def cfg_of(cls, data, out, **kw):
    values = dict(
        model="vit_base_patch16",
        model_kwargs=TINY,
        input_size=32,
        data_path=data["root"],
        finetune=data["official"],
        batch_size=4,
        accum_iter=1,
        epochs=2,
        warmup_epochs=1,
        num_workers=0,
        device="cpu",
        amp="fp32",
        log_every_iters=1,
        output_dir=str(out),
    )
    values.update(kw)
    cfg = make_config(cls, values)
    validate(cfg)
    return cfg


def _not_json(constant):
    raise ValueError(f"log.jsonl holds {constant}, which is not JSON")


def read_log(out) -> list:
    """The records of log.jsonl, read as strict JSON (NaN / Infinity refused)."""
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line, parse_constant=_not_json) for line in f]


def train(trainer_cls, cfg):
    t = trainer_cls(cfg, CPU, DistInfo())
    t.train()
    t.close()
    return t


# -- the model and its checkpoints ------------------------------------------------------------
def test_pretraining_checkpoint_initialises_the_encoder_with_a_new_head(data):
    model = build_classifier("vit_base_patch16", 3, 32, "avg", **TINY)
    report = load_classifier_checkpoint(model, data["ours"])  # our training form: with decoder
    assert sorted(report.new) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert "norm.weight" in report.dropped and not report.missing and not report.unexpected
    enc = torch.load(data["official"], weights_only=True)["model"]
    assert torch.equal(model.blocks[1].mlp.fc2.weight, enc["blocks.1.mlp.fc2.weight"])
    assert model.head.weight.std() < 1e-4 and torch.all(model.head.bias == 0)  # std 2e-5
    with pytest.raises(CheckpointError, match="no trained head"):
        load_classifier_checkpoint(model, data["official"], need_head=True)


def test_an_official_fine_tuned_checkpoint_gives_identical_logits_through_eval(data, tmp_path):
    """The official fine-tuned model is timm's VisionTransformer (global_pool avg, fc_norm);
    a file in its format evaluates here without conversion, logits and accuracy alike."""
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    torch.manual_seed(3)
    official = TimmViT(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3,
        global_pool="avg",
    ).eval()  # fmt: skip
    with torch.no_grad():
        for p in official.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = str(tmp_path / "mae_finetuned_vit_tiny.pth")
    torch.save({"model": official.state_dict()}, path)
    ours = build_classifier("vit_base_patch16", 3, 32, "avg", **TINY).eval()
    report = load_classifier_checkpoint(ours, path, need_head=True)
    assert not (report.new or report.missing or report.unexpected or report.dropped)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(ours(x), official(x), atol=1e-5)
    cfg = cfg_of(FinetuneConfig, data, tmp_path / "ev", eval=True, resume=path, finetune="")
    metrics = evaluate_checkpoint(cfg, CPU, DistInfo())
    images = ClassFolderDataset(find_classes(data["root"] + "/val"), eval_transform(32))
    x = torch.stack([images[(0, i)][0] for i in range(len(images))])
    y = torch.tensor([images[(0, i)][1] for i in range(len(images))])
    with torch.no_grad():
        expected = 100.0 * (official(x).argmax(1) == y).float().mean().item()
    assert metrics["acc1"] == pytest.approx(expected)
    # as --finetune, a fine-tuned file gives its encoder and fc_norm; the head starts afresh
    t = FinetuneTrainer(
        cfg_of(FinetuneConfig, data, tmp_path / "ft", finetune=path), CPU, DistInfo()
    )
    assert torch.equal(t.model.fc_norm.weight, official.fc_norm.weight)
    assert not torch.equal(t.model.head.weight, official.head.weight)
    assert t.model.head.weight.std() < 1e-4
    t.close()
    two = TimmViT(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=2)
    torch.save({"model": two.state_dict()}, tmp_path / "two.pth")
    cfg = cfg_of(FinetuneConfig, data, tmp_path / "ev", eval=True, resume=str(tmp_path / "two.pth"))
    with pytest.raises(ConfigError, match="3 class folders but the head .* has 2 outputs"):
        evaluate_checkpoint(cfg, CPU, DistInfo())


def test_eval_labels_a_val_folder_with_some_of_the_classes_by_name(data, tmp_path):
    import shutil

    t = train(FinetuneTrainer, cfg_of(FinetuneConfig, data, tmp_path / "ft", epochs=3))
    classes = t.folders[0].classes
    assert torch.load(tmp_path / "ft" / BEST, weights_only=True)["classes"] == classes
    part = tmp_path / "part"
    for name in classes[1:]:  # without the first class: by position, labels would shift by one
        shutil.copytree(os.path.join(data["root"], "val", name), part / "val" / name)
    images = ClassFolderDataset(find_classes(str(part / "val")), eval_transform(32))
    x = torch.stack([images[(0, i)][0] for i in range(len(images))])
    y = torch.tensor([images[(0, i)][1] for i in range(len(images))]) + 1  # the trained labels
    with torch.no_grad():
        hits = t.model.eval()(x).argmax(1) == y
    assert hits.float().mean() > 0.5  # the model has learnt: the two labellings differ
    cfg = cfg_of(FinetuneConfig, {**data, "root": str(part)}, tmp_path / "ev", eval=True,
                 resume=str(tmp_path / "ft" / "checkpoint-last.pth"), finetune="")  # fmt: skip
    assert evaluate_checkpoint(cfg, CPU, DistInfo())["acc1"] == pytest.approx(
        100.0 * hits.float().mean().item()
    )
    os.rename(part / "val" / classes[1], part / "val" / "zebra")
    with pytest.raises(ConfigError, match="1 class folders .* was not trained on .*'zebra'"):
        evaluate_checkpoint(cfg, CPU, DistInfo())


# -- fine-tuning --------------------------------------------------------------------------------
def test_layer_decay_gives_every_block_its_lr_scale_and_no_decay_where_none_is_due(data, tmp_path):
    cfg = cfg_of(FinetuneConfig, data, tmp_path, layer_decay=0.5, weight_decay=0.05)
    t = FinetuneTrainer(cfg, CPU, DistInfo())
    t.iter, t.epoch = 2, 1  # somewhere on the schedule
    t._set_lr()
    scale, decay, lr = {}, {}, {}
    for g in t.optimizer.param_groups:
        for name in g["param_names"]:
            scale[name], decay[name], lr[name] = g["lr_scale"], g["weight_decay"], g["lr"]
    depth = 2  # layer ids: embeddings 0, block i -> i + 1, the rest depth + 1; scale 0.5^(3 - id)
    for name in ("cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"):
        assert scale[name] == 0.5**3, name
    for i in range(depth):
        assert scale[f"blocks.{i}.attn.qkv.weight"] == 0.5 ** (depth - i)
        assert scale[f"blocks.{i}.norm1.weight"] == 0.5 ** (depth - i)
    for name in ("fc_norm.weight", "head.weight", "head.bias"):
        assert scale[name] == 1.0
    assert lr["blocks.0.mlp.fc1.weight"] == pytest.approx(lr["head.weight"] * 0.25)
    assert t.current_lr() == lr["head.weight"]  # what the progress bar and the logs show
    no_decay = [n for n, d in decay.items() if d == 0.0]
    assert set(no_decay) == {n for n in decay if n.endswith(".bias") or "norm" in n} | {
        "cls_token",
        "pos_embed",
    }
    assert decay["head.weight"] == decay["blocks.1.attn.proj.weight"] == 0.05
    assert "norm.weight" not in decay  # pooled: the encoder's final norm is not in the model
    t.close()


@pytest.mark.parametrize("depth", [0, None, -1])
def test_layer_decay_without_a_depth_is_refused(depth):
    """With depth 0 the scales came out growing with the block index: 0.75, 1, 1.33, ..."""
    model = build_classifier("vit_base_patch16", 3, 32, **TINY)
    with pytest.raises(ValueError, match=rf"layer_decay=0.75 needs depth.*got depth={depth}"):
        param_groups(model.named_parameters(), 0.05, layer_decay=0.75, depth=depth)
    scales = [g["lr_scale"] for g in param_groups(model.named_parameters(), 0.05, 0.75, 2)]
    assert max(scales) == 1.0 and min(scales) == 0.75**3
    no_decay = param_groups(model.named_parameters(), 0.05, layer_decay=1.0, depth=depth)
    assert {g["lr_scale"] for g in no_decay} == {1.0}


def test_mixup_and_cutmix_mix_images_and_targets_seeded_by_step(data, tmp_path):
    cfg = cfg_of(FinetuneConfig, data, tmp_path, mixup=0.8, cutmix=0.0, smoothing=0.1)
    t = FinetuneTrainer(cfg, CPU, DistInfo())
    x, y = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 1])
    xm, ym = t.prepare_batch([x.clone(), y])
    assert torch.allclose(ym.sum(1), torch.ones(4))
    lam = ((xm - x.flip(0)) / (x - x.flip(0)))[0, 0, 0, 0].item()  # x_m = lam x + (1-lam) x'
    assert torch.allclose(xm, lam * x + (1 - lam) * x.flip(0), atol=1e-5)
    smooth = F.one_hot(y, 3).float() * 0.9 + 0.1 / 3
    assert torch.allclose(ym, lam * smooth + (1 - lam) * smooth.flip(0), atol=1e-5)
    again = t.prepare_batch([x.clone(), y])
    assert torch.equal(again[0], xm)  # a pure function of (seed, epoch, iteration, rank)
    t.iter = 1
    assert not torch.equal(t.prepare_batch([x.clone(), y])[0], xm)
    t.close()
    cut = FinetuneTrainer(
        cfg_of(FinetuneConfig, data, tmp_path, mixup=0.0, cutmix=1.0), CPU, DistInfo()
    )
    xc, yc = cut.prepare_batch([x.clone(), y])
    from_other = (xc == x.flip(0)) & (xc != x)
    area = from_other.all(dim=1).float().mean(dim=(1, 2))[0].item()  # the pasted box's share
    assert 0 < area < 1
    assert yc[0, y.flip(0)[0]] == pytest.approx(area * 0.9 + 0.1 / 3, abs=0.02)  # lam = box
    cut.close()


def test_finetune_resume_mid_epoch_equals_an_uninterrupted_run(data, tmp_path):
    """RandAugment, random erasing, mixup / cutmix and drop path all draw from seeded streams:
    a run stopped after 3 iterations and resumed ends with the same weights, bitwise (fp32)."""
    kw = dict(epochs=2, drop_path=0.1, save_every_iters=1)
    ref = train(FinetuneTrainer, cfg_of(FinetuneConfig, data, tmp_path / "a", **kw))
    out = tmp_path / "b"
    t = FinetuneTrainer(cfg_of(FinetuneConfig, data, out, **kw), CPU, DistInfo())
    t.sampler.set_epoch(0)
    t.set_train_mode()
    for step, (*tensors, skipped) in enumerate(t.loader):
        t._step(tensors, skipped)
        if step == 2:
            break
    t._flush()
    t.save()
    t.close()
    resumed = train(FinetuneTrainer, cfg_of(FinetuneConfig, data, out, **kw))
    for (name, a), b in zip(ref.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert os.path.isfile(out / BEST)
    best = torch.load(out / BEST, weights_only=False)
    assert best["best_acc1"] == max(r["acc1"] for r in read_log(out) if "acc1" in r)


def test_a_resume_after_an_evaluated_epoch_keeps_its_best_accuracy(data, tmp_path):
    """checkpoint-last.pth is written before the evaluation, so it records the best accuracy
    before it; a run killed later in the next epoch resumes with the best from log.jsonl (a
    stale best would let a worse epoch replace checkpoint-best.pth)."""
    cfg = cfg_of(FinetuneConfig, data, tmp_path, epochs=2)
    train_until_killed(FinetuneTrainer(cfg, CPU, DistInfo()), 1, 1)
    acc = [r["acc1"] for r in read_log(tmp_path) if "acc1" in r]
    assert len(acc) == 1 and torch.load(tmp_path / BEST, weights_only=True)["best_acc1"] == acc[0]
    # 3 classes: no top-5, written null (it was NaN, which only Python reads back)
    assert [r["acc5"] for r in read_log(tmp_path) if "acc5" in r] == [None]
    assert torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)["best_acc1"] == -1
    resumed = FinetuneTrainer(cfg, CPU, DistInfo())
    assert (resumed.epoch, resumed.best_acc1) == (1, acc[0])
    resumed.close()


def test_a_resume_on_other_class_folders_is_refused(data, tmp_path):
    """A class folder renamed (blue -> zblue) reorders the sorted classes: the resumed run
    trained the head on permuted labels without a word (top-1 0 after 82)."""
    from mae_transfer.engine.config import ConfigError

    cfg = cfg_of(FinetuneConfig, data, tmp_path / "run", epochs=2)
    train_until_killed(FinetuneTrainer(cfg, CPU, DistInfo()), 1, 0)
    moved = tmp_path / "moved"
    shutil.copytree(data["root"], moved)
    first = sorted(os.listdir(moved / "train"))[0]
    for split in ("train", "val"):
        os.rename(moved / split / first, moved / split / ("z" + first))
    with pytest.raises(ConfigError, match="would be permuted") as e:
        FinetuneTrainer(
            cfg_of(FinetuneConfig, {**data, "root": str(moved)}, tmp_path / "run"), CPU, DistInfo()
        )
    assert f"{first} -> " in str(e.value)


def test_top1_is_ranked_on_fp32_logits_under_bf16_autocast():
    """Logits 12.005 and 12.025 are both 12.0 in bf16: the head's output under autocast left
    top-1 to the tie order of topk (the official evaluation runs in fp16, which keeps them)."""
    from mae_transfer.classification.trainer import ValEvaluator

    class Stub(torch.nn.Module):
        num_classes = 3

        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(4, 3)
            torch.nn.init.zeros_(self.head.weight)
            self.head.bias.data = torch.tensor([11.0, 12.005, 12.025])

        def pooled(self, x):
            return x.mean(dim=(2, 3)).repeat(1, 2)[:, :4]

        def forward(self, x):
            return self.head(self.pooled(x))

    class One(torch.utils.data.Dataset):  # one image of class 2 (keys as the sampler's)
        def __len__(self):
            return 1

        def __getitem__(self, key):
            return torch.zeros(3, 4, 4), 2, 0

    metrics = ValEvaluator(One(), DistInfo(), 1, 0)(Stub(), CPU, torch.bfloat16)
    assert metrics["acc1"] == 100.0


# -- linear probing -----------------------------------------------------------------------------
def test_lars_step_matches_a_hand_computation():
    from timm.optim import Lars

    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))  # |w| = 5
    b = torch.nn.Parameter(torch.tensor([1.0]))
    model = torch.nn.Linear(2, 1)
    model.weight, model.bias = w, b
    opt = Lars(lars_param_groups(model, 0.0), lr=0.5, momentum=0.9, trust_coeff=0.001, eps=0.0)
    g1, g2 = torch.tensor([[0.6, 0.8]]), torch.tensor([[0.0, 2.0]])  # |g| = 1, 2
    w_ref, mu = w.detach().clone(), torch.zeros(1, 2)
    b_ref, mu_b = b.detach().clone(), torch.zeros(1)
    for g, gb in ((g1, torch.tensor([0.3])), (g2, torch.tensor([-0.2]))):
        w.grad, b.grad = g.clone(), gb.clone()
        q = 0.001 * w_ref.norm() / g.norm()  # the trust ratio of the official LARS
        mu = 0.9 * mu + q * g
        w_ref = w_ref - 0.5 * mu
        mu_b = 0.9 * mu_b + gb  # 1-d: no adaptation
        b_ref = b_ref - 0.5 * mu_b
        opt.step()
        assert torch.allclose(w.detach(), w_ref, atol=1e-7)
        assert torch.allclose(b.detach(), b_ref, atol=1e-7)


def test_the_probe_trains_only_its_head_with_the_encoder_frozen_in_eval_mode(data, tmp_path):
    cfg = cfg_of(LinprobeConfig, data, tmp_path, finetune=data["ours"], epochs=1)
    t = LinprobeTrainer(cfg, CPU, DistInfo())
    bn = t.model.head[0]
    assert isinstance(bn, torch.nn.BatchNorm1d) and bn.weight is None and bn.bias is None
    assert bn.eps == 1e-6 and t.model.global_pool == "cls"
    trainable = [n for n, p in t.model.named_parameters() if p.requires_grad]
    assert trainable == ["head.1.weight", "head.1.bias"]
    assert 0.006 < t.model.head[1].weight.std() < 0.014  # trunc_normal(std 0.01), as officially
    encoder = {n: p.detach().clone() for n, p in t.model.named_parameters() if "head" not in n}
    modes = []
    t.model.blocks[0].register_forward_hook(lambda m, i, o: modes.append(m.training))
    stats_before = bn.running_mean.clone()
    t.train()
    t.close()
    assert modes and not any(modes)  # every training forward ran the encoder in eval mode
    assert not torch.equal(bn.running_mean, stats_before)  # the probe's BN did train
    for n, p in t.model.named_parameters():
        if "head" not in n:
            assert torch.equal(p, encoder[n]) and p.grad is None, n


def test_probe_updates_wait_for_no_host_sync_and_a_bad_gradient_still_stops(data, tmp_path):
    """LARS cannot read GradScaler's finiteness flag on the device, so GradScaler.step would
    read it on the host every update; the probe steps directly and the flag is read at the
    log step, where a non-finite gradient stops the run."""
    from mae_transfer.engine.trainer import NonFiniteLossError

    cfg = cfg_of(LinprobeConfig, data, tmp_path / "a", finetune=data["ours"], epochs=1)
    t = LinprobeTrainer(cfg, CPU, DistInfo())
    assert t._direct_step
    reads, real_item, real_update = [], torch.Tensor.item, t._update

    def counted(x):
        reads[-1] += 1
        return real_item(x)

    def update():
        reads.append(0)
        torch.Tensor.item = counted
        try:
            real_update()
        finally:
            torch.Tensor.item = real_item

    t._update = update
    t.train()
    t.close()
    assert len(reads) == 6 and sum(reads) == 0  # 6 updates, not one value read on the host
    cfg = cfg_of(LinprobeConfig, data, tmp_path / "b", finetune=data["ours"], epochs=1)
    t = LinprobeTrainer(cfg, CPU, DistInfo())
    t.model.head[1].weight.register_hook(lambda g: g * float("nan"))
    with pytest.raises(NonFiniteLossError, match="gradient was not finite .the update was applied"):
        t.train()
    t.close()
    assert not os.path.isfile(tmp_path / "b" / "checkpoint-last.pth")


@pytest.mark.parametrize(
    "cls, kw",
    [
        (FinetuneConfig, dict(amp="bf16", clip_grad=1.0, accum_iter=2)),  # mixup, drop path
        (LinprobeConfig, dict(finetune="ours")),
        (LinprobeConfig, dict(finetune="ours", cache_features=True)),
    ],
)
def test_classification_steps_read_nothing_back_to_the_host(data, tmp_path, monkeypatch, cls, kw):
    kw = {**kw, "finetune": data[kw["finetune"]]} if "finetune" in kw else kw
    cfg = cfg_of(cls, data, tmp_path, epochs=1, log_every_iters=1000, **kw)
    t = (FinetuneTrainer if cls is FinetuneConfig else LinprobeTrainer)(cfg, CPU, DistInfo())
    reads = count_host_reads(t, monkeypatch)
    t.train()
    t.close()
    assert reads == [6]  # 6 steps of 4 images, not one value read on the host


def test_cached_features_are_the_frozen_encoder_s_in_index_order(data, tmp_path):
    cfg = cfg_of(LinprobeConfig, data, tmp_path, cache_features=True, epochs=2)
    t = LinprobeTrainer(cfg, CPU, DistInfo())
    images = ClassFolderDataset(find_classes(data["root"] + "/train"), eval_transform(32))
    x = torch.stack([images[(0, i)][0] for i in (0, 5, 17)])
    with torch.no_grad():
        expected = t.model.eval().pooled(x)
    assert torch.allclose(t.train_dataset.all_features()[[0, 5, 17]], expected, atol=1e-6)
    t.train()
    t.close()
    assert os.path.isfile(tmp_path / BEST)


def test_cached_features_of_a_resumed_probe_come_from_the_loaded_encoder(data, tmp_path):
    cfg = cfg_of(LinprobeConfig, data, tmp_path, cache_features=True, epochs=1)
    first = train(LinprobeTrainer, cfg)
    again = LinprobeTrainer(
        cfg_of(LinprobeConfig, data, tmp_path / "b", cache_features=True, epochs=2, finetune="",
               resume=str(tmp_path / "checkpoint-last.pth")),
        CPU,
        DistInfo(),
    )  # fmt: skip
    assert again.epoch == 1
    assert torch.equal(again.train_dataset.all_features(), first.train_dataset.all_features())
    again.close()


def test_cached_shards_of_a_crashed_run_with_another_process_count_are_removed(data, tmp_path):
    """A crash leaves the cached shards in output_dir; resumed with as many processes they are
    written anew and removed at the end, with another count they stayed (GBs each)."""
    cfg = cfg_of(LinprobeConfig, data, tmp_path, cache_features=True, epochs=1)
    for what in ("training", "validation"):
        torch.save({}, tmp_path / f"features-{what}.1-of-2.pth")  # a 2-process run's, crashed
    train(LinprobeTrainer, cfg)
    assert not glob.glob(str(tmp_path / "features-*"))


def test_a_probe_extracts_no_features_for_an_output_dir_in_use(data, tmp_path, monkeypatch):
    """The folder of a live run was found in use only after the whole training set's features
    were extracted (hours on ImageNet), and their shard written into that run's folder."""
    import socket

    from mae_transfer.engine import state
    from mae_transfer.engine.config import ConfigError

    out = tmp_path / "in_use"
    os.makedirs(out)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    extracted = []
    monkeypatch.setattr(LinprobeTrainer, "_extract", lambda self, *a: extracted.append(a))
    try:
        record = {"host": socket.gethostname(), "pid": alive.pid, "id": "x"}
        record.update(pidns=state._pid_namespace(), start=state._process_start(alive.pid))
        (out / state.OWNER_FILE).write_text(json.dumps(record))
        with pytest.raises(ConfigError, match="in use by another run"):
            LinprobeTrainer(cfg_of(LinprobeConfig, data, out, cache_features=True), CPU, DistInfo())
    finally:
        alive.kill()
        alive.wait()
    assert not extracted and os.listdir(out) == [state.OWNER_FILE]


def test_clip_grad_bounds_the_gradient_the_optimizer_steps_with(data, tmp_path):
    norms = {}
    for clip in (None, 1e-3):
        cfg = cfg_of(FinetuneConfig, data, tmp_path / str(clip), epochs=1, clip_grad=clip)
        t = FinetuneTrainer(cfg, CPU, DistInfo())
        seen, step = [], t.optimizer.step

        def record(*args, _step=step, _seen=seen, _t=t, **kwargs):
            grads = [p.grad for p in _t.model.parameters() if p.grad is not None]
            _seen.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
            return _step(*args, **kwargs)

        t.optimizer.step = record
        t.train()
        t.close()
        norms[clip] = seen
    assert len(norms[None]) == len(norms[1e-3]) == 6  # 24 images / batch 4
    assert min(norms[None]) > 1e-2  # unclipped gradients are far above the bound
    assert max(norms[1e-3]) <= 1e-3 * (1 + 1e-4)


def test_unreadable_class_folder_images_are_skipped_counted_and_replaced(data, tmp_path):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(data["root"], root)
    folder = find_classes(str(root / "train"))
    bad = folder.samples[7][0]  # the last image of the first class
    with open(bad, "wb") as f:
        f.write(b"not an image")
    images = ClassFolderDataset(folder, eval_transform(32))
    used, _, tried = read_good(images.paths, 7, set(), seed=sample_seed(0, 0, 7))
    _, label, skipped = images[(0, 7)]
    assert skipped == tried == 1 and used != 7 and label == folder.samples[used][1]
    cfg = cfg_of(FinetuneConfig, {**data, "root": str(root)}, tmp_path / "run", epochs=2)
    t = train(FinetuneTrainer, cfg)
    assert t.skipped_images == 2  # once per epoch, and training went on


def test_an_unreadable_validation_image_is_left_out_not_counted_twice(data, tmp_path):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(data["root"], root)
    folder = find_classes(str(root / "val"))
    images = ClassFolderDataset(folder, eval_transform(32))
    model = build_classifier("vit_base_patch16", 3, 32, "avg", **TINY).eval()
    with torch.no_grad():
        pred = {i: int(model(images[(0, i)][0][None]).argmax()) for i in range(len(images))}
    with open(folder.samples[4][0], "wb") as f:  # the last image of the first class
        f.write(b"not an image")
    good = [i for i in range(len(images)) if i != 4]
    expected = 100.0 * sum(pred[i] == folder.samples[i][1] for i in good) / len(good)
    metrics = ValEvaluator(ClassFolderDataset(folder, eval_transform(32)), DistInfo(), 4, 0)(
        model, CPU, None
    )
    assert metrics["val_skipped_images"] == 1
    assert metrics["acc1"] == pytest.approx(expected)


def test_a_cpu_run_on_a_gpu_node_pins_no_batches(data, tmp_path, monkeypatch):
    """The validation loaders pinned whenever a GPU existed, not when the run used one: pinning
    opens a CUDA context, so a --device cpu run on a GPU node took memory on GPU 0."""
    pins, init = [], DataLoader.__init__

    def recording(self, *args, **kwargs):
        pins.append(kwargs.get("pin_memory", False))
        init(self, *args, **kwargs)

    monkeypatch.setattr(DataLoader, "__init__", recording)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = cfg_of(LinprobeConfig, data, tmp_path / "probe", cache_features=True)
    LinprobeTrainer(cfg, CPU, DistInfo()).close()  # extraction, training, validation
    path = str(tmp_path / "classifier.pth")
    model = build_classifier("vit_base_patch16", 3, 32, "avg", **TINY)
    torch.save({"model": model.state_dict()}, path)
    cfg = cfg_of(FinetuneConfig, data, tmp_path / "ev", eval=True, resume=path, finetune="")
    evaluate_checkpoint(cfg, CPU, DistInfo())  # --eval's own validation loader
    assert len(pins) >= 5 and not any(pins), pins


def test_cached_probe_features_leave_an_unreadable_image_out_as_images_do(data, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(data["root"], root)
    for split in ("train", "val"):  # the last image of the first class
        with open(find_classes(str(root / split)).samples[4][0], "wb") as f:
            f.write(b"not an image")
    metrics, trainers = {}, {}
    for cache in (False, True):
        cfg = cfg_of(LinprobeConfig, {**data, "root": str(root)}, tmp_path / str(cache),
                     cache_features=cache)  # fmt: skip
        trainers[cache] = t = LinprobeTrainer(cfg, CPU, DistInfo())
        metrics[cache] = t.evaluate()
    # the image standing in for the unreadable one: left out of the validation, counted
    assert metrics[True]["val_skipped_images"] == metrics[False]["val_skipped_images"] == 1
    assert metrics[True]["acc1"] == pytest.approx(metrics[False]["acc1"])
    assert metrics[True]["val_loss"] == pytest.approx(metrics[False]["val_loss"], rel=1e-5)
    # and in training: trained on, counted each epoch, as without the cache
    cached = trainers[True].train_dataset
    assert [cached[(0, i)][2] for i in range(len(cached))].count(1) == 1
    for t in trainers.values():
        t.train()
        t.close()
    assert trainers[True].skipped_images == trainers[False].skipped_images


def test_the_probe_augments_with_crop_and_flip_only():
    from PIL import Image
    from torchvision import transforms as T

    from mae_transfer.classification.data import linprobe_transform
    from mae_transfer.data import IMAGENET_MEAN, IMAGENET_STD

    t = linprobe_transform(32)
    kinds = [type(op) for op in t.transforms]
    assert kinds == [T.RandomResizedCrop, T.RandomHorizontalFlip, T.ToTensor, T.Normalize]
    crop = t.transforms[0]
    assert crop.scale == (0.08, 1.0) and crop.interpolation == T.InterpolationMode.BICUBIC
    flat = Image.new("RGB", (48, 40), (200, 100, 50))  # no colour change: stays one colour
    expected = (torch.tensor([200, 100, 50]) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(
        IMAGENET_STD
    )
    for seed in range(3):
        torch.manual_seed(seed)
        x = t(flat)
        assert x.shape == (3, 32, 32)
        assert torch.allclose(x, expected[:, None, None].expand_as(x), atol=1e-5)


def test_evaluation_crops_as_the_official_above_224_px():
    assert eval_crop_pct(make_config(FinetuneConfig, {"input_size": 224})) == 224 / 256
    assert eval_crop_pct(make_config(FinetuneConfig, {"input_size": 448})) == 1.0
    assert (
        eval_crop_pct(make_config(FinetuneConfig, {"input_size": 448, "eval_crop_pct": 0.9})) == 0.9
    )


def test_an_epoch_shorter_than_the_accumulation_is_refused(data, tmp_path, caplog):
    # 24 images / batch 4 = 6 iterations: accum_iter 8 would never update (it trained nothing)
    with pytest.raises(ConfigError, match="6 iterations .* fewer than accum_iter 8"):
        FinetuneTrainer(cfg_of(FinetuneConfig, data, tmp_path, accum_iter=8), CPU, DistInfo())
    FinetuneTrainer(cfg_of(FinetuneConfig, data, tmp_path / "b", accum_iter=4), CPU, DistInfo())
    assert "the last 2 batches of every epoch are computed but never applied" in caplog.text


def test_resume_takes_only_a_checkpoint_of_the_same_protocol_model_and_start(data, tmp_path):
    import shutil

    probe = train(LinprobeTrainer, cfg_of(LinprobeConfig, data, tmp_path / "lp", epochs=1))
    assert (
        torch.load(tmp_path / "lp" / "checkpoint-last.pth", weights_only=True)["protocol"]
        == "linear probing"
    )
    # fine-tuning in the probe's output_dir: auto-resume finds the probe's checkpoint
    with pytest.raises(ConfigError, match="is a linear probing checkpoint, not fine-tuning: it"):
        FinetuneTrainer(cfg_of(FinetuneConfig, data, tmp_path / "lp"), CPU, DistInfo())
    with pytest.raises(ConfigError) as e:  # the way out it names is a flag the tools take
        FinetuneTrainer(cfg_of(FinetuneConfig, data, tmp_path / "lp"), CPU, DistInfo())
    from mae_transfer.classification.config import load_config

    flag = re.search(r"\((--\S+) would start afresh", str(e.value)).group(1)
    assert not load_config(FinetuneConfig, [flag, "--data_path", "d"], "t")[0].auto_resume
    # a pretraining file (no protocol recorded, other weights) given as --resume
    with pytest.raises(ConfigError, match="does not hold this run's model .* are --finetune"):
        FinetuneTrainer(
            cfg_of(FinetuneConfig, data, tmp_path / "ft", resume=data["ours"]), CPU, DistInfo()
        )
    # a fine-tuning run found in output_dir, started from other weights
    first = cfg_of(FinetuneConfig, data, tmp_path / "ft", epochs=1)
    train(FinetuneTrainer, first)
    other = tmp_path / "other.pth"
    shutil.copy(data["official"], other)
    with pytest.raises(ConfigError, match="holds a run .* with other settings: finetune '.*"):
        FinetuneTrainer(cfg_of(FinetuneConfig, data, tmp_path / "ft", finetune=str(other)),
                        CPU, DistInfo())  # fmt: skip
    again = FinetuneTrainer(cfg_of(FinetuneConfig, data, tmp_path / "ft"), CPU, DistInfo())
    assert again.epoch == 1  # the same start: it continues
    again.close()
    probe.close()


def _two_rank_eval_and_cache(info, data, out):
    cfg = cfg_of(LinprobeConfig, data, out, cache_features=True, batch_size=3, epochs=1)
    t = LinprobeTrainer(cfg, CPU, info)
    feats = t.train_dataset.all_features()
    acc = ValEvaluator(t.val.dataset, info, 2, 0)(t.model, CPU, None)
    one = ClassFolderDataset(t.folders[1], eval_transform(32), max_images=1)
    assert t._extract(one, "one image").all_features().shape == (1, 32)  # rank 1 has none
    if info.enabled:  # every process maps the shards of all (one copy per node in the cache)
        with open("/proc/self/maps") as f:
            maps = f.read()
        for what in ("training", "validation"):
            assert all(f"features-{what}.{r}-of-2.pth" in maps for r in range(2))
        t.train()  # the files go when training is over (ends with a barrier)
        barrier(info)
        assert not [n for n in os.listdir(out) if n.startswith("features-")]
    t.close()
    return feats, acc


def test_two_ranks_see_the_same_features_and_accuracy_as_one(data, tmp_path):
    one_feats, one_acc = _two_rank_eval_and_cache(DistInfo(), data, tmp_path / "one")
    results = run_ranks(_two_rank_eval_and_cache, data, tmp_path / "two")
    for rank, (status, value) in results.items():
        assert status == "ok", value
        feats, acc = value
        assert torch.allclose(feats, one_feats, atol=1e-5), rank
        assert acc["acc1"] == pytest.approx(one_acc["acc1"])
        assert acc["val_loss"] == pytest.approx(one_acc["val_loss"], rel=1e-5)


def _probe_with_a_private_output_dir(info, data, out):
    cfg = cfg_of(LinprobeConfig, data, out / f"node{info.rank}", cache_features=True)
    LinprobeTrainer(cfg, CPU, info)


def test_cached_features_need_an_output_dir_every_process_can_read(data, tmp_path):
    results = run_ranks(_probe_with_a_private_output_dir, data, tmp_path)
    for rank, (status, value) in results.items():  # both stop, neither waits for the other
        assert status == "error" and "storage every node can read" in value, (rank, value)


# -- configuration and command lines ----------------------------------------------------------
def _finetune_on_ranks(info, data, out, batch):
    """A fine-tuning run without the batch-level randomness (mixup pairs images within a
    rank's batch, drop path draws per rank): what is left must not depend on the ranks."""
    values = dict(batch_size=batch, mixup=0.0, cutmix=0.0, drop_path=0.0, epochs=2)
    t = FinetuneTrainer(cfg_of(FinetuneConfig, data, out, **values), CPU, info)
    t.train()
    t.close()
    return {k: v.numpy().copy() for k, v in t.model.state_dict().items()}  # no shared memory


def test_two_process_fine_tuning_equals_one_process(data, tmp_path):
    one = _finetune_on_ranks(DistInfo(), data, tmp_path / "one", 4)
    results = run_ranks(_finetune_on_ranks, data, tmp_path / "two", 2)  # 2 ranks x 2 = 4
    for rank, (status, value) in results.items():
        assert status == "ok", value
        for k, v in one.items():
            assert np.allclose(v, value[k], rtol=1e-4, atol=1e-6), (rank, k)
    start = torch.load(data["official"], weights_only=True)["model"]["blocks.0.attn.qkv.weight"]
    assert not np.array_equal(one["blocks.0.attn.qkv.weight"], start.numpy())  # it did train


def _probe_on_ranks(info, data, out):
    t = LinprobeTrainer(
        cfg_of(LinprobeConfig, data, out, finetune=data["ours"], epochs=1), CPU, info
    )
    t.train()
    t.close()
    bn = t.model.head[0]
    return bn.running_mean.numpy().copy(), bn.running_var.numpy().copy()


def test_every_rank_evaluates_the_probe_with_rank_0_s_batchnorm_statistics(data, tmp_path):
    """Each rank's BatchNorm statistics move with its own last batch; the accuracy of rank 0's
    saved model is only what was measured if every rank evaluated with rank 0's statistics."""
    results = run_ranks(_probe_on_ranks, data, tmp_path)
    assert all(status == "ok" for status, _ in results.values()), results
    (mean0, var0), (mean1, var1) = results[0][1], results[1][1]
    assert np.array_equal(mean0, mean1) and np.array_equal(var0, var1)
    assert not np.allclose(mean0, 0)  # the statistics did move


def test_classifiers_are_checked_as_the_trainers_build_them(data):
    ok = dict(data_path=data["root"], finetune=data["official"], model="mae_vit_base_patch16")
    for kwargs in ({"use_checkpoint": True}, {"qkv_bias": False}, {"drop_path_rate": 0.2}):
        validate(make_config(FinetuneConfig, {**ok, "model_kwargs": kwargs}))  # encoder args
    for cls in (FinetuneConfig, LinprobeConfig):
        with pytest.raises(ConfigError, match="cannot be built .* 'decoder_depth'"):
            validate(make_config(cls, {**ok, "model_kwargs": {"decoder_depth": 2}}))


def test_finetune_takes_a_url_and_eval_a_resume_url(data, tmp_path, fake_download):
    """--finetune URL: checked as a path would be, downloaded once into torch hub's cache and
    loaded with the report; --resume URL only with --eval (a training resumes its own state
    from a file of its run, and would pass over a URL it cannot find)."""
    served, fetched = fake_download
    url = "https://example.invalid/mae/mae_pretrain_vit_tiny.pth"
    served[url] = data["official"]
    t = FinetuneTrainer(cfg_of(FinetuneConfig, data, tmp_path / "a", finetune=url), CPU, DistInfo())
    t.close()
    assert fetched == [url] and t.load_report.ok and t.load_report.source == url
    with pytest.raises(ConfigError, match="a training resumes from a local file"):
        cfg_of(FinetuneConfig, data, tmp_path / "b", resume=url)
    cfg_of(FinetuneConfig, data, tmp_path / "c", resume=url, eval=True)  # validates


def test_bad_values_are_all_named_before_anything_starts(data, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")
    values = dict(data_path=data["root"], layer_decay=1.5, mixup=-1, batch_size=3, aa="bogus-m9")
    values.update(color_jitter=-1, output_dir=str(afile / "sub"), log_dir=str(afile))
    with pytest.raises(ConfigError) as e:
        validate(make_config(FinetuneConfig, values))
    for text in ("layer_decay must be in (0, 1]", "mixup must be >= 0", "batch_size must be even"):
        assert text in str(e.value)
    # each found late before (a traceback after the model was built or the evaluation ran)
    assert "color_jitter must be >= 0 (0 = off), got -1" in str(e.value)
    assert f"output_dir '{afile}/sub' cannot be made: {afile} is a file" in str(e.value)
    assert f"log_dir '{afile}' is a file, not a directory" in str(e.value)
    assert "aa 'bogus-m9' is not a timm augmentation policy" in str(e.value)
    for policy in ("rand-m9-mstd0.5-inc1", "augmix-m5-w4-d2", "v0", "original"):
        validate(make_config(FinetuneConfig, dict(data_path=data["root"], aa=policy)))
    with pytest.raises(ConfigError, match="needs the pretrained encoder: --finetune"):
        validate(make_config(LinprobeConfig, dict(data_path=data["root"])))


def test_command_lines_train_evaluate_and_reject_bad_values(data, tmp_path):
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text(
        "model: vit_base_patch16\nmodel_kwargs: {embed_dim: 32, depth: 2, num_heads: 2, "
        "patch_size: 8}\ninput_size: 32\nbatch_size: 4\naccum_iter: 1\nepochs: 1\n"
        "warmup_epochs: 0\nnum_workers: 0\ndevice: cpu\namp: fp32\n"
    )
    common = ["--config", str(tiny), "--data_path", data["root"], "--finetune", data["official"]]

    def cli(tool, *args):
        return subprocess.run(
            [sys.executable, os.path.join(ROOT, "tools", tool), *common, *args],
            capture_output=True,
            text=True,
            timeout=300,
        )

    ft = cli("finetune.py", "--output_dir", str(tmp_path / "ft"))
    assert ft.returncode == 0, ft.stderr[-2000:]
    ev = cli("finetune.py", "--eval", "--resume", str(tmp_path / "ft" / BEST), "--output_dir",
             str(tmp_path / "ev"))  # fmt: skip
    assert ev.returncode == 0 and "top-1" in ev.stdout, ev.stderr[-2000:]
    last_acc = [r["acc1"] for r in read_log(tmp_path / "ft") if "acc1" in r][-1]
    with open(tmp_path / "ev" / "eval.json") as f:
        record = json.load(f)
    assert record["acc1"] == pytest.approx(last_acc) and record["input_size"] == [32, 32]
    ev = cli("finetune.py", "--eval", "--resume", str(tmp_path / "ft" / BEST), "--input_size",
             "48", "--output_dir", str(tmp_path / "ev48"))  # fmt: skip
    assert ev.returncode == 0, ev.stderr[-2000:]
    assert "was trained at input_size 32x32, evaluated here at 48x48" in ev.stdout + ev.stderr
    lp = cli("linprobe.py", "--cache_features", "--output_dir", str(tmp_path / "lp"))
    assert lp.returncode == 0, lp.stderr[-2000:]
    # the extraction (hours for ImageNet on a CPU) shows its progress, as training does
    assert "training features: 100%" in lp.stderr and "validation features: 100%" in lp.stderr
    assert os.path.isfile(tmp_path / "lp" / BEST)
    bad = cli("finetune.py", "--layer_decay", "2", "--output_dir", str(tmp_path / "bad"))
    assert bad.returncode == 2 and "layer_decay must be in (0, 1]" in bad.stderr
    assert not os.path.exists(tmp_path / "bad")


def test_the_shipped_configs_build_and_validate(data):
    for protocol, cls in (("finetune", FinetuneConfig), ("linprobe", LinprobeConfig)):
        # every file of the folder (one added later too), the three sizes among them
        paths = sorted(glob.glob(os.path.join(ROOT, "configs", protocol, "*.yaml")))
        names = {os.path.basename(path) for path in paths}
        assert {f"vit_{size}_in1k.yaml" for size in ("base", "large", "huge")} <= names
        for path in paths:
            values = read_yaml(path)
            cfg = make_config(cls, {**values, "data_path": data["root"], "finetune": data["ours"]})
            validate(cfg)
            assert cfg.batch_size * cfg.accum_iter * 8 == (
                1024 if protocol == "finetune" else 16384
            )
            assert os.path.basename(path).startswith(f"vit_{size_of(cfg.model)}_")  # its size


def test_the_probe_refuses_weights_that_leave_part_of_its_frozen_encoder_random(data, tmp_path):
    state = torch.load(data["official"], weights_only=True)["model"]
    paths = {}
    for drop, match in (
        ("norm.", "norm.bias, norm.weight; .*--global_pool avg"),  # an avg fine-tuned file's
        ("cls_token", "cls_token"),  # e.g. a detection backbone's
    ):
        paths[drop] = path = str(tmp_path / f"without_{drop.strip('.')}.pth")
        torch.save({"model": {k: v for k, v in state.items() if not k.startswith(drop)}}, path)
        cfg = cfg_of(LinprobeConfig, data, tmp_path / "p", finetune=path, global_pool="cls")
        with pytest.raises(CheckpointError, match=match):
            LinprobeTrainer(cfg, CPU, DistInfo())
    # weights of another shape are not loaded either: an MLP twice as wide stays random
    cfg = cfg_of(LinprobeConfig, data, tmp_path / "m", model_kwargs={**TINY, "mlp_ratio": 2.0})
    with pytest.raises(CheckpointError, match="blocks.0.mlp.fc1.bias"):
        LinprobeTrainer(cfg, CPU, DistInfo())
    # with avg pooling the probe reads a fresh fc_norm (as the official probe does), not norm
    cfg = cfg_of(LinprobeConfig, data, tmp_path / "p", finetune=paths["norm."], global_pool="avg")
    LinprobeTrainer(cfg, CPU, DistInfo()).close()
    with pytest.raises(ConfigError, match="batch_size must be >= 2 for linear probing"):
        cfg_of(LinprobeConfig, data, tmp_path / "p3", batch_size=1)
    # fine-tuning too: a depth-2 checkpoint left blocks 2 and 3 of a depth-4 model random,
    # with a warning only (the official main_finetune.py asserts)
    cfg = cfg_of(FinetuneConfig, data, tmp_path / "f", model_kwargs={**TINY, "depth": 4})
    with pytest.raises(CheckpointError, match=r"does not fill the encoder \(24 tensors.*blocks.2"):
        FinetuneTrainer(cfg, CPU, DistInfo())


def test_evaluation_edge_cases_are_named(data, tmp_path, caplog):
    from types import SimpleNamespace

    from mae_transfer.classification.data import class_folders
    from mae_transfer.classification.main import _finish

    t = FinetuneTrainer(cfg_of(FinetuneConfig, data, tmp_path / "a", finetune=""), CPU, DistInfo())
    assert "random initialisation" in caplog.text
    metrics = t.evaluate()
    images = ClassFolderDataset(t.folders[1], eval_transform(32, eval_crop_pct(t.cfg)))
    x = torch.stack([images[(0, i)][0] for i in range(len(images))])
    y = torch.tensor([images[(0, i)][1] for i in range(len(images))])
    with torch.no_grad():
        expected = 100.0 * (t.model.eval()(x).argmax(1) == y).float().mean().item()
    t.close()
    assert 0 <= metrics["acc1"] <= 100 and math.isnan(metrics["acc5"])  # 3 classes: no top-5
    assert metrics["acc1"] == pytest.approx(expected)
    # ImageNet's val/ as distributed: files directly in it, no class folders
    flat = tmp_path / "flat"
    shutil.copytree(os.path.join(data["root"], "train"), flat / "train")
    for i, f in enumerate(sorted((flat / "train" / "red").iterdir())[:2]):
        (flat / "val").mkdir(exist_ok=True)
        shutil.copy(f, flat / "val" / f"{i}.png")
    with pytest.raises(ConfigError, match="sort them into one folder per class"):
        class_folders(make_config(FinetuneConfig, {"data_path": str(flat)}))
    # --eval of a pretraining checkpoint: refused first, not read as a classifier
    caplog.clear()
    values = {"data_path": data["root"], "eval": True, "resume": data["official"]}
    cfg = make_config(FinetuneConfig, {**values, "model_kwargs": TINY})
    refused = pytest.raises(CheckpointError, match="no classification head: --eval needs")
    with caplog.at_level("INFO"), refused:  # (INFO: what it would log next for a classifier)
        evaluate_checkpoint(cfg, CPU, DistInfo())
    assert "evaluating it so" not in caplog.text and "was trained at input_size" not in caplog.text
    # --nb_classes other than its head's: named (it said the file had no trained head)
    tuned = str(tmp_path / "tuned.pth")
    torch.save({"model": build_classifier("vit_base_patch16", 3, 32, "avg", **TINY).state_dict()},
               tuned)  # fmt: skip
    cfg = make_config(FinetuneConfig, {**values, "resume": tuned, "model_kwargs": TINY})
    cfg.nb_classes = 5
    with pytest.raises(ConfigError, match="nb_classes 5, but the head of .* has 3 outputs"):
        evaluate_checkpoint(cfg, CPU, DistInfo())
    # resumed into another output_dir: the best copy stayed beside the resumed file
    cfg = SimpleNamespace(output_dir=str(tmp_path / "b"), resume="/runs/a/checkpoint-last.pth")
    with caplog.at_level("INFO", logger="classification"):
        _finish(SimpleNamespace(cfg=cfg, best_acc1=50.0))
    assert "reached before --resume, see /runs/a/checkpoint-best.pth" in caplog.text


def test_train_and_val_naming_different_classes_are_refused(tmp_path):
    """Labels are class indices in sorted order: one class missing from val/ would shift them."""
    from mae_transfer.classification.data import class_folders

    write_colour_classes(tmp_path / "train", 1, seed=0)
    write_colour_classes(tmp_path / "val", 1, seed=1)
    shutil.rmtree(tmp_path / "val" / "blue")
    cfg = make_config(FinetuneConfig, {"data_path": str(tmp_path)})
    with pytest.raises(ConfigError, match="name different classes .*: both need the same class"):
        class_folders(cfg)
    cfg.eval = True  # evaluating: val/ alone, labelled by the checkpoint's class names
    assert class_folders(cfg)[0] is None and class_folders(cfg)[1].classes == ["green", "red"]


def test_the_official_scripts_flags_are_understood():
    """Their command lines (FINETUNE.md, LINPROBE.md) use --cls_token and --dist_eval."""
    from mae_transfer.classification.config import load_config

    def pool(cls, *flags):
        return load_config(cls, ["--data_path", "d", *flags], "t")[0].global_pool

    assert pool(LinprobeConfig) == "cls" and pool(FinetuneConfig) == "avg"
    assert pool(FinetuneConfig, "--cls_token", "--dist_eval") == "cls"
    assert pool(LinprobeConfig, "--global_pool") == "avg"  # the official flag, bare
    assert (
        load_config(FinetuneConfig, ["--data_path", "d", "--no_pin_mem"], "t")[0].pin_mem is False
    )
    assert pool(LinprobeConfig, "--global_pool", "avg", "--epochs", "3") == "avg"
    assert pool(FinetuneConfig, "--global_pool", "cls") == "cls"
    cfg = load_config(FinetuneConfig, ["--data_path", "d", "--global_pool", "max"], "t")[0]
    with pytest.raises(ConfigError, match="global_pool must be one of"):
        validate(cfg)


def test_the_official_cutmix_minmax_and_resplit_flags(data, tmp_path):
    """--cutmix_minmax reaches timm's Mixup, turning cutmix on over --cutmix's alpha; --resplit
    is accepted and, as in the official script, never reaches the transform."""
    from timm.data import Mixup
    from timm.data.random_erasing import RandomErasing

    from mae_transfer.classification.config import load_config
    from mae_transfer.classification.data import build_mixup, finetune_transform

    flags = ["--data_path", "d", "--mixup", "0", "--cutmix", "0", "--cutmix_minmax", "0.25"]
    cfg, _ = load_config(FinetuneConfig, [*flags, "0.75", "--resplit"], "t")
    assert cfg.cutmix_minmax == [0.25, 0.75]
    mix = build_mixup(cfg, 3)
    assert isinstance(mix, Mixup) and mix.cutmix_minmax == [0.25, 0.75]
    assert mix.cutmix_alpha == 1.0 and mix.mixup_alpha == 0  # timm: the range overrides alpha
    np.random.seed(0)
    x = torch.rand(4, 3, 32, 32)
    pasted = (mix(x.clone(), torch.tensor([0, 1, 2, 1]))[0] != x).all(dim=1)[0]
    rows, cols = pasted.any(1).sum().item(), pasted.any(0).sum().item()
    assert 8 <= rows < 24 and 8 <= cols < 24  # a box of 32 x [0.25, 0.75) px a side
    # what the official transform builds, with or without --resplit: erasing without a split
    plain = load_config(FinetuneConfig, ["--data_path", "d"], "t")[0]
    asked = {"mixup": 0, "cutmix": 0, "cutmix_minmax": [0.25, 0.75]}
    assert cfg.to_dict() == {**plain.to_dict(), **asked}  # --resplit changes nothing
    erasing = [t for t in finetune_transform(cfg).transforms if isinstance(t, RandomErasing)]
    assert [e.num_splits for e in erasing] == [0]
    cfg_of(FinetuneConfig, data, tmp_path, cutmix_minmax=[0.25, 0.75])  # valid
    for bad, message in [
        ([0.75, 0.25], "cutmix_minmax must satisfy 0 < MIN < MAX <= 1"),
        ([0.0, 0.5], "cutmix_minmax must satisfy 0 < MIN < MAX <= 1"),
        ([0.5, 1.5], "cutmix_minmax must satisfy 0 < MIN < MAX <= 1"),
        ([0.5], "cutmix_minmax must be two numbers, MIN MAX, got 0.5"),
        ([0.5, 0.51], "at an image side of 32 px (input_size 32) both give a box side of 16"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            validate(cfg_of(FinetuneConfig, data, tmp_path, cutmix_minmax=bad))
    # either side: 6 to 7 px of the 32 px height, 8 to 8 of the 40 px width (timm: randint fails)
    with pytest.raises(ConfigError, match=re.escape("image side of 40 px (input_size [32, 40])")):
        validate(
            cfg_of(FinetuneConfig, data, tmp_path, input_size=[32, 40], cutmix_minmax=[0.2, 0.22])
        )
    # the range alone mixes: timm mixes pairs, so the batch must be even
    alone = dict(mixup=0, cutmix=0, cutmix_minmax=[0.25, 0.75], batch_size=3)
    with pytest.raises(ConfigError, match="batch_size must be even"):
        cfg_of(FinetuneConfig, data, tmp_path, **alone)


def test_an_input_size_the_patches_do_not_tile_is_padded_with_a_warning(caplog, monkeypatch):
    from mae_transfer.classification import model as model_module

    monkeypatch.setattr(model_module, "_PADDING_NOTED", set())  # (other tests' sizes noted)
    model = build_classifier("vit_base_patch16", 3, 36, "avg", **TINY)  # patch 8
    assert "input_size 36x36 is not a multiple of the patch size 8" in caplog.text
    assert "to 40x40 (bottom and right); 32x32 or 40x40 would not be" in caplog.text
    assert model(torch.rand(1, 3, 36, 36)).shape == (1, 3)  # (padded to 40, as said)
    caplog.clear()
    build_classifier("vit_base_patch16", 3, 36, "avg", **TINY)  # (the config check's build,
    assert "not a multiple" not in caplog.text  # then the run's: said once)
    build_classifier("vit_base_patch16", 3, 6, "avg", **TINY)  # below one patch: no 0x0
    assert "; 8x8 would not be" in caplog.text
    caplog.clear()
    build_classifier("vit_base_patch16", 3, (32, 40), "avg", **TINY)
    assert "not a multiple" not in caplog.text


@pytest.mark.parametrize("aa", ["rand-m9-mstd0.5-inc1", "rand-m10-mstd0-inc1", "v0"])
def test_randaugment_at_its_top_magnitude_posterizes_to_black_instead_of_crashing(aa):
    """The recipe's magnitude noise reaches 10 (~2% of draws), where PosterizeIncreasing keeps
    0 bits: Pillow 13 (here) refuses that (a ValueError in a loader, at some image of the
    first ImageNet epoch); older Pillow, and so the official runs, gave a black image."""
    import random

    from PIL import Image

    from mae_transfer.classification.config import make_config
    from mae_transfer.classification.data import finetune_transform

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), np.uint8))
    transform = finetune_transform(make_config(FinetuneConfig, {"input_size": 32, "aa": aa}))
    for seed in range(100):  # every op drawn, posterize among them at 0 bits
        random.seed(seed)
        torch.manual_seed(seed)
        transform(image)
    augment = transform.transforms[2]
    ops = getattr(augment, "ops", None) or [op for ops in augment.policy for op in ops]
    posterize = [op for op in ops if op.name.startswith("Posterize")]
    assert posterize and all(not np.asarray(op.aug_fn(image, 0)).any() for op in posterize)
