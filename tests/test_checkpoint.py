"""Checkpoint forms, resizing, the load report and its errors."""

from __future__ import annotations

import argparse

import pytest
import torch
from conftest import TINY_MAE, RunsCode

from mae_transfer import CheckpointError, create_model, load_pretrained
from mae_transfer.checkpoint import find_state_dict, save_atomic


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
    # A smooth patch, resized bicubically to 16 px, nearly so (2% apart; any kernel of the same
    # sum passes the constant image, a flat one is 65-85% off here)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 14), torch.linspace(-1, 1, 14), indexing="ij")
    x14 = torch.stack([0.5 + 0.3 * xx - 0.2 * yy, torch.cos(2 * xx + yy), xx * yy])[None]
    x16 = torch.nn.functional.interpolate(x14, size=(16, 16), mode="bicubic", align_corners=False)
    y14 = torch.nn.functional.conv2d(x14, src.patch_embed.proj.weight)
    y16 = torch.nn.functional.conv2d(x16, model.patch_embed.proj.weight)
    assert (y16 - y14).norm() <= 0.05 * y14.norm()


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


def test_a_checkpoint_without_tensors_is_named_with_what_was_found():
    with pytest.raises(CheckpointError, match=r"no state dict found in checkpoint \(a dict") as e:
        find_state_dict({"epoch": 3, "optimizer": {}})
    assert "with keys ['epoch', 'optimizer']); expected one of" in str(e.value)
    with pytest.raises(CheckpointError, match=r"\(a list\); expected one of"):
        find_state_dict([torch.zeros(1)])


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


def test_a_model_zoo_pkl_loads_its_vit_and_runs_no_code(mae, tmp_path):
    """ViTDet's detectors are model-zoo .pkl files (numpy arrays, ViT under 'backbone.net.'):
    load_pretrained refused them as objects weights_only cannot read; now their ViT loads, the
    rest listed as dropped, and a .pkl that asks for anything but arrays still runs nothing."""
    import pickle

    randomised(mae)
    arrays = {f"backbone.net.{k}": v.numpy() for k, v in encoder_state(mae).items()}
    arrays["roi_heads.box_predictor.cls_score.weight"] = torch.zeros(3, 8).numpy()
    zoo = tmp_path / "model_final.pkl"
    with open(zoo, "wb") as f:
        pickle.dump({"model": arrays, "__author__": "zoo"}, f)
    model = vit()
    report = load_pretrained(model, str(zoo))
    assert report.ok and sorted(report.loaded) == sorted(model.state_dict())
    assert report.dropped == ["roi_heads.box_predictor.cls_score.weight"]
    assert torch.equal(model.blocks[1].attn.qkv.weight, mae.blocks[1].attn.qkv.weight)
    hostile, ran = tmp_path / "hostile.pkl", tmp_path / "ran"
    with open(hostile, "wb") as f:
        pickle.dump({"model": arrays, "x": RunsCode(str(ran))}, f)
    with pytest.raises(CheckpointError, match="is not part of a weights file"):
        load_pretrained(vit(), str(hostile))
    assert not ran.exists()


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


# -- other codebases' names, safetensors, URLs --------------------------------------------------
HF, MM = "Hugging Face", "OpenMMLab"

