"""ViTDet's simple feature pyramid as a detectron2 backbone (build_mae_vit_simple_fpn_backbone):
shapes, gradients, ViTDet's parameter names and computation, configs, weights, bad values."""

from __future__ import annotations

import logging
import os
import pickle

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("detectron2")

import mae_transfer.detection  # noqa: E402,F401  (compat fixes before detectron2's imports)

# isort: split
from conftest import ROOT, save_mae_checkpoints  # noqa: E402
from detectron2.config import LazyConfig, instantiate  # noqa: E402
from detectron2.layers import ShapeSpec  # noqa: E402
from detectron2.modeling import BACKBONE_REGISTRY, build_model  # noqa: E402
from detectron2.structures import BitMasks, Boxes, Instances  # noqa: E402

from mae_transfer import create_model, load_pretrained  # noqa: E402
from mae_transfer.checkpoint import CheckpointError  # noqa: E402
from mae_transfer.detection import (  # noqa: E402
    MAECheckpointer,
    MAEViTSimpleFPN,
    convert_to_detectron2,
)
from mae_transfer.detection.train import build_cfg, build_optimizer  # noqa: E402
from mae_transfer.engine.config import ConfigError  # noqa: E402

CONFIG_DIR = os.path.join(ROOT, "configs", "detectron2")
VITDET_B = os.path.join(CONFIG_DIR, "mask_rcnn_vitdet_base_lsj_100ep.yaml")
FPN_B = os.path.join(CONFIG_DIR, "mask_rcnn_vit_base_fpn_lsj_100ep.yaml")
# a tiny detector on 64 px inputs: 32-d ViT of 4 blocks (windows of 2 patches), 16-d pyramid,
# light heads
TINY = [
    "MODEL.VIT.SIZE_OVERRIDES", "[['embed_dim', 32], ['depth', 4], ['num_heads', 2]]",
    "MODEL.VIT.IMG_SIZE", "64",
    "MODEL.VIT.WINDOW_SIZE", "2",
    "INPUT.LSJ.IMAGE_SIZE", "64",
    "MODEL.WEIGHTS", "",
    "MODEL.DEVICE", "cpu",
    "MODEL.FPN.OUT_CHANNELS", "16",
    "MODEL.ANCHOR_GENERATOR.SIZES", "[[8], [16], [32], [64], [128]]",
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "200",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN", "50",
    "MODEL.RPN.BATCH_SIZE_PER_IMAGE", "32",
    "MODEL.ROI_HEADS.NUM_CLASSES", "3",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "16",
    "MODEL.ROI_BOX_HEAD.CONV_DIM", "16",
    "MODEL.ROI_BOX_HEAD.FC_DIM", "32",
    "MODEL.ROI_MASK_HEAD.CONV_DIM", "16",
]  # fmt: skip


def tiny_simple(**kw) -> MAEViTSimpleFPN:
    args = dict(
        model="vit_base_patch16", embed_dim=32, depth=4, num_heads=2, img_size=64, out_channels=16
    )
    return MAEViTSimpleFPN(**{**args, **kw})


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


@pytest.mark.parametrize("hw", [(64, 64), (70, 90), (33, 130)])
@pytest.mark.parametrize("patch", [16, 8])
def test_output_names_strides_channels_at_odd_sizes(hw, patch):
    bb = tiny_simple(patch_size=patch, window_size=2, rel_pos="decomposed")
    out = bb(torch.randn(1, 3, *hw))
    assert list(out) == ["p2", "p3", "p4", "p5", "p6"]
    shapes = bb.output_shape()
    grid = [_ceil(s, patch) for s in hw]
    for name, stride in zip(out, (4, 8, 16, 32, 64)):
        assert shapes[name].stride == stride and shapes[name].channels == 16
        factor = patch / stride  # from the patch grid; pooled maps keep a partial last cell
        expect = [g * int(factor) if factor >= 1 else _ceil(g, int(1 / factor)) for g in grid]
        assert list(out[name].shape) == [1, 16, *expect], name
        assert torch.isfinite(out[name]).all()
    assert bb.size_divisibility == 32
    assert bb.padding_constraints == {"size_divisibility": 32, "square_size": 0}


