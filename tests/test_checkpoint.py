"""Checkpoint forms, resizing, the load report and its errors."""

from __future__ import annotations

import argparse

import pytest
import torch
from conftest import TINY_MAE

from mae_transfer import CheckpointError, create_model, load_pretrained
from mae_transfer.checkpoint import save_atomic


@pytest.fixture
def mae():
    return create_model("mae_vit_base_patch16", img_size=32, **TINY_MAE)


def encoder_state(mae):
    return {k: v for k, v in mae.state_dict().items() if not k.startswith(("decoder", "mask"))}


def vit(**kw):
    args = dict(embed_dim=32, depth=2, num_heads=2, img_size=32)
    return create_model("vit_base_patch16", **{**args, **kw})


def forms(mae):
    enc, full = encoder_state(mae), mae.state_dict()
    return {
        "official_encoder": {"model": enc},
        "official_full": {"model": full},
        "training": {"model": full, "optimizer": {}, "epoch": 3, "args": {"model": "x"}},
        "plain": enc,
        "ddp": {f"module.{k}": v for k, v in full.items()},
        "mmengine": {"meta": {}, "state_dict": {f"backbone.vit.{k}": v for k, v in enc.items()}},
        "detectron2": {
            "model": {f"backbone.bottom_up.vit.{k}": v for k, v in enc.items()},
            "iteration": 10,
        },
    }


@pytest.mark.parametrize(
    "form",
    ["official_encoder", "official_full", "training", "plain", "ddp", "mmengine", "detectron2"],
)
def test_every_form_loads_into_the_encoder(form, mae, tmp_path):
    path = tmp_path / f"{form}.pth"
    torch.save(forms(mae)[form], path)
    model = vit()
    report = load_pretrained(model, str(path))
    assert report.ok and len(report.loaded) == len(model.state_dict())
    assert torch.equal(model.blocks[1].mlp.fc2.weight, mae.blocks[1].mlp.fc2.weight)
    if form in ("official_full", "training", "ddp"):
        assert "mask_token" in report.dropped and "decoder_pred.weight" in report.dropped


def test_full_checkpoint_loads_into_mae_at_another_size(mae, tmp_path):
    path = tmp_path / "full.pth"
    torch.save({"model": mae.state_dict()}, path)
    big = create_model("mae_vit_base_patch16", img_size=(48, 64), **TINY_MAE)
    report = load_pretrained(big, str(path))
    assert report.ok and len(report.resized) == 2
    assert torch.equal(big.decoder_pred.weight, mae.decoder_pred.weight)


def test_learned_position_table_is_interpolated_and_cls_dropped(mae):
    model = vit(img_size=(64, 48), class_token=False, rel_pos="decomposed")
    report = load_pretrained(model, {"model": mae.state_dict()})
    assert model.pos_embed.shape == (1, 12, 32)
    assert any(r.startswith("pos_embed (1, 5, 32)->(1, 12, 32)") for r in report.resized)
    assert "cls_token" in report.dropped
    assert report.new and all("rel_pos" in k for k in report.new)
    assert report.ok


@pytest.mark.parametrize("pretrained", [(192, 224), (224, 160)])
def test_a_non_square_pretraining_table_is_read_in_its_own_layout(pretrained):
    """12 x 14 patches + the class row are 169 = 13 x 13 rows: counted alone, they would be read
    as a square table without a class token, every row shifted; 10 x 14 + 1 = 141 fits no grid.
    MAE's sin-cos values tell the layout."""
    from mae_transfer.pos_embed import resize_pos_embed, sincos_pos_embed

    src = create_model("mae_vit_base_patch16", img_size=pretrained, **TINY_MAE)
    grid = (pretrained[0] // 16, pretrained[1] // 16)
    model = vit(img_size=256, class_token=False)
    report = load_pretrained(model, {"model": src.state_dict()})
    assert any(r.startswith("pos_embed ") for r in report.resized) and not report.mismatched
    table = sincos_pos_embed(32, grid, cls_token=False)
    expected = resize_pos_embed(table, (16, 16), num_prefix_tokens=0, old_grid=grid)
    assert torch.allclose(model.pos_embed, expected, atol=1e-6)


def test_patch14_kernel_resized_to_16(caplog):
    src = create_model("mae_vit_huge_patch14", img_size=28, **TINY_MAE)
    model = vit(img_size=32, patch_size=16)
    with caplog.at_level("WARNING"):
        report = load_pretrained(model, src.state_dict())
    assert "patch size" not in caplog.text  # the expected ViT-H/14 case: no warning
    assert any(
        "patch_embed.proj.weight (32, 3, 14, 14)->(32, 3, 16, 16)" in r for r in report.resized
    )
    # A constant image gives the same patch response through both kernels.
    x = torch.ones(1, 3, 14, 14)
    y14 = torch.nn.functional.conv2d(x, src.patch_embed.proj.weight)
    y16 = torch.nn.functional.conv2d(torch.ones(1, 3, 16, 16), model.patch_embed.proj.weight)
    assert torch.allclose(y14, y16, atol=1e-5)


def test_another_patch_size_is_resized_with_a_warning(caplog):
    """A /8 encoder loaded at /16 (a config's default patch size) was resized at INFO: the
    user learnt only from a line of the report that the weights no longer compute what they
    were pretrained to."""
    src = create_model("mae_vit_base_patch16", img_size=32, patch_size=8, **TINY_MAE)
    with caplog.at_level("WARNING"):
        report = load_pretrained(vit(img_size=32, patch_size=16), src.state_dict(), log=False)
    assert any(r.startswith("patch_embed.proj.weight") for r in report.resized)
    assert "the checkpoint's patch size is 8x8, the model's 16x16" in caplog.text
    assert "give the model patch size 8" in caplog.text


def test_wrong_model_size_is_an_error_naming_the_cause(mae):
    model = create_model("vit_base_patch16", embed_dim=64, depth=4, num_heads=2, img_size=32)
    with pytest.raises(CheckpointError, match="wrong model size"):
        load_pretrained(model, {"model": mae.state_dict()})


class Holder(torch.nn.Module):
    """A model that holds the ViT (or not) rather than being one, as a detector does."""

    def __init__(self, **parts):
        super().__init__()
        for name, part in parts.items():
            self.add_module(name, part)


@pytest.mark.parametrize("nested", [False, True])
def test_a_model_holding_one_vit_loads_into_it(tmp_path, nested):
    """A pyramid given instead of its .vit was refused as 'a no ViT: wrong model size?'."""
    from mae_transfer.pyramid import ViTPyramid

    mae = create_model("mae_vit_base_patch16", img_size=32, **{**TINY_MAE, "depth": 4})
    path = tmp_path / "encoder.pth"
    torch.save({"model": encoder_state(mae)}, path)
    pyramid = ViTPyramid(vit(depth=4, class_token=False), (0, 1, 2, 3), norm="LN")
    model = Holder(backbone=pyramid) if nested else pyramid
    report = load_pretrained(model, str(path))
    target = "backbone.vit" if nested else "vit"
    assert report.ok and report.target == target
    assert len(report.loaded) == len(pyramid.vit.state_dict())
    assert f"into the model's ViT '{target}'" in report.summary()
    assert torch.equal(pyramid.vit.blocks[3].mlp.fc2.weight, mae.blocks[3].mlp.fc2.weight)


def test_a_model_holding_no_vit_or_two_is_an_error_saying_what_to_pass(mae):
    with pytest.raises(CheckpointError, match=r"model \(Holder\) is not a ViT .* pass the ViT"):
        load_pretrained(Holder(neck=torch.nn.Linear(32, 2)), {"model": mae.state_dict()})
    with pytest.raises(CheckpointError, match=r"holds 2 ViTs \(a, b\): pass the one"):
        load_pretrained(Holder(a=vit(), b=vit()), {"model": mae.state_dict()})


def test_not_a_vit_is_an_error(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(8, 3, 7, 7)}}, path)
    with pytest.raises(CheckpointError, match="holds no ViT"):
        load_pretrained(vit(), str(path))