# Hand-written from the codebases' module trees (transformers' modeling_vit_mae.py, mmpretrain's
# VisionTransformer / MAEPretrainDecoder, mmseg's BEiT / MAE backbones), not from KEY_TABLE:
# their name -> ours ("[k]": the k-th third of our tensor). A table that agrees with its own
# inverse but names or pairs a tensor wrongly fails here.
HF_LAYER = {
    "layernorm_before.weight": "norm1.weight",
    "layernorm_before.bias": "norm1.bias",
    "attention.attention.query.weight": "attn.qkv.weight[0]",
    "attention.attention.query.bias": "attn.qkv.bias[0]",
    "attention.attention.key.weight": "attn.qkv.weight[1]",
    "attention.attention.key.bias": "attn.qkv.bias[1]",
    "attention.attention.value.weight": "attn.qkv.weight[2]",
    "attention.attention.value.bias": "attn.qkv.bias[2]",
    "attention.output.dense.weight": "attn.proj.weight",
    "attention.output.dense.bias": "attn.proj.bias",
    "layernorm_after.weight": "norm2.weight",
    "layernorm_after.bias": "norm2.bias",
    "intermediate.dense.weight": "mlp.fc1.weight",
    "intermediate.dense.bias": "mlp.fc1.bias",
    "output.dense.weight": "mlp.fc2.weight",
    "output.dense.bias": "mlp.fc2.bias",
}
HF_MAE = {  # ViTMAEForPreTraining, encoder depth 2, decoder depth 1
    "vit.embeddings.cls_token": "cls_token",
    "vit.embeddings.position_embeddings": "pos_embed",
    "vit.embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "vit.embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    **{
        f"vit.encoder.layer.{i}.{t}": f"blocks.{i}.{o}" for i in (0, 1) for t, o in HF_LAYER.items()
    },
    "vit.layernorm.weight": "norm.weight",
    "vit.layernorm.bias": "norm.bias",
    "decoder.mask_token": "mask_token",
    "decoder.decoder_pos_embed": "decoder_pos_embed",
    "decoder.decoder_embed.weight": "decoder_embed.weight",
    "decoder.decoder_embed.bias": "decoder_embed.bias",
    **{f"decoder.decoder_layers.0.{t}": f"decoder_blocks.0.{o}" for t, o in HF_LAYER.items()},
    "decoder.decoder_norm.weight": "decoder_norm.weight",
    "decoder.decoder_norm.bias": "decoder_norm.bias",
    "decoder.decoder_pred.weight": "decoder_pred.weight",
    "decoder.decoder_pred.bias": "decoder_pred.bias",
}
MM_LAYER = {
    "ln1.weight": "norm1.weight",
    "ln1.bias": "norm1.bias",
    "attn.qkv.weight": "attn.qkv.weight",
    "attn.qkv.bias": "attn.qkv.bias",
    "attn.proj.weight": "attn.proj.weight",
    "attn.proj.bias": "attn.proj.bias",
    "ln2.weight": "norm2.weight",
    "ln2.bias": "norm2.bias",
    "ffn.layers.0.0.weight": "mlp.fc1.weight",
    "ffn.layers.0.0.bias": "mlp.fc1.bias",
    "ffn.layers.1.weight": "mlp.fc2.weight",
    "ffn.layers.1.bias": "mlp.fc2.bias",
}
MM_MAE = {  # mmpretrain's MAE: MAEViT as the backbone, MAEPretrainDecoder as the neck
    "backbone.cls_token": "cls_token",
    "backbone.pos_embed": "pos_embed",
    "backbone.patch_embed.projection.weight": "patch_embed.proj.weight",
    "backbone.patch_embed.projection.bias": "patch_embed.proj.bias",
    **{f"backbone.layers.{i}.{t}": f"blocks.{i}.{o}" for i in (0, 1) for t, o in MM_LAYER.items()},
    "backbone.ln1.weight": "norm.weight",
    "backbone.ln1.bias": "norm.bias",
    "neck.mask_token": "mask_token",
    "neck.decoder_pos_embed": "decoder_pos_embed",
    "neck.decoder_embed.weight": "decoder_embed.weight",
    "neck.decoder_embed.bias": "decoder_embed.bias",
    **{f"neck.decoder_blocks.0.{t}": f"decoder_blocks.0.{o}" for t, o in MM_LAYER.items()},
    "neck.ln1.weight": "decoder_norm.weight",
    "neck.ln1.bias": "decoder_norm.bias",
    "neck.decoder_pred.weight": "decoder_pred.weight",
    "neck.decoder_pred.bias": "decoder_pred.bias",
}
MM_BEIT_LAYER = {  # mmseg's BEiT layer: MM_LAYER's names, but q and v biases only (no qkv
    # bias), and layer scale and a relative position table
    **{t: o for t, o in MM_LAYER.items() if t != "attn.qkv.bias"},
    "attn.q_bias": "attn.qkv.bias[0]",
    "attn.v_bias": "attn.qkv.bias[2]",
    "attn.relative_position_bias_table": "attn.relative_position_bias_table",
    "gamma_1": "ls1.gamma",
    "gamma_2": "ls2.gamma",
}


