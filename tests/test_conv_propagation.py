"""ViTDet's convolutional propagation (its ablation): a residual bottleneck of convolutions after
chosen blocks (``residual_blocks``; detectron2: MODEL.VIT.RESIDUAL_BLOCKS). What it computes,
how it starts, that it trains, its names in a ViTDet checkpoint, bad values."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT

from mae_transfer.vit import ResidualConvBlock, VisionTransformer

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, class_token=False)


def _channel_ln(x, w, b):
    """LayerNorm over the channels of an NCHW map, written out (ViTDet's 'LN', eps 1e-6)."""
    mean = x.mean(1, keepdim=True)
    var = (x - mean).pow(2).mean(1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-6) * w[:, None, None] + b[:, None, None]


def test_the_block_computes_vitdet_s_bottleneck():
    block = ResidualConvBlock(32)
    for p in block.parameters():  # away from the init, so that every term shows
        torch.nn.init.normal_(p, std=0.3)
    s = block.state_dict()
    assert sorted(s) == sorted(  # ViTDet's names: convs without bias, three norms
        ["conv1.weight", "conv2.weight", "conv3.weight"]
        + [f"norm{i}.{p}" for i in (1, 2, 3) for p in ("weight", "bias")]
    )
    assert s["conv1.weight"].shape == (16, 32, 1, 1) and s["conv2.weight"].shape == (16, 16, 3, 3)
    x = torch.randn(2, 32, 5, 7)
    y = F.gelu(_channel_ln(F.conv2d(x, s["conv1.weight"]), s["norm1.weight"], s["norm1.bias"]))
    y = F.conv2d(y, s["conv2.weight"], padding=1)
    y = F.gelu(_channel_ln(y, s["norm2.weight"], s["norm2.bias"]))
    y = _channel_ln(F.conv2d(y, s["conv3.weight"]), s["norm3.weight"], s["norm3.bias"])
    torch.testing.assert_close(block(x), x + y, rtol=1e-5, atol=1e-5)


def test_blocks_start_as_the_identity_with_vitdet_s_init_and_train():
    torch.manual_seed(0)
    vit = VisionTransformer(window_size=2, residual_blocks=[1, 3], **TINY)
    assert vit.residual_blocks == (1, 3)
    assert [b.residual is not None for b in vit.blocks] == [False, True, False, True]
    res = vit.blocks[1].residual
    assert torch.count_nonzero(res.norm3.weight) == 0 and torch.count_nonzero(res.norm3.bias) == 0
    assert torch.equal(res.norm1.weight, torch.ones(16))  # (the ViT's LayerNorm init kept it)
    # He-normal, fan-out: std sqrt(2 / (out channels * kernel area)); conv2: 16 * 9
    assert res.conv2.weight.std().item() == pytest.approx((2 / (16 * 9)) ** 0.5, rel=0.15)
    plain = VisionTransformer(window_size=2, **TINY)
    missing, unexpected = plain.load_state_dict(vit.state_dict(), strict=False)
    assert not missing and unexpected and all(".residual." in k for k in unexpected)
    x = torch.randn(2, 3, 32, 40)
    with torch.no_grad():
        torch.testing.assert_close(vit.forward_features(x), plain.forward_features(x))
    vit.forward_features(x).square().mean().backward()
    assert all(p.grad is not None for p in vit.parameters())
    assert res.norm3.weight.grad.abs().sum() > 0  # the zero-started norm learns first
    torch.nn.init.normal_(res.norm3.weight)
    with torch.no_grad():
        assert not torch.allclose(vit.forward_features(x), plain.forward_features(x))


def test_an_mae_checkpoint_loads_with_the_conv_blocks_new():
    # ViTDet's ablation starts from MAE weights: its conv blocks are new (as the rel-pos tables),
    # not missing from the checkpoint
    from mae_transfer.checkpoint import load_pretrained
    from mae_transfer.mae import build_mae

    mae = build_mae(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2)
    vit = VisionTransformer(window_size=2, residual_blocks=[1, 3], **TINY)
    report = load_pretrained(vit, {"model": mae.state_dict()})
    assert report.ok and not report.missing, report.summary()
    assert sorted(report.new) == sorted(k for k in vit.state_dict() if ".residual." in k)
    assert torch.equal(vit.blocks[0].attn.qkv.weight, mae.blocks[0].attn.qkv.weight)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(residual_blocks=[4]), "residual_blocks [4] out of range for depth 4 (0..3)"),
        (dict(residual_blocks=["1"]), "residual_blocks must be block indices, got ['1']"),
        (dict(residual_blocks=[1], class_token=True), "cannot be combined with a class token"),
    ],
)
def test_bad_residual_blocks_are_refused(kwargs, message):
    with pytest.raises(ValueError) as e:
        VisionTransformer(**{**TINY, **kwargs})
    assert message in str(e.value)