def test_every_trainable_parameter_gets_a_gradient():
    """DDP (find_unused_parameters=False) needs it: the final norm, which the pyramid never
    runs (ViTDet's ViT has none), is removed; every block runs."""
    bb = tiny_simple(window_size=2, global_blocks=(1, 3), rel_pos="decomposed", drop_path_rate=0.1)
    assert len(bb.net.blocks) == 4 and not list(bb.net.norm.parameters())
    sum(o.float().pow(2).mean() for o in bb(torch.randn(2, 3, 48, 80)).values()).backward()
    no_grad = [n for n, p in bb.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad
    zero = [n for n, p in bb.named_parameters() if p.grad is not None and not p.grad.any()]
    assert not zero, zero


def test_global_blocks_default_to_vitdet_s_and_out_indices_are_refused():
    assert tiny_simple(window_size=2).net.global_blocks == (0, 1, 2, 3)  # 4 blocks / 4 stages
    base = tiny_simple(window_size=14, depth=12)
    assert base.net.global_blocks == (2, 5, 8, 11)  # ViTDet's ViT-B
    assert tiny_simple(window_size=2, global_blocks="none").net.global_blocks == ()
    with pytest.raises(ValueError, match="a last-block pyramid reads no stage outputs"):
        tiny_simple(out_indices=(0, 1, 2, 3))
    with pytest.raises(ValueError, match="square_pad must be 0 or a multiple of 32, got 100"):
        tiny_simple(square_pad=100)
    # patch 32: the stride-4 level is x8, three ConvTs halving the channels
    with pytest.raises(ValueError, match="x8 level halves the channels 3 times: width 36 is not"):
        tiny_simple(embed_dim=36, patch_size=32)


def test_square_pad_puts_test_images_on_the_training_grid():
    bb = tiny_simple(square_pad=64, window_size=2, rel_pos="decomposed").eval()
    ref = tiny_simple(window_size=2, rel_pos="decomposed").eval()
    ref.load_state_dict(bb.state_dict())
    x = torch.randn(1, 3, 64, 40)
    out, expect = bb(x), ref(F.pad(x, (0, 24)))
    assert out["p4"].shape[-2:] == (4, 4)
    for k in out:
        assert torch.allclose(out[k], expect[k], atol=1e-6), k


# -- ViTDet's names and computation -----------------------------------------------------------
def vitdet_backbone_keys(depth: int) -> list:
    """The backbone keys of ViTDet's Mask R-CNN (detectron2's ViT with use_rel_pos, under
    SimpleFeaturePyramid with scale factors 4, 2, 1, 0.5 and norm 'LN'), without 'backbone.'."""
    keys = ["net.patch_embed.proj.weight", "net.patch_embed.proj.bias", "net.pos_embed"]
    block = ["norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"]
    for i in range(depth):
        keys += [f"net.blocks.{i}.{m}.{p}" for m in block for p in ("weight", "bias")]
        keys += [f"net.blocks.{i}.attn.rel_pos_h", f"net.blocks.{i}.attn.rel_pos_w"]

    def convs(level: str, first: int) -> list:  # 1x1 and 3x3, no bias, norm inside the conv
        return [f"{level}.{i}.{p}" for i in (first, first + 1) for p in _CONV_PARAMS]

    up = [f"simfp_2.{i}.{p}" for i in (0, 1, 3) for p in ("weight", "bias")]  # ConvT, LN, ConvT
    keys += up + convs("simfp_2", 4)
    keys += ["simfp_3.0.weight", "simfp_3.0.bias"] + convs("simfp_3", 1)
    return keys + convs("simfp_4", 0) + convs("simfp_5", 1)  # (simfp_5.0: max-pool)


_CONV_PARAMS = ("weight", "norm.weight", "norm.bias")


def test_parameter_names_and_shapes_are_vitdet_s():
    bb = tiny_simple(window_size=2, global_blocks=(3,), rel_pos="decomposed")
    state = bb.state_dict()
    assert sorted(state) == sorted(vitdet_backbone_keys(depth=4))
    d, c = 32, 16
    assert state["simfp_2.0.weight"].shape == (d, d // 2, 2, 2)  # ConvT halves the channels
    assert state["simfp_2.3.weight"].shape == (d // 2, d // 4, 2, 2)
    assert state["simfp_2.4.weight"].shape == (c, d // 4, 1, 1)
    assert state["simfp_3.1.weight"].shape == (c, d // 2, 1, 1)
    assert state["simfp_4.0.weight"].shape == (c, d, 1, 1)
    assert state["simfp_5.2.weight"].shape == (c, c, 3, 3)
    assert state["net.blocks.0.attn.rel_pos_h"].shape == (2 * 2 - 1, 16)  # windowed block
    assert state["net.blocks.3.attn.rel_pos_h"].shape == (2 * 4 - 1, 16)  # global, 64 / 16


def _channel_ln(x, state, key):
    """LayerNorm over the channels of an NCHW map (ViTDet's 'LN', eps 1e-6)."""
    w, b = state[key + ".weight"], state[key + ".bias"]
    return F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], w, b, 1e-6).permute(0, 3, 1, 2)


def _convs(x, state, level, first):
    """ViTDet's 1x1 then 3x3 conv of a level, each followed by its LN, no activation."""
    x = _channel_ln(F.conv2d(x, state[f"{level}.{first}.weight"]), state, f"{level}.{first}.norm")
    x = F.conv2d(x, state[f"{level}.{first + 1}.weight"], padding=1)
    return _channel_ln(x, state, f"{level}.{first + 1}.norm")


def vitdet_pyramid(last: torch.Tensor, state) -> list:
    """ViTDet's pyramid computed from the named weights (written from its description)."""
    x = F.conv_transpose2d(last, state["simfp_2.0.weight"], state["simfp_2.0.bias"], stride=2)
    x = F.gelu(_channel_ln(x, state, "simfp_2.1"))
    x = F.conv_transpose2d(x, state["simfp_2.3.weight"], state["simfp_2.3.bias"], stride=2)
    p2 = _convs(x, state, "simfp_2", 4)
    x = F.conv_transpose2d(last, state["simfp_3.0.weight"], state["simfp_3.0.bias"], stride=2)
    p3 = _convs(x, state, "simfp_3", 1)
    p4 = _convs(last, state, "simfp_4", 0)
    p5 = _convs(F.max_pool2d(last, 2, 2), state, "simfp_5", 1)
    return [p2, p3, p4, p5, F.max_pool2d(p5, kernel_size=1, stride=2)]


def test_the_pyramid_computes_what_vitdet_s_does():
    bb = tiny_simple(window_size=2, rel_pos="decomposed").eval()
    for p in bb.parameters():  # norms away from 1 / 0, so that their order matters
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        out = bb(x)
        last = bb.net.forward_intermediates(x, [3])[0]
        expect = vitdet_pyramid(last, bb.state_dict())
    for (name, got), want in zip(out.items(), expect):
        assert torch.allclose(got, want, atol=1e-5), name


def vitdet_abs_pos(table: torch.Tensor, hw) -> torch.Tensor:
    """ViTDet's position table at a grid: the class row dropped, the square table resized
    bicubically (no corner alignment) at every forward; (1, h*w, D)."""
    side = int((table.shape[1] - 1) ** 0.5)
    grid = table[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=hw, mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, hw[0] * hw[1], -1)


def _vitdet_detector_state(model) -> dict:
    """A ViTDet detector's state dict for ``model``: its names (checked above), its position
    table at MAE's pretraining grid (224 px: 14 x 14 + a class row), as ViTDet keeps it."""
    state = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    state["backbone.net.pos_embed"] = torch.randn(1, 1 + 14 * 14, 32)
    return state


def position_term(vit, hw) -> torch.Tensor:
    """What ``vit`` adds to the patch tokens of an input of (h, w) patches: (1, h*w, D) (a
    blank input: the tokens are the conv's bias, so that the subtraction loses nothing)."""
    x = torch.zeros(1, 3, hw[0] * vit.patch_size, hw[1] * vit.patch_size)
    with torch.no_grad():
        return vit._embed(x)[0] - vit.patch_embed(x)


def _save_detector(state: dict, path) -> None:
    """A detector's state as a model zoo .pkl (ViTDet publishes only these: numpy arrays in
    detectron2's checkpoint form) or as a .pth, by the name's suffix."""
    if str(path).endswith(".pkl"):
        zoo = {"model": {k: v.numpy() for k, v in state.items()}, "__author__": "zoo"}
        path.write_bytes(pickle.dumps(zoo))
    else:
        torch.save({"model": state, "iteration": 184374}, path)


@pytest.mark.parametrize("form", ["pth", "pkl"])
def test_a_vitdet_detector_checkpoint_loads_exactly(tmp_path, caplog, form):
    cfg = build_cfg(VITDET_B, TINY)
    state = _vitdet_detector_state(build_model(cfg))
    path = tmp_path / f"model_final.{form}"
    _save_detector(state, path)
    model = build_model(cfg)
    MAECheckpointer(model, whole_model=True).load(str(path))  # everything fits, or raises
    loaded = model.state_dict()
    for k, v in state.items():
        assert torch.equal(loaded[k], v), k
    # the table as ViTDet uses it, at the training grid (1024 / 16 here 64 / 16) and others
    # (it was resized once to the training grid as it loaded: on another grid interpolated
    # twice, up to 1e-2 from ViTDet's values with MAE's table)
    for hw in [(4, 4), (6, 8), (3, 5)]:
        want = vitdet_abs_pos(state["backbone.net.pos_embed"], hw)
        assert torch.allclose(position_term(model.backbone.net, hw), want, atol=1e-6), hw


def test_a_vitdet_detector_loads_into_the_lazy_config_through_detectron2_s_checkpointer(
    tmp_path, caplog
):
    """lazyconfig_train_net's train.init_checkpoint=model_final.pkl: detectron2's own
    DetectionCheckpointer skips a tensor whose shape is not the model's before any load hook
    could see it ('Skip loading parameter backbone.net.pos_embed'): the table was held at
    img_size and kept its initial values. It now has ViTDet's shape, and loads as it is."""
    from detectron2.checkpoint import DetectionCheckpointer

    cfg = LazyConfig.load(os.path.join(CONFIG_DIR, "lazy", "mask_rcnn_vitdet_base_lsj_100ep.py"))
    tiny = dict(embed_dim=32, depth=4, num_heads=2, img_size=64, square_pad=64, window_size=2)
    cfg.model.backbone.update(tiny)
    model = instantiate(cfg.model)
    state = _vitdet_detector_state(model)
    path = tmp_path / "model_final.pkl"
    _save_detector(state, path)
    with caplog.at_level(logging.WARNING):
        DetectionCheckpointer(model).load(str(path))
    assert "Skip loading" not in caplog.text
    loaded = model.state_dict()
    for k, v in state.items():
        assert torch.equal(loaded[k], v), k
    for hw in [(4, 4), (6, 8)]:
        want = vitdet_abs_pos(state["backbone.net.pos_embed"], hw)
        assert torch.allclose(position_term(model.backbone.net, hw), want, atol=1e-6), hw


def test_mae_weights_load_into_the_vit_with_the_report(tmp_path, caplog):
    enc, files = save_mae_checkpoints(tmp_path, img_size=32, patch_size=16, depth=4)
    model = build_model(build_cfg(VITDET_B, TINY))
    with caplog.at_level(logging.INFO, logger="mae_transfer"):
        MAECheckpointer(model).load(files["official"])
    net = model.backbone.net
    assert torch.equal(net.blocks[3].mlp.fc2.weight, enc["blocks.3.mlp.fc2.weight"])
    text = caplog.text
    assert "resized (1): pos_embed (1, 5, 32)->(1, 197, 32)" in text  # to ViTDet's 14 x 14 + 1
    assert "(3): cls_token, norm.weight, norm.bias" in text  # the final norm is not used
    assert "backbone.simfp (32)" in text and "roi_heads.box_predictor (4)" in text
    assert "UNEXPECTED" not in text and "MISSING" not in text
    # as MODEL.VIT.PRETRAINED, read when the model is built
    built = build_model(build_cfg(VITDET_B, TINY + ["MODEL.VIT.PRETRAINED", files["official"]]))
    assert torch.equal(built.backbone.net.blocks[3].mlp.fc2.weight, net.blocks[3].mlp.fc2.weight)


@pytest.mark.parametrize("form", ["pth", "pkl"])
def test_detectors_of_the_other_pyramid_give_their_vit_only(tmp_path, caplog, form):
    """A ViTDet detector (a model zoo .pkl, as ViTDet publishes them, or a .pth) into the
    4-stage model, and a 4-stage detector into the simple one: the ViT loads with the report
    (a .pkl's loaded nothing: it went to detectron2's loading unread), the rest would be
    random, so a whole detector is refused."""
    simple_cfg = build_cfg(VITDET_B, TINY)
    vitdet = tmp_path / f"vitdet.{form}"
    state = _vitdet_detector_state(build_model(simple_cfg))
    _save_detector(state, vitdet)
    four_cfg = build_cfg(FPN_B, TINY + ["MODEL.VIT.OUT_INDICES", "[0, 1, 2, 3]"])
    four = build_model(four_cfg)
    with caplog.at_level(logging.INFO, logger="mae_transfer"):
        MAECheckpointer(four).load(str(vitdet))
    qkv = state["backbone.net.blocks.2.attn.qkv.weight"]
    assert torch.equal(four.backbone.bottom_up.vit.blocks[2].attn.qkv.weight, qkv)
    assert "MAE weights into backbone.bottom_up.vit" in caplog.text
    assert "prefix 'backbone.net.' stripped" in caplog.text
    assert "MISSING" not in caplog.text and "UNEXPECTED" not in caplog.text
    with pytest.raises(CheckpointError, match="holds a ViT but not a detector of this code"):
        MAECheckpointer(build_model(four_cfg), whole_model=True).load(str(vitdet))
    detector = tmp_path / "four_stage.pth"
    torch.save({"model": four.state_dict()}, detector)
    simple = build_model(simple_cfg)
    MAECheckpointer(simple).load(str(detector))
    assert torch.equal(simple.backbone.net.blocks[2].attn.qkv.weight, qkv)
    with pytest.raises(CheckpointError, match="a detector with the other pyramid"):
        MAECheckpointer(build_model(simple_cfg), whole_model=True).load(str(detector))


def test_the_convert_tool_writes_vitdet_s_names(tmp_path):
    _, files = save_mae_checkpoints(tmp_path, img_size=32, patch_size=16, depth=4)
    cfg = build_cfg(VITDET_B, TINY)
    out = tmp_path / "converted.pth"
    convert_to_detectron2(files["official"], str(out), cfg)
    keys = torch.load(out, weights_only=True)["model"]
    assert keys and all(k.startswith("backbone.net.") for k in keys)
    model = build_model(cfg)
    MAECheckpointer(model).load(str(out))
    assert torch.equal(model.backbone.net.pos_embed, keys["backbone.net.pos_embed"])


# -- the config, a training step ---------------------------------------------------------------
def test_the_registered_builder_gives_p2_to_p6():
    cfg = build_cfg(VITDET_B, TINY + ["MODEL.VIT.SQUARE_PAD", "0"])
    bb = BACKBONE_REGISTRY.get("build_mae_vit_simple_fpn_backbone")(cfg, ShapeSpec(channels=3))
    out = bb(torch.randn(1, 3, 128, 96))
    assert {k: tuple(v.shape[-2:]) for k, v in out.items()} == {
        "p2": (32, 24),
        "p3": (16, 12),
        "p4": (8, 6),
        "p5": (4, 3),
        "p6": (2, 2),
    }
    assert all(v.shape[1] == 16 for v in out.values())  # MODEL.FPN.OUT_CHANNELS


def _instances(h: int, w: int) -> Instances:
    inst = Instances((h, w))
    inst.gt_boxes = Boxes(torch.tensor([[4.0, 6.0, 30.0, 40.0], [20.0, 10.0, 50.0, 28.0]]))
    inst.gt_classes = torch.tensor([0, 2])
    masks = torch.zeros(2, h, w, dtype=torch.bool)
    masks[0, 6:40, 4:30] = masks[1, 10:28, 20:50] = True
    inst.gt_masks = BitMasks(masks)
    return inst


def test_the_config_builds_a_mask_rcnn_that_trains_a_step():
    cfg = build_cfg(VITDET_B, TINY + ["SOLVER.LAYER_DECAY", "0.5", "SOLVER.BASE_LR", "1.0"])
    model = build_model(cfg)
    assert type(model).__name__ == "GeneralizedRCNN"
    assert type(model.backbone).__name__ == "MAEViTSimpleFPN"
    assert model.backbone.square_pad == 64  # SQUARE_PAD -1: the LSJ square
    opt = build_optimizer(cfg, model)
    lr = {n: g["lr"] for g in opt.param_groups for n in g["param_names"]}
    # ViTDet's get_vit_lr_decay_rate: embeddings 0, block i at i + 1, the rest at depth + 1
    assert lr["backbone.net.pos_embed"] == pytest.approx(0.5**5)
    assert lr["backbone.net.blocks.0.attn.qkv.weight"] == pytest.approx(0.5**4)
    assert lr["backbone.net.blocks.3.mlp.fc1.weight"] == pytest.approx(0.5)
    assert lr["backbone.simfp_2.0.weight"] == lr["roi_heads.box_predictor.cls_score.weight"] == 1
    for g in opt.param_groups:
        g["lr"] *= 1e-4
    model.train()
    before = model.backbone.simfp_3[0].weight.detach().clone()
    batch = [
        {"image": torch.rand(3, 50, 60) * 255, "instances": _instances(50, 60)},
        {"image": torch.rand(3, 64, 57) * 255, "instances": _instances(64, 57)},
    ]
    from detectron2.utils.events import EventStorage

    with EventStorage():
        losses = model(batch)
    assert {"loss_rpn_cls", "loss_box_reg", "loss_mask"} <= set(losses)
    total = sum(losses.values())
    assert torch.isfinite(total)
    opt.zero_grad()
    total.backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad
    opt.step()
    assert not torch.equal(before, model.backbone.simfp_3[0].weight)


@pytest.mark.parametrize(
    "name, size, depth, global_blocks",
    [
        ("mask_rcnn_vitdet_base_lsj_100ep.yaml", 768, 12, (2, 5, 8, 11)),
        ("mask_rcnn_vitdet_large_lsj_100ep.yaml", 1024, 24, (5, 11, 17, 23)),
        ("mask_rcnn_vitdet_huge_lsj_75ep.yaml", 1280, 32, (7, 15, 23, 31)),
    ],
)
def test_the_vitdet_configs_build_vitdet_s_models(name, size, depth, global_blocks):
    cfg = build_cfg(os.path.join(CONFIG_DIR, name), ["MODEL.DEVICE", "meta"])
    with torch.device("meta"):
        model = build_model(cfg)
    net = model.backbone.net
    assert (net.embed_dim, net.depth, len(net.blocks), net.patch_size) == (size, depth, depth, 16)
    assert net.global_blocks == global_blocks
    assert {b.window_size for i, b in enumerate(net.blocks) if i not in global_blocks} == {14}
    assert net.pos_embed.shape == (1, 1 + 14 * 14, size)  # ViTDet's: MAE's 224 px table
    assert model.backbone.square_pad == 1024
    assert model.backbone.simfp_2[4].weight.shape == (256, size // 4, 1, 1)
    assert len(model.proposal_generator.rpn_head.conv) == 2  # 2-conv RPN head (ViTDet)
    if "huge" in name:  # 75 epochs: ViTDet's H schedule, 3/4 of the 100-epoch one
        assert cfg.SOLVER.MAX_ITER == 184375 * 3 // 4
        assert tuple(cfg.SOLVER.STEPS) == (163889 * 3 // 4, 177546 * 3 // 4)


# -- bad values ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "opts, expected",
    [
        (
            ["MODEL.VIT.OUT_INDICES", "[0, 1, 2, 3]"],
            "MODEL.VIT.OUT_INDICES [0, 1, 2, 3] are stage ends of the 4-stage pyramid; "
            "build_mae_vit_simple_fpn_backbone builds every level from the last block: set it "
            "to []",
        ),
        (["MODEL.VIT.OUT_INDICES", "[3]"], "MODEL.VIT.OUT_INDICES [3] are stage ends"),
        (
            ["MODEL.FPN.NORM", "LayerNorm"],
            "MODEL.FPN.NORM (the norm of the simple pyramid's convs) must be one of",
        ),
        (["MODEL.FPN.OUT_CHANNELS", "0"], "MODEL.FPN.OUT_CHANNELS (the simple pyramid's output"),
        (
            ["MODEL.ROI_HEADS.IN_FEATURES", "['res4']"],
            "MODEL.ROI_HEADS.IN_FEATURES ['res4'] must be among the simple pyramid's outputs "
            "['p2', 'p3', 'p4', 'p5', 'p6']",
        ),
        (
            ["MODEL.ROI_HEADS.NAME", "Res5ROIHeads"],
            "use 'StandardROIHeads' on the simple pyramid",
        ),
        (
            ["MODEL.VIT.SIZE_OVERRIDES", "[['embed_dim', 36], ['depth', 4], ['num_heads', 2]]"]
            + ["MODEL.VIT.PATCH_SIZE", "32"],
            "the x8 level halves the channels 3 times: width 36 is not divisible by 8",
        ),
        (["MODEL.VIT.PATCH_SIZE", "12"], "patch size 12 cannot reach strides"),
    ],
)
def test_bad_config_values_get_clear_errors(opts, expected):
    with pytest.raises(ConfigError) as e:
        build_cfg(VITDET_B, TINY + opts)
    assert expected in str(e.value)
    if "OUT_INDICES" in expected:  # one error, not also the 4-stage one
        assert "must be 4 increasing indices" not in str(e.value)


def test_a_config_of_one_s_own_is_refused_when_the_model_is_built():
    """A trainer of one's own does not call validate_config: the builder checks."""
    from detectron2.config import get_cfg

    from mae_transfer.detection import add_mae_vit_config

    cfg = add_mae_vit_config(get_cfg())
    cfg.MODEL.BACKBONE.NAME = "build_mae_vit_simple_fpn_backbone"
    cfg.MODEL.DEVICE = "cpu"
    with pytest.raises(ValueError) as e:
        build_model(cfg)
    said = str(e.value)
    assert "INPUT.FORMAT must be 'RGB'" in said and "leaves the pixels unnormalised" in said
    assert "MODEL.RPN.IN_FEATURES ['res4'] must be among the simple pyramid's outputs" in said
    assert "MODEL.FPN.IN_FEATURES" not in said  # the simple pyramid reads none


def test_an_encoder_of_another_width_is_named():
    vit = create_model("vit_base_patch16", embed_dim=48, depth=4, num_heads=2, img_size=64)
    with pytest.raises(CheckpointError, match="wrong model size"):
        load_pretrained(tiny_simple().net, vit.state_dict())