def their_names(state, scheme, prefix="", qv_bias=False):
    """Our state dict in ``scheme``'s names, written here as the inverse of KEY_TABLE: the
    ViT under ``prefix``, what the table puts beside it (a decoder) at the top; qkv split as
    FUSED says (BEiT's q_bias and v_bias, the k bias left out, when ``qv_bias``)."""
    from mae_transfer.checkpoint_keys import KEY_TABLE

    table = KEY_TABLE[scheme]
    out = {}
    for key, value in split_fused(state, scheme, qv_bias).items():
        name = _inverse(key, table["encoder"], table["block"])
        if name is not None:
            out[prefix + name] = value
        else:
            name = _inverse(key, table["beside"], table["block"])
            assert name is not None, f"KEY_TABLE has no {scheme} name for {key}"
            out[name] = value
    return out


def _inverse(key, section, block):
    """Their name of our ``key`` by the first entry of ``section`` whose our name fits."""
    import re

    for theirs, ours in section.items():
        if "{i}" in ours:
            found = re.match(re.escape(ours).replace(r"\{i\}", r"(\d+)"), key)
            if found:
                inside = _inverse(key[found.end() :], block, {})
                assert inside is not None, f"no block name for {key}"
                return theirs.format(i=found.group(1)) + inside
        elif key == ours or (ours.endswith(".") and key.startswith(ours)):
            return theirs + key[len(ours) :]
    return None


def split_fused(state, scheme, qv_bias):
    """``state`` with each qkv tensor cut into the parts FUSED lists for ``scheme``."""
    from mae_transfer.checkpoint_keys import FUSED

    out = {}
    for key, value in state.items():
        inner = key.split(".", 2)[-1]  # "attn.qkv.weight" of "blocks.0.attn.qkv.weight"
        if scheme == HF and inner in FUSED:
            parts = FUSED[inner][0]
        elif qv_bias and inner == "attn.qkv.bias":
            parts = FUSED[inner][1]
        else:
            out[key] = value
            continue
        for part, chunk in zip(parts, value.chunk(3)):
            if part is not None:
                out[key[: -len(inner)] + part] = chunk.clone()
    return out


def randomised(model):
    """``model`` with every tensor random (biases and tables too: a fusion that drops or
    reorders one must show)."""
    with torch.no_grad():
        for value in model.state_dict().values():
            value.copy_(torch.randn_like(value) * 0.3)
    return model.eval()


def test_the_table_gives_the_codebases_own_names(mae):
    """KEY_TABLE's inverse, applied to our MAE, gives the hand-written names of Hugging Face's
    ViTMAEForPreTraining and mmpretrain's MAE, and of mmseg's BEiT layer."""
    assert set(their_names(mae.state_dict(), HF, "vit.")) == set(HF_MAE)
    assert set(their_names(mae.state_dict(), MM, "backbone.")) == set(MM_MAE)
    beit = vit(depth=1, rel_pos="bias", init_values=0.1, class_token=True)
    layer = {k for k in their_names(beit.state_dict(), MM, qv_bias=True) if k.startswith("lay")}
    assert layer == {f"layers.0.{name}" for name in MM_BEIT_LAYER}