def test_detectron2_config_key_builds_names_and_loads_vitdet_s_weights(tmp_path):
    pytest.importorskip("detectron2")
    from detectron2.modeling import build_model

    import mae_transfer.detection  # noqa: F401  (compat fixes before detectron2's imports)
    from mae_transfer.detection import MAECheckpointer
    from mae_transfer.detection.train import build_cfg, build_optimizer

    tiny = [
        "MODEL.VIT.SIZE_OVERRIDES", "[['embed_dim', 32], ['depth', 4], ['num_heads', 2]]",
        "MODEL.VIT.IMG_SIZE", "64", "MODEL.VIT.WINDOW_SIZE", "2", "INPUT.LSJ.IMAGE_SIZE", "64",
        "MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu", "MODEL.FPN.OUT_CHANNELS", "16",
        "MODEL.ROI_HEADS.NUM_CLASSES", "3", "SOLVER.LAYER_DECAY", "0.5",
        # ViTDet's ablation: every block windowed, a conv block after each quarter
        "MODEL.VIT.GLOBAL_BLOCKS", '["none"]', "MODEL.VIT.RESIDUAL_BLOCKS", "[1, 3]",
    ]  # fmt: skip
    yaml = os.path.join(ROOT, "configs", "detectron2", "mask_rcnn_vitdet_base_lsj_100ep.yaml")
    cfg = build_cfg(yaml, tiny)
    model = build_model(cfg)
    net = model.backbone.net
    assert net.global_blocks == () and net.residual_blocks == (1, 3)
    state = model.state_dict()
    names = [k for k in state if ".residual." in k]
    assert sorted(names) == sorted(
        f"backbone.net.blocks.{i}.residual.{p}"
        for i in (1, 3)
        for p in ["conv1.weight", "conv2.weight", "conv3.weight"]
        + [f"norm{j}.{q}" for j in (1, 2, 3) for q in ("weight", "bias")]
    )
    # layer decay: a block's conv propagation decays with its block (ViTDet's rule by name)
    lr = {n: g["lr"] for g in build_optimizer(cfg, model).param_groups for n in g["param_names"]}
    conv = lr["backbone.net.blocks.1.residual.conv2.weight"]
    assert conv / lr["backbone.simfp_2.0.weight"] == pytest.approx(0.5**3)  # block 1 of 4
    assert conv == lr["backbone.net.blocks.1.mlp.fc1.weight"]
    # a ViTDet detector checkpoint with these blocks loads exactly
    saved = {k: torch.randn_like(v) for k, v in state.items()}
    saved["backbone.net.pos_embed"] = torch.randn(1, 1 + 14 * 14, 32)
    torch.save({"model": saved}, tmp_path / "model_final.pth")
    fresh = build_model(cfg)
    MAECheckpointer(fresh, whole_model=True).load(str(tmp_path / "model_final.pth"))
    for k in names:
        assert torch.equal(fresh.state_dict()[k], saved[k]), k
    # out of range: refused before training, naming the key's value
    from mae_transfer.engine.config import ConfigError

    with pytest.raises((ConfigError, ValueError), match=r"residual_blocks \[7\] out of range"):
        build_cfg(yaml, tiny[:-2] + ["MODEL.VIT.RESIDUAL_BLOCKS", "[7]"])
    with pytest.raises(ConfigError, match="MODEL.VIT.RESIDUAL_BLOCKS must be block indices"):
        build_cfg(yaml, tiny[:-2] + ["MODEL.VIT.RESIDUAL_BLOCKS", "['a']"])


def test_mmseg_backbone_takes_residual_blocks():
    pytest.importorskip("mmseg")
    from mae_transfer.segmentation.backbone import MAEViT

    bb = MAEViT(
        model="vit_base_patch16", img_size=64, embed_dim=32, depth=4, num_heads=2,
        norm="BN", residual_blocks=[3], drop_path_rate=0.0,
    )  # fmt: skip
    assert bb.vit.blocks[3].residual is not None
    outs = bb(torch.randn(1, 3, 64, 64))
    assert [o.shape[-1] for o in outs] == [16, 8, 4, 2]