class Arbitrary:
    """Stands for any pickled class a checkpoint might smuggle in."""


def test_pickled_objects_are_refused_by_weights_only(tmp_path):
    path = tmp_path / "unsafe.pth"
    torch.save({"model": {}, "obj": Arbitrary()}, path)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_pretrained(vit(), str(path))


def test_official_training_checkpoint_with_namespace_args_loads(mae, tmp_path):
    path = tmp_path / "official_training.pth"
    args = argparse.Namespace(model="mae_vit_base_patch16", norm_pix_loss=True)
    torch.save({"model": mae.state_dict(), "optimizer": {}, "epoch": 1, "args": args}, path)
    assert load_pretrained(vit(), str(path)).ok


def test_partial_mismatch_is_reported_not_silent(mae):
    state = encoder_state(mae)
    state["blocks.0.mlp.fc1.weight"] = torch.zeros(7, 7)
    model = vit()
    report = load_pretrained(model, state)
    assert not report.ok
    assert any(m.startswith("blocks.0.mlp.fc1.weight") for m in report.mismatched)
    assert "SHAPE MISMATCH" in report.summary()


def test_save_atomic_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "ckpt.pth"
    save_atomic({"a": torch.ones(2)}, str(path))

    class Boom:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        save_atomic({"a": Boom()}, str(path))
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pth"]


def test_files_are_memory_mapped_never_written_and_legacy_ones_still_load(tmp_path, monkeypatch):
    from mae_transfer.checkpoint import load_file

    new, legacy = str(tmp_path / "zip.pth"), str(tmp_path / "legacy.pth")
    torch.save({"model": {"w": torch.ones(3)}}, new)
    torch.save({"model": {"w": torch.ones(3)}}, legacy, _use_new_zipfile_serialization=False)
    mapped, real = [], torch.load
    monkeypatch.setattr(
        torch, "load", lambda *a, **k: mapped.append(k.get("mmap")) or real(*a, **k)
    )
    w = load_file(new, mmap=True)["model"]["w"]
    assert mapped == [True]
    w.add_(1)  # an optimizer's in-place step on a resumed state: a private copy of the page
    assert torch.equal(load_file(new)["model"]["w"], torch.ones(3))
    assert mapped == [True, None]  # not mapped unless asked: other libraries rewrite in place
    mapped.clear()
    assert torch.equal(load_file(legacy, mmap=True)["model"]["w"], torch.ones(3))
    assert mapped == [True, None]


def test_copies_of_a_checkpoint_are_independent_files_that_outlive_its_next_save(tmp_path):
    from mae_transfer.checkpoint import copy_atomic, load_file

    last, best = str(tmp_path / "checkpoint-last.pth"), str(tmp_path / "checkpoint-best.pth")
    save_atomic({"epoch": 0, "optimizer": {"x": torch.ones(2)}}, last)
    copy_atomic(last, best)
    assert load_file(best)["epoch"] == 0
    save_atomic({"epoch": 1}, last)  # replaced whole: the copy keeps what it was
    assert load_file(best)["epoch"] == 0 and load_file(last)["epoch"] == 1
    torch.save({"epoch": 0}, best)  # a user strips the best copy in place: last is untouched
    assert load_file(last)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint-best.pth",
        "checkpoint-last.pth",
    ]