@pytest.mark.parametrize(
    "scheme, names, prefix",
    [
        (HF, HF_MAE, "vit."),
        (MM, MM_MAE, "backbone."),
        (
            MM,
            {
                "patch_embed.projection.weight": "patch_embed.proj.weight",
                **{f"layers.3.{t}": f"blocks.3.{o}" for t, o in MM_BEIT_LAYER.items()},
            },
            "",
        ),
    ],
)
def test_each_of_their_tensors_becomes_the_one_written_here(scheme, names, prefix):
    """Every name read as the hand-written one says, each tensor told apart by its values
    (so two names swapped in the table show), q / k / v in this order in qkv."""
    from mae_transfer.checkpoint_keys import to_timm_names

    state = {name: torch.full((2,), float(n)) for n, name in enumerate(names)}
    ours, renaming = to_timm_names(state)
    assert renaming.scheme == scheme
    for n, (theirs, name) in enumerate(names.items()):
        name, third = (name[:-3], int(name[-2])) if name.endswith("]") else (name, None)
        value = ours[prefix + name]
        if third is not None:
            value = value.chunk(3)[third]
        assert torch.equal(value, torch.full((2,), float(n))), f"{theirs} -> {prefix + name}"


@pytest.mark.parametrize("scheme, prefix", [(HF, "vit."), (MM, "backbone.")])
def test_a_whole_mae_in_another_codebase_s_names_loads_with_the_same_outputs(
    scheme, prefix, mae, tmp_path
):
    """Hugging Face's ViTMAEForPreTraining and mmpretrain's MAE, encoder and decoder: every
    tensor loads, equal to the original (q / k / v fused back into qkv), and the MAE computes
    the same loss and reconstruction."""
    randomised(mae)
    path = tmp_path / "their.pth"
    torch.save({"state_dict": their_names(mae.state_dict(), scheme, prefix)}, path)
    model = create_model("mae_vit_base_patch16", img_size=32, **TINY_MAE)
    report = load_pretrained(model, str(path))
    assert report.ok and not (report.dropped or report.new or report.resized)
    assert sorted(report.loaded) == sorted(mae.state_dict())
    for name, value in mae.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    assert f"({scheme} names read as ours; prefix '{prefix}' stripped)" in report.summary()
    fused = 3 * 2 if scheme == HF else 0  # 2 encoder blocks + 1 decoder block, weight + bias
    assert len(report.fused) == fused
    if fused:
        assert "blocks.0.attn.qkv.weight <- q.weight, k.weight, v.weight" in report.fused
        assert "fused from the checkpoint's parts (6): blocks.*.attn.qkv.weight <- q" in str(report)
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 4)
    with torch.no_grad():
        for ours, theirs in zip(mae(imgs, noise=noise), model(imgs, noise=noise)):
            assert torch.equal(ours, theirs)


def test_parts_of_another_width_are_reported_not_a_crash(mae):
    """A Hugging Face query of the wrong width (another model's block) stopped the load with
    torch.cat's size error; now that block's parts stay apart and the report lists them."""
    theirs = their_names(encoder_state(mae), HF, "vit.")
    theirs["vit.encoder.layer.0.attention.attention.query.weight"] = torch.zeros(32, 16)
    report = load_pretrained(vit(), theirs)
    assert not report.ok and report.missing == ["blocks.0.attn.qkv.weight"]
    assert sorted(report.unexpected) == [f"blocks.0.attn.{p}.weight" for p in "kqv"]
    assert "blocks.1.attn.qkv.weight" in report.loaded


def test_beit_q_and_v_biases_become_the_qkv_bias_with_the_same_outputs(tmp_path):
    """mmseg's BEiT layers learn q and v biases only: the qkv bias is built with a zero k bias,
    which changes no attention (softmax ignores a shift all keys share), and layer scale and the
    relative position table load under their own names; the index buffer is dropped."""
    src = randomised(vit(rel_pos="bias", init_values=0.1, class_token=True))
    theirs = their_names(src.state_dict(), MM, qv_bias=True)
    index = torch.zeros(5 * 5, dtype=torch.long)  # what mmseg saves beside each table
    theirs.update({f"layers.{i}.attn.relative_position_index": index for i in (0, 1)})
    model = vit(rel_pos="bias", init_values=0.1, class_token=True).eval()
    report = load_pretrained(model, theirs)
    assert report.ok and sorted(report.loaded) == sorted(src.state_dict())
    assert sorted(report.dropped) == [f"blocks.{i}.attn.relative_position_index" for i in (0, 1)]
    assert report.fused == [f"blocks.{i}.attn.qkv.bias <- q_bias, zeros, v_bias" for i in (0, 1)]
    bias, expected = model.blocks[1].attn.qkv.bias, src.blocks[1].attn.qkv.bias.detach().clone()
    expected[32:64] = 0  # the k third
    assert torch.equal(bias, expected) and not torch.equal(bias, src.blocks[1].attn.qkv.bias)
    assert torch.equal(model.blocks[1].ls2.gamma, src.blocks[1].ls2.gamma)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.forward_features(x), src.forward_features(x), atol=1e-5)


@pytest.mark.parametrize(
    "src_cls, dst_cls", [(True, False), (True, True), (False, True), (False, False)]
)
def test_a_relative_position_bias_table_fits_the_model_s_grid_and_class_token(src_cls, dst_cls):
    """A BEiT / mmseg table (a 4 x 4 grid's 7 x 7 offsets, then BEiT's 3 class-token rows) was
    a SHAPE MISMATCH, not loaded, in a model without a class token (52 vs 49 rows) or at another
    grid (52 vs 228 at 8 x 8). At the same grid it loads exactly, the class rows dropped, or the
    model's own kept where the checkpoint has none; at another grid (8 x 6) the model computes
    the patch-to-patch bias the checkpoint's model computed for that input size."""
    from mae_transfer.vit import relative_position_bias

    src = randomised(vit(img_size=64, rel_pos="bias", class_token=src_cls))
    table = src.blocks[1].attn.relative_position_bias_table.detach()
    for img_size, grid in [(64, (4, 4)), ((128, 96), (8, 6))]:
        model = vit(img_size=img_size, rel_pos="bias", class_token=dst_cls)
        own = model.blocks[1].attn.relative_position_bias_table.detach().clone()
        report = load_pretrained(model, src.state_dict(), log=False)
        loaded = model.blocks[1].attn.relative_position_bias_table.detach()
        assert not report.mismatched  # (cls_token is missing when the source has none)
        assert "blocks.1.attn.relative_position_bias_table" in report.loaded
        line = f"blocks.1.attn.relative_position_bias_table {tuple(table.shape)}->"
        assert any(r.startswith(line) for r in report.resized) == (loaded.shape != table.shape)
        if grid == (4, 4):
            assert torch.equal(loaded[:49], table[:49])
            if dst_cls:
                assert torch.equal(loaded[49:], table[49:] if src_cls else own[49:])
        n = grid[0] * grid[1]
        ours = relative_position_bias(loaded, grid, grid, dst_cls)
        theirs = relative_position_bias(table, (4, 4), grid, src_cls)
        assert torch.equal(ours[..., -n:, -n:], theirs[..., -n:, -n:])  # patch-to-patch
        if src_cls == dst_cls:
            assert torch.equal(ours, theirs)


def test_a_windowed_block_gets_the_table_of_its_window():
    """An mmseg BEiT file (its names; 4 x 4 tables with class rows) loaded into ViTDet-style
    blocks without a class token: the windowed block's table is the offsets resized to its
    2 x 2 window, the global block's the offsets as they are."""
    from mae_transfer.vit import resize_bias_table

    src = randomised(vit(img_size=64, rel_pos="bias", class_token=True))
    model = vit(img_size=64, rel_pos="bias", class_token=False, window_size=2, global_blocks=(1,))
    report = load_pretrained(model, their_names(src.state_dict(), MM, qv_bias=True), log=False)
    assert report.ok and not report.mismatched
    assert "blocks.0.attn.relative_position_bias_table (52, 2)->(9, 2)" in report.resized
    assert "blocks.1.attn.relative_position_bias_table (52, 2)->(49, 2)" in report.resized
    tables = [
        b.attn.relative_position_bias_table.detach() for b in (src.blocks[0], model.blocks[0])
    ]
    assert torch.equal(tables[1], resize_bias_table(tables[0][:49], (4, 4), (2, 2)))
    assert torch.equal(
        model.blocks[1].attn.relative_position_bias_table,
        src.blocks[1].attn.relative_position_bias_table[:49],
    )


@pytest.mark.parametrize(
    "scheme, prefix, extra",
    [
        (HF, "", {}),  # ViTMAEModel.save_pretrained
        (HF, "vit.", {"vit.pooler.dense.weight": torch.zeros(32, 32)}),  # ViTModel's pooler
        (MM, "backbone.", {"decode_head.conv_seg.weight": torch.zeros(2, 8, 1, 1)}),  # mmseg
    ],
)
def test_an_encoder_in_another_codebase_s_names_loads_into_the_encoder(
    scheme, prefix, extra, mae, tmp_path
):
    randomised(mae)
    state = {**their_names(encoder_state(mae), scheme, prefix), **extra}
    path = tmp_path / "encoder.pth"
    torch.save(state, path)
    model = vit()
    report = load_pretrained(model, str(path))
    assert report.ok and sorted(report.loaded) == sorted(model.state_dict())
    assert len(report.dropped) == len(extra)
    assert torch.equal(model.blocks[1].attn.qkv.weight, mae.blocks[1].attn.qkv.weight)
    assert torch.equal(model.norm.bias, mae.norm.bias)


def test_safetensors_files_load_as_torch_files_do(mae, tmp_path):
    """timm's and Hugging Face's hub files are safetensors: our names and theirs load; the
    format is read from the file's first bytes, whatever its name."""
    from safetensors.torch import save_file

    from mae_transfer.checkpoint import file_format, load_file

    randomised(mae)
    ours, hf = tmp_path / "model.safetensors", tmp_path / "hf.bin"
    save_file(mae.state_dict(), str(ours))
    save_file(their_names(mae.state_dict(), HF, "vit."), str(hf), metadata={"format": "pt"})
    assert file_format(str(ours)) == file_format(str(hf)) == "safetensors"
    assert set(load_file(str(ours))) == set(mae.state_dict())
    for path in (ours, hf):
        model = create_model("mae_vit_base_patch16", img_size=32, **TINY_MAE)
        report = load_pretrained(model, str(path))
        assert report.ok and sorted(report.loaded) == sorted(mae.state_dict())
        for name, value in mae.state_dict().items():
            assert torch.equal(model.state_dict()[name], value), name


def test_safetensors_without_its_package_says_what_to_install(mae, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file(encoder_state(mae), str(path))
    monkeypatch.setitem(__import__("sys").modules, "safetensors.torch", None)
    with pytest.raises(CheckpointError, match=r"pip install safetensors"):
        load_pretrained(vit(), str(path))


def test_a_url_is_downloaded_once_into_torch_hub_s_cache(mae, tmp_path, fake_download):
    """Two Hugging Face repositories' model.safetensors are two files in the cache."""
    from safetensors.torch import save_file

    served, fetched = fake_download
    randomised(mae)
    for name, state in [("a", encoder_state(mae)), ("b", their_names(encoder_state(mae), HF))]:
        save_file(state, str(tmp_path / name))
    base = "https://huggingface.co/{}/resolve/main/model.safetensors"
    served[base.format("a/vit")] = (tmp_path / "a").read_bytes()
    served[base.format("b/vit")] = (tmp_path / "b").read_bytes()
    for repo in ("a/vit", "b/vit", "a/vit"):
        model = vit()
        report = load_pretrained(model, base.format(repo))
        assert report.ok and torch.equal(model.blocks[1].mlp.fc1.bias, mae.blocks[1].mlp.fc1.bias)
        assert report.source.startswith(base.format(repo))
    assert fetched == [base.format("a/vit"), base.format("b/vit")]  # the third: from the cache
    cache = tmp_path / "torch" / "hub" / "checkpoints" / "huggingface.co"
    assert (cache / "a" / "vit" / "resolve" / "main" / "model.safetensors").is_file()
    assert (cache / "b" / "vit" / "resolve" / "main" / "model.safetensors").is_file()


def test_a_failed_download_is_named_and_leaves_nothing_in_the_cache(tmp_path, fake_download):
    from mae_transfer.checkpoint import cache_path

    served, _ = fake_download
    url = "https://example.invalid/mae/mae_pretrain_vit_base.pth"
    with pytest.raises(CheckpointError, match=r"cannot download .*404.* give the file's path"):
        load_pretrained(vit(), url)
    served[url] = b"<!DOCTYPE html><html>Sign in</html>"
    with pytest.raises(CheckpointError, match=r"gave no checkpoint .*login or error page"):
        load_pretrained(vit(), url)
    assert not __import__("os").path.exists(cache_path(url))


def checkpoint_bytes(model, fmt):
    """``model``'s state dict as the bytes of a torch zip file or of a safetensors file."""
    import io

    if fmt == "safetensors":
        from safetensors.torch import save

        return save(model.state_dict())
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict()}, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt, kept", [("pth", 0.6), ("safetensors", 0.6), ("safetensors", 0.01)])
def test_a_download_cut_short_is_not_kept_and_the_next_load_downloads_it_again(
    fmt, kept, fake_download
):
    """torch's downloader ends silently when the connection closes early: the short file was
    kept in the cache for good, and every later load failed on the cache path. A torch zip
    without its central directory, a safetensors file shorter than its header says (or cut in
    its header) is now refused, named by its URL, and nothing is kept."""
    import os
    import re

    from mae_transfer.checkpoint import cache_path

    served, fetched = fake_download
    src = randomised(vit())
    whole = checkpoint_bytes(src, fmt)
    url = f"https://example.invalid/mae/vit.{fmt}"
    served[url] = whole[: int(len(whole) * kept)]
    incomplete = rf"the download of {re.escape(url)} is incomplete: .*nothing was kept"
    with pytest.raises(CheckpointError, match=incomplete):
        load_pretrained(vit(), url)
    assert os.listdir(os.path.dirname(cache_path(url))) == []  # no copy, no temporary file
    served[url] = whole
    model = vit()
    assert load_pretrained(model, url).ok and fetched == [url, url]
    assert torch.equal(model.blocks[1].attn.qkv.weight, src.blocks[1].attn.qkv.weight)


def test_a_damaged_copy_in_the_cache_is_removed_and_the_error_names_the_url(fake_download):
    """A copy that cannot be read (cut short before downloads were checked, or damaged on
    disk) failed every load with 'cannot read checkpoint <cache path>': it is removed, the
    error names the URL, and the next load downloads it anew."""
    import os
    import re

    from mae_transfer.checkpoint import cache_path

    served, fetched = fake_download
    url = "https://example.invalid/mae/mae_pretrain_vit_base.pth"
    served[url] = whole = checkpoint_bytes(vit(), "pth")
    path = cache_path(url)
    os.makedirs(os.path.dirname(path))
    with open(path, "wb") as f:
        f.write(whole[: len(whole) // 2])
    damaged = rf"cannot read {re.escape(url)}: its copy .* is damaged and was removed"
    with pytest.raises(CheckpointError, match=damaged):
        load_pretrained(vit(), url)
    assert not os.path.exists(path) and fetched == []
    assert load_pretrained(vit(), url).ok and fetched == [url]


def test_ranks_downloading_at_once_never_read_a_half_written_copy(fake_download, monkeypatch):
    """torchrun's ranks may download the same URL at once: while rank 0's download is half
    written, rank 1 loads the URL. Each downloads into a temporary file of its own, renamed
    into place when whole; both read the whole checkpoint and no temporary file is left."""
    import os

    from mae_transfer.checkpoint import cache_path, load_file

    url = "https://example.invalid/mae/mae_pretrain_vit_base.pth"
    whole = checkpoint_bytes(randomised(vit()), "pth")
    destinations, rank1 = [], []

    def download(url, dst, hash_prefix=None, progress=True):
        destinations.append(dst)
        with open(dst, "wb") as f:
            f.write(whole[: len(whole) // 2])
            f.flush()
            if len(destinations) == 1:  # rank 0 half way: rank 1 starts
                rank1.append(load_file(url))
            f.write(whole[len(whole) // 2 :])

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    rank0 = load_file(url)
    assert len(destinations) == 2 and len(set(destinations)) == 2
    assert cache_path(url) not in destinations
    for name, value in rank0["model"].items():
        assert torch.equal(value, rank1[0]["model"][name]), name
    assert os.listdir(os.path.dirname(cache_path(url))) == [os.path.basename(cache_path(url))]


def test_a_copy_removed_while_it_is_read_is_downloaded_again(fake_download, monkeypatch):
    """Another rank removes the copy (a damaged one) between this one finding it and reading
    it: it is downloaded and read again, not a bare 'checkpoint not found' of the cache path."""
    import os

    import mae_transfer.checkpoint as checkpoint

    served, fetched = fake_download
    url = "https://example.invalid/mae/mae_pretrain_vit_base.pth"
    served[url] = checkpoint_bytes(vit(), "pth")
    found = []

    def download_then_lose(url):
        found.append(real(url))
        if len(found) == 1:
            os.remove(found[0])  # by another rank
        return found[-1]

    real = checkpoint.download
    monkeypatch.setattr(checkpoint, "download", download_then_lose)
    assert load_pretrained(vit(), url).ok
    assert len(found) == 2 and fetched == [url, url]


def test_a_file_in_no_known_scheme_still_names_the_likely_cause(mae, tmp_path):
    """Names of a codebase the table does not know (here big_vision's, flattened) load
    nothing: the error says no ViT was found under the names read, and what the model is."""
    path = tmp_path / "flax.pth"
    state = {
        "Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel": torch.zeros(32, 128),
        "embedding/kernel": torch.zeros(16, 16, 3, 32),
        "cls": torch.zeros(1, 1, 32),
    }
    torch.save(state, path)
    with pytest.raises(CheckpointError) as e:
        load_pretrained(vit(), str(path))
    message = str(e.value)
    assert "holds no ViT under the names of the official MAE / timm, OpenMMLab or Hugging" in (
        message
    )
    assert "keys start with: Transformer/encoderblock_0" in message
    assert "The model is a ViT with 2 blocks of width 32, patch 16" in message


def test_decomposed_tables_of_another_grid_are_resized_as_the_forward_resizes_them():
    """ViTDet's rel_pos_h / rel_pos_w of a 4 x 4 grid (7 rows) loaded into a 96 px model
    (6 x 6: 11 rows) were a SHAPE MISMATCH, not loaded; resized once, they give the outputs
    the checkpoint's model gives at 96 px, where its forward resizes them."""
    src = randomised(vit(img_size=64, class_token=False, rel_pos="decomposed"))
    model = vit(img_size=96, class_token=False, rel_pos="decomposed").eval()
    report = load_pretrained(model, src.state_dict(), log=False)
    assert not report.mismatched and model.blocks[0].attn.rel_pos_h.shape[0] == 11
    assert any(r.startswith("blocks.0.attn.rel_pos_w (7, 16)->") for r in report.resized)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert torch.allclose(model.forward_features(x), src.forward_features(x), atol=1e-5)
