"""The detectron2 backbone: shapes, configs, weights, a short training run with evaluation."""

from __future__ import annotations

import glob
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

pytest.importorskip("detectron2")

import mae_transfer.detection  # noqa: E402,F401  (compat fixes before detectron2's imports)

# isort: split
from conftest import (  # noqa: E402
    ROOT,
    TINY_MAE,
    RunsCode,
    save_mae_checkpoints,
    write_deep_colour_png,
)
from detectron2.config import LazyConfig, instantiate  # noqa: E402
from detectron2.layers import ShapeSpec  # noqa: E402
from detectron2.modeling import BACKBONE_REGISTRY, build_model  # noqa: E402
from detectron2.modeling.roi_heads import CascadeROIHeads  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from mae_transfer import VIT_SIZES, create_model, load_pretrained  # noqa: E402
from mae_transfer.checkpoint import CheckpointError  # noqa: E402
from mae_transfer.datasets import write_toy_coco  # noqa: E402
from mae_transfer.detection import MAECheckpointer, MAEViTBackbone, convert_to_detectron2  # noqa: E402
from mae_transfer.detection.train import (  # noqa: E402
    Trainer,
    build_cfg,
    build_optimizer,
    register_coco_datasets,  # noqa: E402
)
from mae_transfer.engine.config import ConfigError  # noqa: E402
from mae_transfer.optim import keep_optimizer_impl  # noqa: E402

CONFIG_DIR = os.path.join(ROOT, "configs", "detectron2")
TINY_CONFIG = os.path.join(CONFIG_DIR, "demo_tiny.yaml")
TINY_OPTS = ["MODEL.VIT.SIZE_OVERRIDES", "[['embed_dim', 32], ['depth', 4], ['num_heads', 2]]"]


def tiny_backbone(**kw) -> MAEViTBackbone:
    args = dict(model="vit_base_patch16", embed_dim=32, depth=4, num_heads=2, img_size=64)
    return MAEViTBackbone(**{**args, **kw})


@pytest.mark.parametrize("hw", [(64, 64), (70, 90), (33, 130)])
@pytest.mark.parametrize("patch", [16, 8])
def test_output_names_strides_channels_odd_sizes(hw, patch):
    bb = tiny_backbone(patch_size=patch, window_size=2, rel_pos="decomposed", norm="LN")
    out = bb(torch.randn(1, 3, *hw))
    assert list(out) == ["res2", "res3", "res4", "res5"]
    shapes = bb.output_shape()
    for name, stride in zip(out, (4, 8, 16, 32)):
        assert shapes[name].stride == stride and shapes[name].channels == 32
        grid = (-(-hw[0] // patch), -(-hw[1] // patch))
        factor = patch / stride
        expect = [int(g * factor) if factor >= 1 else -(-g // int(1 / factor)) for g in grid]
        assert list(out[name].shape) == [1, 32, *expect], name
        assert torch.isfinite(out[name]).all(), name
    assert bb.size_divisibility == 32


def test_patch14_model_is_used_as_patch16():
    bb = MAEViTBackbone(model="vit_huge_patch14", embed_dim=32, depth=4, num_heads=2, img_size=64)
    assert bb.vit.patch_size == 16
    assert bb(torch.randn(1, 3, 64, 64))["res5"].shape == (1, 32, 2, 2)
    mae = create_model("mae_vit_huge_patch14", img_size=56, **{**TINY_MAE, "depth": 4})
    report = load_pretrained(bb.vit, mae.state_dict())
    assert "patch_embed.proj.weight (32, 3, 14, 14)->(32, 3, 16, 16)" in report.resized


@pytest.mark.parametrize("hw", [(70, 90), (33, 130)])
def test_patch14_model_at_odd_sizes(hw):
    bb = MAEViTBackbone(model="vit_huge_patch14", embed_dim=32, depth=4, num_heads=2, img_size=64)
    out = bb(torch.randn(1, 3, *hw))
    grid = (-(-hw[0] // 16), -(-hw[1] // 16))
    assert out["res4"].shape[-2:] == grid and out["res2"].shape[-2:] == (4 * grid[0], 4 * grid[1])


def test_other_non_power_of_two_patch_sizes_are_rejected():
    with pytest.raises(ValueError, match="patch size 12 cannot reach strides"):
        tiny_backbone(patch_size=12)


def test_every_parameter_gets_a_gradient():
    """DDP (find_unused_parameters=False, detectron2's default) needs it: the ViT's final norm
    and blocks after the last stage are removed, not left without gradients."""
    bb = tiny_backbone(depth=5, out_indices=(0, 1, 2, 3), window_size=2, rel_pos="decomposed")
    assert len(bb.vit.blocks) == 4 and not list(bb.vit.norm.parameters())
    # (a random direction: a plain sum of normalised maps can have a zero gradient)
    sum((o * torch.randn_like(o)).sum() for o in bb(torch.randn(2, 3, 64, 64)).values()).backward()
    no_grad = [n for n, p in bb.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad
    # (where a gradient is zero, rounding leaves ~1e-6; the smallest real ones here are ~1)
    zero = [n for n, p in bb.named_parameters() if p.requires_grad and p.grad.abs().max() < 1e-3]
    assert not zero, f"zero gradient on {zero}"
    vit = create_model(
        "vit_base_patch16", embed_dim=32, depth=5, num_heads=2, img_size=64, class_token=False
    )
    report = load_pretrained(bb.vit, vit.state_dict())
    assert "blocks.4.mlp.fc2.weight" in report.dropped and "norm.weight" in report.dropped
    assert not report.unexpected and not report.missing


def test_square_pad_puts_test_images_on_the_training_grid():
    """Smaller (test) inputs are padded to the LSJ square, as ViTDet; never stretched."""
    bb = tiny_backbone(square_pad=64, window_size=2, rel_pos="decomposed").eval()
    ref = tiny_backbone(window_size=2, rel_pos="decomposed").eval()
    ref.load_state_dict(bb.state_dict())
    x = torch.randn(1, 3, 64, 40)
    out = bb(x)
    expect = ref(torch.nn.functional.pad(x, (0, 24)))
    assert out["res4"].shape[-2:] == (4, 4)
    for k in out:
        assert torch.allclose(out[k], expect[k], atol=1e-6)
    assert bb.padding_constraints["square_size"] == 64
    cfg = build_cfg(TINY_CONFIG, TINY_OPTS)
    from mae_transfer.detection.backbone import backbone_kwargs

    assert backbone_kwargs(cfg)["square_pad"] == cfg.INPUT.LSJ.IMAGE_SIZE  # -1: the LSJ size


def test_fpn_backbone_registered_and_gives_p2_to_p6():
    cfg = build_cfg(TINY_CONFIG, TINY_OPTS + ["MODEL.VIT.SQUARE_PAD", "0"])  # no square padding
    fpn = BACKBONE_REGISTRY.get("build_mae_vit_fpn_backbone")(cfg, ShapeSpec(channels=3))
    out = fpn(torch.randn(2, 3, 128, 96))
    assert {k: v.shape[-2:] for k, v in out.items()} == {
        "p2": (32, 24),
        "p3": (16, 12),
        "p4": (8, 6),
        "p5": (4, 3),
        "p6": (2, 2),
    }


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(CONFIG_DIR, "*.yaml"))))
def test_every_yaml_config_builds_a_model(path):
    if os.path.basename(path).startswith("Base-"):
        pytest.skip("base file")
    cfg = build_cfg(path, ["MODEL.DEVICE", "meta"])
    with torch.device("meta"):
        model = build_model(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert n > 1e5
    if cfg.MODEL.BACKBONE.NAME == "build_mae_vit_simple_fpn_backbone":  # ViTDet's, no FPN
        assert type(model.backbone).__name__ == "MAEViTSimpleFPN"
        vit = model.backbone.net
    else:
        assert type(model.backbone.bottom_up).__name__ == "MAEViTBackbone"
        vit = model.backbone.bottom_up.vit
    # the ViT of the size the file is named after (demo_tiny: sized in the file)
    size = re.search(r"_(base|large|huge)_", os.path.basename(path))
    assert size or os.path.basename(path) == "demo_tiny.yaml"
    if size:
        built = dict(embed_dim=vit.embed_dim, depth=len(vit.blocks))
        built["num_heads"] = vit.blocks[0].attn.num_heads
        assert built == VIT_SIZES[size.group(1)]


CASCADE = [
    "MODEL.ROI_HEADS.NAME",
    "CascadeROIHeads",
    "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG",
    "True",
]


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(CONFIG_DIR, "cascade_*.yaml"))))
def test_cascade_configs_build_three_stages_on_the_mask_rcnn_recipe(path):
    cfg = build_cfg(path, ["MODEL.DEVICE", "meta"])
    plain = build_cfg(path.replace("cascade_", ""), ["MODEL.DEVICE", "meta"])
    with torch.device("meta"):
        heads = build_model(cfg).roi_heads
    lvis = cfg.MODEL.ROI_BOX_HEAD.USE_FED_LOSS  # the LVIS cascades: a fed-loss predictor per stage
    name = "SigmoidCascadeROIHeads" if lvis else "CascadeROIHeads"
    assert type(heads).__name__ == name and heads.num_cascade_stages == 3
    predictor = "SigmoidFastRCNNOutputLayers" if lvis else "FastRCNNOutputLayers"
    assert [type(p).__name__ for p in heads.box_predictor] == [predictor] * 3
    assert [m.thresholds[1] for m in heads.proposal_matchers] == [0.5, 0.6, 0.7]
    assert [p.box2box_transform.weights for p in heads.box_predictor] == [
        (10, 10, 5, 5),
        (20, 20, 10, 10),
        (30, 30, 15, 15),
    ]
    # everything else is the Mask R-CNN recipe of the same size
    assert cfg.SOLVER == plain.SOLVER and cfg.MODEL.VIT == plain.MODEL.VIT
    assert cfg.INPUT == plain.INPUT and cfg.MODEL.ROI_BOX_HEAD.NUM_CONV == 4


def test_a_cascade_detector_trains_on_the_vit_pyramid(toy_coco, tmp_path):
    cfg = _cfg(toy_coco, tmp_path / "out", iters=2)
    cfg.defrost()
    cfg.merge_from_list(CASCADE + ["TEST.EVAL_PERIOD", "0"])
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    last = trainer.storage.latest()
    stages = [k for k in last if k.startswith("loss_box_reg_stage")]
    assert sorted(stages) == ["loss_box_reg_stage0", "loss_box_reg_stage1", "loss_box_reg_stage2"]
    assert all(math.isfinite(last[k][0]) for k in stages + ["total_loss", "loss_mask"])


@pytest.mark.parametrize(
    "opts, expected",
    [  # each an AssertionError naming no key, from detectron2's CascadeROIHeads
        (
            ["MODEL.ROI_HEADS.NAME", "CascadeROIHeads"],
            "set MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG True",
        ),
        (
            [*CASCADE, "MODEL.ROI_BOX_CASCADE_HEAD.IOUS", "(0.5, 0.7)"],
            "MODEL.ROI_BOX_CASCADE_HEAD: 2 IOUS but 3 BBOX_REG_WEIGHTS",
        ),
        (
            [*CASCADE, "MODEL.ROI_BOX_CASCADE_HEAD.IOUS", "(0.4, 0.6, 0.7)"],
            "IOUS starts at 0.4: the first stage matches at MODEL.ROI_HEADS.IOU_THRESHOLDS' 0.5",
        ),
    ],
)
def test_cascade_values_detectron2_asserts_are_named(opts, expected):
    with pytest.raises(ConfigError, match=re.escape(expected)):
        build_cfg(TINY_CONFIG, opts)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(CONFIG_DIR, "lazy", "*.py"))))
def test_every_lazy_config_builds_a_model(path):
    cfg = LazyConfig.load(path)
    tiny = dict(embed_dim=32, depth=8, num_heads=2, img_size=64, square_pad=64)
    simple = "vitdet" in os.path.basename(path)  # ViTDet's pyramid, no FPN
    if simple:
        cfg.model.backbone.update(tiny)
    else:
        cfg.model.backbone.bottom_up.update(tiny, out_indices=None)
    _without_training_set_counts(cfg)
    model = instantiate(cfg.model)
    if simple:
        assert type(model.backbone).__name__ == "MAEViTSimpleFPN"
        vit = model.backbone.net
    else:
        assert type(model.backbone.bottom_up).__name__ == "MAEViTBackbone"
        vit = model.backbone.bottom_up.vit
    # the stage ends of 8 blocks global, the others in windows of 14
    assert [b.window_size for b in vit.blocks] == [14, 0] * 4
    assert list(model.backbone.output_shape()) == ["p2", "p3", "p4", "p5", "p6"]
    assert len(model.proposal_generator.rpn_head.conv) == 2  # 2-conv RPN head (ViTDet)
    # lazyconfig_train_net's way: params.model set; the lr overridden as in ViTDet's configs
    # (`optimizer.lr=...`), which every layer-decayed group must follow
    cfg.optimizer.params.model = model
    LazyConfig.apply_overrides(cfg, ["optimizer.lr=3e-4"])
    opt = instantiate(cfg.optimizer)
    assert opt.defaults["lr"] == 3e-4
    assert max(g["lr"] for g in opt.param_groups) == pytest.approx(3e-4)


def _without_training_set_counts(cfg) -> None:
    """An LVIS LazyConfig's fed loss counts its classes in the training set as the model is
    built (tests/test_detection_lvis.py): here, where LVIS is not at hand, it is not asked to."""
    for predictor in _lazy_predictors(cfg):
        if "fed_loss_datasets" in predictor:
            predictor.fed_loss_datasets = []


def _lazy_predictors(cfg) -> list:
    """A LazyConfig's box predictor configs: the Mask R-CNN's one, or the cascade's per stage."""
    heads = cfg.model.roi_heads
    return list(heads.box_predictors) if "box_predictors" in heads else [heads.box_predictor]


def test_the_lazy_config_evaluates_with_the_pure_python_build(toy_coco, tmp_path):
    """Its evaluator kept the R-50 recipe's fast C++ COCOeval: without compiled ops the run
    died at its first evaluation (iteration 5,000)."""
    from detectron2.data import DatasetCatalog
    from detectron2.structures import Boxes, Instances

    from mae_transfer.compat.detectron2_compat import HAS_COMPILED_OPS

    _cfg(toy_coco, tmp_path / "out")  # registers toy_coco_val
    cfg = LazyConfig.load(os.path.join(CONFIG_DIR, "lazy", "mask_rcnn_vit_base_fpn_lsj_100ep.py"))
    assert cfg.dataloader.evaluator.use_fast_impl == HAS_COMPILED_OPS
    cfg.dataloader.evaluator.update(dataset_name="toy_coco_val", output_dir=str(tmp_path))
    cfg.dataloader.evaluator.tasks = ("bbox",)
    evaluator = instantiate(cfg.dataloader.evaluator)
    evaluator.reset()
    record = DatasetCatalog.get("toy_coco_val")[0]
    found = Instances((record["height"], record["width"]))
    found.pred_boxes = Boxes(torch.tensor([record["annotations"][0]["bbox"]], dtype=torch.float))
    found.pred_boxes.tensor[:, 2:] += found.pred_boxes.tensor[:, :2]  # XYWH -> XYXY
    found.scores, found.pred_classes = torch.tensor([0.9]), torch.tensor([0])
    evaluator.process([{"image_id": record["image_id"]}], [{"instances": found}])
    assert "AP" in evaluator.evaluate()["bbox"]


def test_amp_trainer_runs_the_chosen_precision():
    """SOLVER.AMP.PRECISION: bf16 steps without loss scaling (checked on CPU with a toy model)."""
    from detectron2.utils.events import EventStorage

    from mae_transfer.detection.train import PrecisionAMPTrainer

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(8, 8)

        def forward(self, x):
            y = self.fc(x)
            assert y.dtype == torch.bfloat16  # autocast is on
            return {"loss": y.float().pow(2).mean()}

    model = Toy()
    before = model.fc.weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    t = PrecisionAMPTrainer(model, [torch.randn(4, 8)] * 2, opt, torch.bfloat16, "cpu")
    assert not t.grad_scaler.is_enabled()
    with EventStorage():
        t.run_step()
    assert not torch.equal(before, model.fc.weight)
    with pytest.raises(ValueError, match="SOLVER.AMP.PRECISION must be one of"):
        build_cfg(TINY_CONFIG, ["SOLVER.AMP.PRECISION", "fp8"])


def test_bad_config_values_get_clear_errors():
    with pytest.raises(ValueError, match="MODEL.VIT.NORM must be one of"):
        build_cfg(TINY_CONFIG, ["MODEL.VIT.NORM", "BatchNorm"])
    with pytest.raises(ValueError, match="MODEL.VIT.NAME: unknown model 'vit_gigantic'"):
        build_cfg(TINY_CONFIG, ["MODEL.VIT.NAME", "vit_gigantic"])
    with pytest.raises(ValueError, match="SOLVER.LAYER_DECAY must be in"):
        build_cfg(TINY_CONFIG, ["SOLVER.LAYER_DECAY", "1.5"])
    # the padded square must divide by 32 (a 100 px one trained, then a 100 x 70 test image
    # failed in FPN: stride-16 map 7 wide, upsampled stride-32 map 8)
    with pytest.raises(ValueError, match="INPUT.LSJ.IMAGE_SIZE must be a positive multiple of 32"):
        build_cfg(TINY_CONFIG, ["INPUT.LSJ.ENABLED", "True", "INPUT.LSJ.IMAGE_SIZE", "100"])
    with pytest.raises(ValueError, match="square_pad must be 0 or a multiple of 32, got 100"):
        tiny_backbone(square_pad=100)


def test_a_config_of_one_s_own_on_detectron2_s_defaults_is_refused_naming_the_keys():
    """get_cfg() + add_mae_vit_config + our backbone: detectron2's ResNet defaults (BGR,
    PIXEL_STD 1: ~58x MAE's input scale) trained without a word; an empty FPN.IN_FEATURES and
    a C4 model's heads were a bare AssertionError / KeyError in build_model."""
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from mae_transfer.detection import add_mae_vit_config, validate_config

    cfg = add_mae_vit_config(get_cfg())
    cfg.MODEL.BACKBONE.NAME = "build_mae_vit_fpn_backbone"
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.DEVICE = "cpu"
    with pytest.raises(ValueError) as e:
        validate_config(cfg)
    said = str(e.value)
    assert "INPUT.FORMAT must be 'RGB' for the MAE ViT (pretrained on RGB), got 'BGR'" in said
    assert "PIXEL_STD [1.0, 1.0, 1.0] leaves the pixels unnormalised" in said
    assert "set PIXEL_MEAN [123.675, 116.28, 103.53] and PIXEL_STD [58.395, 57.12, 57.375]" in said
    assert "MODEL.FPN.IN_FEATURES []: the FPN reads the ViT pyramid's maps" in said
    assert "MODEL.ROI_HEADS.NAME 'Res5ROIHeads' is for ResNet-C4 models" in said
    with pytest.raises(ValueError, match="the MAE ViT backbone cannot work with"):
        build_model(cfg)  # a trainer of one's own does not call validate_config
    cfg.INPUT.FORMAT = "RGB"
    cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]
    cfg.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.ROI_HEADS.NAME = "StandardROIHeads"
    with pytest.raises(ValueError, match=r"MODEL.RPN.IN_FEATURES \['res4'\] must be among the "):
        validate_config(cfg)  # a C4 model's: 'res4' was a KeyError in build_model
    cfg.MODEL.RPN.IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
    cfg.MODEL.ROI_HEADS.IN_FEATURES = ["p2", "p3", "p4", "p5"]
    validate_config(cfg)
    cfg.MODEL.ROI_BOX_HEAD.NAME, cfg.MODEL.ROI_BOX_HEAD.NUM_FC = "FastRCNNConvFCHead", 2
    cfg.MODEL.VIT.SIZE_OVERRIDES = [["embed_dim", 32], ["depth", 4], ["num_heads", 2]]
    build_model(cfg)
    # another meta-architecture: only the keys its heads read
    retina = cfg.clone()
    retina.MODEL.META_ARCHITECTURE = "RetinaNet"
    retina.MODEL.RPN.IN_FEATURES, retina.MODEL.ROI_HEADS.NAME = ["res4"], "Res5ROIHeads"
    with pytest.raises(ValueError) as e:  # our FPN makes P2-P6: RetinaNet's P7 was a KeyError
        validate_config(retina)
    said = str(e.value)
    assert "MODEL.RETINANET.IN_FEATURES ['p3', 'p4', 'p5', 'p6', 'p7'] must be among" in said
    assert "RPN" not in said and "ROI_HEADS" not in said
    retina.MODEL.RETINANET.IN_FEATURES = ["p3", "p4", "p5", "p6"]
    validate_config(retina)
    # FPN inputs detectron2's FPN cannot take (strides not doubling): named, not an assertion
    cfg.MODEL.FPN.IN_FEATURES = ["res2", "res4", "res5"]
    with pytest.raises(ValueError, match=r"IN_FEATURES \['res2', 'res4', 'res5'\]: .* in order"):
        validate_config(cfg)
    cfg.MODEL.FPN.IN_FEATURES = ["res3", "res4", "res5"]  # a run of them: P3-P6
    cfg.MODEL.RPN.IN_FEATURES = ["p3", "p4", "p5", "p6"]
    cfg.MODEL.ROI_HEADS.IN_FEATURES = ["p3", "p4", "p5"]
    validate_config(cfg)


def test_detectron2_s_own_default_trainer_is_said_to_read_none_of_our_keys(
    toy_coco, tmp_path, caplog
):
    """A DefaultTrainer of one's own trained SGD without layer decay at the AdamW lr, silently
    (SOLVER.OPTIMIZER / LAYER_DECAY are read by our Trainer only)."""
    from detectron2.engine import DefaultTrainer
    from detectron2.modeling import build_model

    from mae_transfer.detection import Trainer

    class Mine(DefaultTrainer):
        pass

    cfg = _cfg(toy_coco, tmp_path / "out")
    with caplog.at_level(logging.WARNING, logger="mae_transfer"):
        Trainer(cfg)  # ours, and a model built outside a trainer: nothing said
        build_model(cfg)
        assert "DefaultTrainer" not in caplog.text
        mine = Mine(cfg)
    assert "Mine is detectron2's DefaultTrainer, which reads none of our config keys" in (
        caplog.text
    )
    assert type(mine.optimizer).__name__ == "SGD"  # what it said


def test_other_pixel_statistics_are_warned_about_not_refused(caplog):
    """A ViT pretrained on other statistics may want them (a refusal had no way out)."""
    from detectron2.config import get_cfg

    from mae_transfer.detection import add_mae_vit_config, validate_config

    cfg = add_mae_vit_config(get_cfg())
    cfg.merge_from_file(os.path.join(CONFIG_DIR, "Base-MaskRCNN-MAE-ViT-FPN.yaml"))
    cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD = [110.0, 110.0, 110.0], [60.0, 60.0, 60.0]
    with caplog.at_level(logging.WARNING):
        validate_config(cfg)
    assert "MODEL.PIXEL_MEAN [110.0, 110.0, 110.0] / PIXEL_STD [60.0, 60.0, 60.0] are not" in (
        caplog.text
    )


@pytest.mark.parametrize(
    "opts, expected",
    [  # each trained silently or failed later with a message that named no key
        (["SOLVER.WEIGHT_DECAY", "-1.0"], "SOLVER.WEIGHT_DECAY must be >= 0, got -1.0"),
        (["SOLVER.MAX_ITER", "0"], "SOLVER.MAX_ITER must be > 0, got 0"),
        (["SOLVER.IMS_PER_BATCH", "0"], "SOLVER.IMS_PER_BATCH must be > 0, got 0"),
        (["SOLVER.CHECKPOINT_PERIOD", "0"], "SOLVER.CHECKPOINT_PERIOD must be > 0, got 0"),
        (["DATALOADER.NUM_WORKERS", "-1"], "DATALOADER.NUM_WORKERS must be >= 0, got -1"),
        (["MODEL.BACKBONE.FREEZE_AT", "2"], "MODEL.BACKBONE.FREEZE_AT 2 is not read by the ViT"),
        (["MODEL.VIT.NAME", "mae_vit_base_patch16"], "name its encoder, 'vit_base_patch16'"),
        (
            ["MODEL.VIT.SIZE_OVERRIDES", "[['embed_dim', '64']]"],
            "entries are [key, number], numbers unquoted",
        ),
    ],
)
def test_values_detectron2_would_take_or_fail_on_late_are_named(opts, expected):
    with pytest.raises(ConfigError, match=re.escape(expected)):
        build_cfg(TINY_CONFIG, opts)


def test_several_processes_without_a_gpu_are_refused_before_launching(toy_coco, tmp_path, caplog):
    if torch.cuda.is_available():
        pytest.skip("the machine has a GPU")
    argv = ["--config-file", TINY_CONFIG, "--num-gpus", "2", "--coco-train", *toy_coco["train"]]
    argv += ["--coco-val", *toy_coco["val"], *TINY_OPTS]
    code = load_tool("train_det").cli(argv + ["OUTPUT_DIR", str(tmp_path / "out")])
    _refused(caplog, code, "--num-gpus 2: detectron2 starts one process per GPU", "no CUDA GPU")


def test_global_blocks_default_to_the_stage_ends_and_none_means_all_windowed():
    from mae_transfer.detection.backbone import backbone_kwargs

    def vit_of(opts):
        cfg = build_cfg(TINY_CONFIG, TINY_OPTS + ["MODEL.VIT.WINDOW_SIZE", "2"] + opts)
        return MAEViTBackbone(**backbone_kwargs(cfg)).vit

    default = vit_of([])
    assert default.global_blocks == (0, 1, 2, 3)  # the tiny model's stage ends
    none = vit_of(["MODEL.VIT.GLOBAL_BLOCKS", '["none"]'])
    assert none.global_blocks == () and all(b.window_size == 2 for b in none.blocks)
    # Python: None or empty = the stage ends (as before), "none" = every block windowed
    assert tiny_backbone(window_size=2, global_blocks=()).vit.global_blocks == (0, 1, 2, 3)
    assert tiny_backbone(window_size=2, global_blocks="none").vit.global_blocks == ()
    with pytest.raises(ValueError, match="block indices or 'none'"):
        tiny_backbone(window_size=2, global_blocks="all")
    assert vit_of(["MODEL.VIT.GLOBAL_BLOCKS", "[1]"]).global_blocks == (1,)
    with pytest.raises(ValueError, match=r'GLOBAL_BLOCKS must be block indices or \["none"\]'):
        build_cfg(TINY_CONFIG, ["MODEL.VIT.GLOBAL_BLOCKS", '["all"]'])


def test_lsj_training_crops_are_padded_like_test_images_not_with_grey():
    """detectron2's FixedSizeCrop pads with 128 by default; the model pads (after
    normalisation) with zeros, the mean pixel, which is what test images get."""
    import numpy as np
    from detectron2.data import transforms as T

    from mae_transfer.detection.train import build_augmentations

    opts = TINY_OPTS + ["INPUT.LSJ.ENABLED", "True", "INPUT.LSJ.MIN_SCALE", "0.25",
                        "INPUT.LSJ.MAX_SCALE", "0.25"]  # fmt: skip
    augs = build_augmentations(build_cfg(TINY_CONFIG, opts), is_train=True)
    image = np.full((96, 96, 3), 255, np.uint8)
    out = T.AugInput(image)
    T.AugmentationList(augs)(out)
    assert out.image.shape[:2] == (24, 24) and (out.image == 255).all()  # smaller, no grey
    lazy = LazyConfig.load(os.path.join(CONFIG_DIR, "lazy", "mask_rcnn_vit_base_fpn_lsj_100ep.py"))
    crops = [a for a in lazy.dataloader.train.mapper.augmentations if "crop_size" in a]
    assert len(crops) == 1 and crops[0].pad is False


def test_images_are_read_as_detectron2_reads_them_but_deep_ones_stretched(tmp_path):
    """8-bit images (EXIF orientation included) come out exactly as detectron2 reads them; a
    12-bit scan in a 16-bit PNG, which detectron2 clips to almost all white, is stretched."""
    import numpy as np
    from detectron2.data.detection_utils import read_image as detectron2_read_image
    from PIL import Image

    from mae_transfer.data.decode import stretch_to_uint8
    from mae_transfer.detection.data import read_image

    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise
    photo.save(tmp_path / "turned.jpg", exif=exif)
    Image.fromarray(rng.integers(0, 256, (20, 30), dtype=np.uint8)).save(tmp_path / "grey.png")
    for name in ("turned.jpg", "grey.png"):
        for fmt in ("BGR", "RGB", "L"):
            ours = read_image(str(tmp_path / name), format=fmt)
            np.testing.assert_array_equal(ours, detectron2_read_image(str(tmp_path / name), fmt))
    assert read_image(str(tmp_path / "turned.jpg"), "BGR").shape == (30, 20, 3)

    scan = np.linspace(0, 4095, 20 * 30).reshape(20, 30).astype(np.uint16)
    Image.fromarray(scan).save(tmp_path / "scan.png")  # mode I;16
    assert (detectron2_read_image(str(tmp_path / "scan.png"), "BGR") == 255).mean() > 0.9
    ours = read_image(str(tmp_path / "scan.png"), "BGR")
    assert ours.shape == (20, 30, 3) and ours.min() == 0 and ours.max() == 255
    np.testing.assert_allclose(ours[..., 0], scan / 4095 * 255, atol=0.51)
    # a 16-bit colour PNG with an orientation tag: reading the tag first (PIL loads a PNG
    # for it) hid the 16 bits, and the image came out as each value's high byte (0..15)
    colour = np.stack([scan, scan // 2, 4095 - scan], axis=-1)
    write_deep_colour_png(tmp_path / "turned.png", colour, orientation=6)
    ours = read_image(str(tmp_path / "turned.png"), "RGB")
    assert ours.shape == (30, 20, 3)
    np.testing.assert_array_equal(ours, np.rot90(stretch_to_uint8(colour), -1))


def test_the_mapper_skips_unreadable_training_images_blanks_test_ones(toy_coco, tmp_path, caplog):
    """A truncated image stopped detectron2's training (and evaluation) when drawn; now it is
    named: skipped in training, scored as a blank image in evaluation. Readable images map
    as detectron2's DatasetMapper maps them."""

    from detectron2.data import DatasetCatalog, DatasetMapper

    from mae_transfer.detection.data import ImageMapper
    from mae_transfer.detection.train import build_augmentations, build_mapper

    cfg = _cfg(toy_coco, tmp_path / "out")
    record = dict(DatasetCatalog.get("toy_coco_train")[0])
    augs = build_augmentations(cfg, is_train=False)  # deterministic (training's flips are not)
    for is_train in (True, False):
        theirs = DatasetMapper(cfg, is_train=is_train, augmentations=augs)(record)
        ours = ImageMapper(cfg, is_train=is_train, augmentations=augs)(record)
        assert torch.equal(ours["image"], theirs["image"]) and ours.keys() == theirs.keys()
        if is_train:
            for field in ("gt_boxes", "gt_classes", "gt_masks"):
                a, b = ours["instances"].get(field), theirs["instances"].get(field)
                assert torch.equal(getattr(a, "tensor", a), getattr(b, "tensor", b))

    broken = tmp_path / "broken.jpg"
    shutil.copy(record["file_name"], broken)
    broken.write_bytes(broken.read_bytes()[:200])
    record["file_name"] = str(broken)
    with caplog.at_level(logging.WARNING):
        assert build_mapper(cfg, True)(record) is None
        blank = build_mapper(cfg, False)(record)
    assert "broken.jpg" in caplog.text and "skipped" in caplog.text and "blank" in caplog.text
    assert blank["image"].shape[0] == 3 and "annotations" not in blank


def test_a_skipped_training_image_is_replaced_by_another():
    """detectron2's map-style MapDataset draws the replacement with random.sample from a set,
    a TypeError since Python 3.11 (the compat fix)."""
    from detectron2.data.common import MapDataset

    data = MapDataset(list(range(5)), lambda i: None if i == 0 else i)
    assert all(data[0] in range(1, 5) for _ in range(5))


def test_a_missing_weights_file_is_named_before_anything_is_built(tmp_path):
    from mae_transfer.detection.train import check_weights

    opts = TINY_OPTS + ["MODEL.WEIGHTS", str(tmp_path / "nope.pth"), "OUTPUT_DIR", str(tmp_path)]
    cfg = build_cfg(TINY_CONFIG, opts)
    with pytest.raises(ConfigError, match="MODEL.WEIGHTS .*nope.pth' does not exist"):
        check_weights(cfg, resume=False)
    with pytest.raises(ConfigError, match="nope.pth' does not exist .and --resume found no .*"):
        check_weights(cfg, resume=True)  # nothing to resume from either: said
    (tmp_path / "last_checkpoint").write_text("model_0000009.pth")
    check_weights(cfg, resume=True)  # --resume continues from OUTPUT_DIR instead
    cfg.MODEL.WEIGHTS = ""
    check_weights(cfg, resume=False)  # training from scratch
    with pytest.raises(ConfigError, match="--eval-only needs MODEL.WEIGHTS"):
        check_weights(cfg, resume=False, eval_only=True)  # evaluating a random detector


def test_layer_decay_param_groups():
    cfg = build_cfg(TINY_CONFIG, TINY_OPTS + ["SOLVER.LAYER_DECAY", "0.5", "SOLVER.BASE_LR", "1.0"])
    model = build_model(cfg)
    opt = build_optimizer(cfg, model)
    lr = {n: g["lr"] for g in opt.param_groups for n in g["param_names"]}
    wd = {n: g["weight_decay"] for g in opt.param_groups for n in g["param_names"]}
    vit = "backbone.bottom_up.vit."
    assert lr[vit + "patch_embed.proj.weight"] == pytest.approx(0.5**5)
    assert lr[vit + "blocks.0.attn.qkv.weight"] == pytest.approx(0.5**4)
    assert lr[vit + "blocks.3.mlp.fc1.weight"] == pytest.approx(0.5)
    assert lr["roi_heads.box_predictor.cls_score.weight"] == pytest.approx(1.0)
    assert wd[vit + "pos_embed"] == 0 and wd[vit + "blocks.0.norm1.weight"] == 0
    assert wd[vit + "blocks.0.attn.qkv.weight"] == cfg.SOLVER.WEIGHT_DECAY


@pytest.fixture(scope="module")
def toy_coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy_coco")
    return write_toy_coco(str(root), num_train=24, num_val=6, size=96)


def _cfg(toy_coco, out, weights="", iters=30):
    datasets = repr([["toy_coco_train", *toy_coco["train"]], ["toy_coco_val", *toy_coco["val"]]])
    opts = TINY_OPTS + [
        "MODEL.WEIGHTS",
        weights,
        "OUTPUT_DIR",
        str(out),
        "DATASETS.COCO",
        datasets,
        "SOLVER.MAX_ITER",
        str(iters),
        "SOLVER.STEPS",
        "()",
        "SOLVER.IMS_PER_BATCH",
        "4",
        "SOLVER.WARMUP_ITERS",
        "5",
        "SOLVER.BASE_LR",
        "0.001",
        "INPUT.LSJ.IMAGE_SIZE",
        "96",
        "MODEL.VIT.IMG_SIZE",
        "96",
    ]
    cfg = build_cfg(TINY_CONFIG, opts)
    register_coco_datasets(cfg)
    return cfg


def _official_encoder_file(tmp_path):
    enc, files = save_mae_checkpoints(tmp_path, img_size=64, patch_size=8)
    return files["official"], enc


def test_official_and_our_checkpoints_load_as_model_weights(toy_coco, tmp_path, caplog):
    path, enc = _official_encoder_file(tmp_path)
    cfg = _cfg(toy_coco, tmp_path / "out", weights=path)
    model = build_model(cfg)
    with caplog.at_level("INFO"):
        MAECheckpointer(model).load(path)
    vit = model.backbone.bottom_up.vit
    assert torch.equal(vit.blocks[2].attn.qkv.weight, enc["blocks.2.attn.qkv.weight"])
    assert vit.pos_embed.shape == (1, 144, 32)  # 8x8 table interpolated to 96 / 8 = 12
    text = caplog.text
    assert "resized (1): pos_embed (1, 65, 32)->(1, 144, 32)" in text
    # the final norm is not used by the pyramid (stage outputs are taken before it)
    assert (
        "dropped from checkpoint (not used by this model) (3): cls_token, norm.weight, norm.bias"
        in text
    )
    assert "new outside the ViT (trained from scratch)" in text
    assert "backbone.fpn_lateral (12)" in text and "roi_heads.box_predictor (4)" in text
    assert "UNEXPECTED" not in text and "MISSING" not in text

    # our pretraining checkpoint (encoder + decoder + mask token) through MODEL.WEIGHTS
    caplog.clear()
    ours = build_model(cfg)
    with caplog.at_level("INFO"):
        MAECheckpointer(ours).load(os.path.join(str(tmp_path), "checkpoint-last.pth"))
    assert torch.equal(
        ours.backbone.bottom_up.vit.blocks[2].attn.qkv.weight, vit.blocks[2].attn.qkv.weight
    )
    assert "decoder_embed.weight" in caplog.text and "mask_token" in caplog.text
    assert "UNEXPECTED" not in caplog.text

    d2_file = tmp_path / "converted.pth"
    counts = convert_to_detectron2(path, str(d2_file), cfg)
    assert counts["written"] == len(vit.state_dict())
    fresh = build_model(cfg)
    MAECheckpointer(fresh).load(str(d2_file))  # a detectron2 checkpoint: detectron2's own path
    assert torch.equal(fresh.backbone.bottom_up.vit.pos_embed, vit.pos_embed)
    # without the FPN the ViT sits at backbone.vit
    plain = cfg.clone()
    plain.MODEL.BACKBONE.NAME = "build_mae_vit_backbone"
    convert_to_detectron2(path, str(d2_file), plain)
    keys = torch.load(str(d2_file), weights_only=True)["model"]
    assert all(k.startswith("backbone.vit.") for k in keys)


def test_hugging_face_safetensors_and_a_url_initialise_the_detector(
    toy_coco, tmp_path, fake_download
):
    """A Hugging Face ViT file (safetensors) as MODEL.WEIGHTS is taken for MAE weights (its
    names read as ours), and MODEL.VIT.PRETRAINED may be an https URL (torch hub's cache)."""
    from safetensors.torch import save_file
    from test_checkpoint import their_names

    _, enc = _official_encoder_file(tmp_path)
    hf = tmp_path / "model.safetensors"
    save_file(their_names(enc, "Hugging Face", "vit."), str(hf))
    cfg = _cfg(toy_coco, tmp_path / "out", weights=str(hf))
    model = build_model(cfg)
    MAECheckpointer(model).load(str(hf))
    qkv = model.backbone.bottom_up.vit.blocks[2].attn.qkv.weight
    assert torch.equal(qkv, enc["blocks.2.attn.qkv.weight"])

    served, fetched = fake_download
    url = "https://huggingface.co/someone/vit-mae-tiny/resolve/main/model.safetensors"
    served[url] = hf
    by_url = cfg.clone()
    by_url.defrost()
    by_url.MODEL.WEIGHTS, by_url.MODEL.VIT.PRETRAINED = "", url
    model = build_model(by_url)
    assert fetched == [url]
    assert torch.equal(model.backbone.bottom_up.vit.blocks[2].attn.qkv.weight, qkv)


def test_training_lowers_loss_and_evaluation_returns_coco_ap(toy_coco, tmp_path):
    path, _ = _official_encoder_file(tmp_path)
    cfg = _cfg(toy_coco, tmp_path / "out", weights=path, iters=40)
    cfg.freeze()
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    results = trainer.train()
    losses = [v for v, _ in trainer.storage.history("total_loss").values()]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    for task in ("bbox", "segm"):
        assert {"AP", "AP50", "AP75", "APs", "APm", "APl"} <= set(results[task])
    assert os.path.isfile(tmp_path / "out" / "model_final.pth")


TTA_AT_TEST_SIZE = ["TEST.AUG.ENABLED", "True", "TEST.AUG.MIN_SIZES", "(64,)"]
TTA_AT_TEST_SIZE += ["TEST.AUG.MAX_SIZE", "64", "TEST.AUG.FLIP", "False"]
TTA_SEVERAL = ["TEST.AUG.MIN_SIZES", "(48, 64, 96)", "TEST.AUG.MAX_SIZE", "128"]
TTA_SEVERAL += ["TEST.AUG.FLIP", "True"]


def _predictions(folder) -> list:
    """COCOEvaluator's predictions in ``folder``, in a fixed order."""
    with open(os.path.join(folder, "coco_instances_results.json")) as f:
        found = json.load(f)
    return sorted(found, key=lambda d: (d["image_id"], -d["score"], d["category_id"], d["bbox"]))


def _same_predictions(a: list, b: list) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert (x["image_id"], x["category_id"]) == (y["image_id"], y["category_id"])
        assert x["score"] == pytest.approx(y["score"], abs=1e-6)
        assert x["bbox"] == pytest.approx(y["bbox"], abs=1e-3)
        if "segmentation" in x:  # masks from the same boxes, up to float rounding of the boxes
            assert x["segmentation"] == y["segmentation"]


def test_test_time_augmentation_runs_after_training_and_equals_the_plain_test_at_its_size(
    toy_coco, tmp_path, caplog
):
    """TEST.AUG as detectron2's tools/train_net.py: results under names ending in _TTA; at the
    test size alone, unflipped, the same predictions as the plain evaluation (LSJ at 64 px:
    the 96 px images are resized to 64 by both)."""
    from mae_transfer.detection.train import summarize

    out = tmp_path / "out"
    cfg = _cfg(toy_coco, out, iters=12)
    cfg.merge_from_list(["INPUT.LSJ.IMAGE_SIZE", "64", "MODEL.VIT.IMG_SIZE", "64"])
    cfg.merge_from_list(TTA_AT_TEST_SIZE)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    results = trainer.train()
    assert set(results) == {"bbox", "segm", "bbox_TTA", "segm_TTA"}
    for task in ("bbox", "segm"):
        assert results[task + "_TTA"] == pytest.approx(results[task], nan_ok=True)
    assert {"bbox_AP_TTA", "segm_AP75_TTA"} <= set(summarize(results))
    _same_predictions(_predictions(out), _predictions(out / "inference_TTA"))

    several = cfg.clone()
    several.merge_from_list(TTA_SEVERAL)  # 48 px padded to the 64 px square, 96 px beyond it
    tta = Trainer.test_with_TTA(several, trainer.model)
    assert set(tta) == {"bbox_TTA", "segm_TTA"} and "AP" in tta["segm_TTA"]
    # a non-square image, 96 x 144 at the largest size: past the square, not padded
    from detectron2.modeling import GeneralizedRCNNWithTTA

    image = torch.randint(0, 256, (3, 80, 120), dtype=torch.uint8)
    model = GeneralizedRCNNWithTTA(several, trainer.model.eval())
    with torch.no_grad():
        (found,) = model([{"image": image, "height": 80, "width": 120}])
    assert found["instances"].image_size == (80, 120)
    assert found["instances"].pred_masks.shape[1:] == (80, 120)
    # tools/train_det.py --eval-only: both evaluations, summarized
    argv = ["--config-file", TINY_CONFIG, "--coco-val", *toy_coco["val"], "--eval-only"]
    argv += [*TINY_OPTS, "INPUT.LSJ.IMAGE_SIZE", "64", "MODEL.VIT.IMG_SIZE", "64"]
    argv += [*TTA_AT_TEST_SIZE, *TTA_SEVERAL, "OUTPUT_DIR", str(tmp_path / "eval")]
    argv += ["MODEL.WEIGHTS", str(out / "model_final.pth")]
    with caplog.at_level(logging.INFO):
        assert load_tool("train_det").cli(argv) == 0
    summary = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("summary"))
    assert "'bbox_AP'" in summary and "'segm_AP_TTA'" in summary
    assert "short sides [48, 64, 96] (long side at most 128), each also flipped" in caplog.text


def test_test_time_augmentation_of_a_cascade_detector(toy_coco, tmp_path):
    out = tmp_path / "out"
    cfg = _cfg(toy_coco, out)
    cfg.merge_from_list([*CASCADE, "INPUT.LSJ.IMAGE_SIZE", "64", "MODEL.VIT.IMG_SIZE", "64"])
    cfg.merge_from_list([*TTA_AT_TEST_SIZE, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"])
    torch.manual_seed(0)
    model = Trainer.build_model(cfg)  # untrained: its predictions are compared, not its AP
    Trainer.test(cfg, model)
    assert set(Trainer.test_with_TTA(cfg, model)) == {"bbox_TTA", "segm_TTA"}
    _same_predictions(_predictions(out), _predictions(out / "inference_TTA"))
    cfg.merge_from_list(TTA_SEVERAL)
    assert set(Trainer.test_with_TTA(cfg, model)) == {"bbox_TTA", "segm_TTA"}


@pytest.mark.parametrize(
    "opts, expected",
    [
        (["TEST.AUG.MIN_SIZES", "()"], "TEST.AUG.MIN_SIZES must be one or more short sides"),
        (["TEST.AUG.MIN_SIZES", "(0, 800)"], "(ints > 0), got [0, 800]"),
        (["TEST.AUG.MAX_SIZE", "0"], "TEST.AUG.MAX_SIZE (the long side's limit) must be > 0"),
        (["MODEL.META_ARCHITECTURE", "RetinaNet"], "runs R-CNN detectors (GeneralizedRCNN) only"),
        (["MODEL.KEYPOINT_ON", "True"], "supports neither MODEL.KEYPOINT_ON nor"),
    ],
)
def test_test_time_augmentation_values_are_checked_before_anything_runs(opts, expected):
    with pytest.raises(ConfigError, match=re.escape(expected)):
        build_cfg(TINY_CONFIG, ["TEST.AUG.ENABLED", "True", *opts])
    build_cfg(TINY_CONFIG, opts[:2] if opts[0].startswith("TEST.AUG") else [])  # off: unread


def run_tool(name: str, *args: str) -> str:
    """Runs tools/<name> in a fresh interpreter, as users do; returns stdout + stderr."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    cmd = [sys.executable, os.path.join(ROOT, "tools", name), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout + r.stderr


def test_command_line_tools_train_evaluate_and_draw(toy_coco, tmp_path):
    """tools/train_det.py (train, --resume, --eval-only) and tools/visualize_det.py."""
    path, _ = _official_encoder_file(tmp_path)
    out = tmp_path / "cli"
    common = [
        "--config-file",
        TINY_CONFIG,
        "--coco-train",
        *toy_coco["train"],
        "--coco-val",
        *toy_coco["val"],
    ]
    opts = TINY_OPTS + [
        "SOLVER.MAX_ITER",
        "4",
        "SOLVER.STEPS",
        "()",
        "SOLVER.IMS_PER_BATCH",
        "2",
        "OUTPUT_DIR",
        str(out),
        "MODEL.VIT.IMG_SIZE",
        "96",
    ]
    run_tool("train_det.py", *common, *opts, "MODEL.WEIGHTS", path)
    final = out / "model_final.pth"
    assert final.is_file() and (out / "config.yaml").is_file()
    assert any(p.name.startswith("events.out.tfevents") for p in out.iterdir())
    # --resume continues from the last checkpoint (iteration, optimizer, scheduler)
    i = opts.index("SOLVER.MAX_ITER") + 1
    more = [*opts[:i], "6", *opts[i + 1 :]]
    log = run_tool("train_det.py", *common, "--resume", *more, "MODEL.WEIGHTS", path)
    assert "Starting training from iteration 4" in log
    log = run_tool("train_det.py", *common, "--eval-only", *opts, "MODEL.WEIGHTS", str(final))
    assert "copypaste: Task: segm" in log
    png = tmp_path / "pred.png"
    draw = ["--weights", str(final), "--images", toy_coco["val"][1], "--num", "2"]
    draw += ["--score-thresh", "0.0", "--output", str(png)]
    run_tool("visualize_det.py", "--config-file", TINY_CONFIG, *draw, *TINY_OPTS)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_trained_detector_no_longer_needs_the_encoder_it_started_from(toy_coco, tmp_path, caplog):
    """--eval-only and --resume load the whole detector: MODEL.VIT.PRETRAINED, moved or
    deleted since the training, stopped them with 'checkpoint not found'."""

    official, _ = _official_encoder_file(tmp_path)
    encoder = tmp_path / "encoder_moved_later.pth"
    shutil.copy(official, encoder)
    out = tmp_path / "out"
    data = ["--config-file", TINY_CONFIG, "--coco-train", *toy_coco["train"]]
    opts = [*TINY_OPTS, "MODEL.VIT.PATCH_SIZE", "8", "MODEL.VIT.PRETRAINED", str(encoder)]
    opts += ["SOLVER.STEPS", "()", "SOLVER.IMS_PER_BATCH", "2", "OUTPUT_DIR", str(out)]
    opts += ["MODEL.VIT.IMG_SIZE", "96", "INPUT.LSJ.IMAGE_SIZE", "96", "DATASETS.TEST", "()"]
    train_det = load_tool("train_det")
    assert train_det.cli([*data, *opts, "SOLVER.MAX_ITER", "1"]) == 0
    encoder.unlink()
    final = str(out / "model_final.pth")
    val = ["--coco-val", *toy_coco["val"]]
    argv = [*data, *val, "--eval-only", *opts, "SOLVER.MAX_ITER", "1", "MODEL.WEIGHTS", final]
    assert train_det.cli(argv) == 0
    with caplog.at_level(logging.WARNING):  # no prediction at all: nan AP, said why
        assert train_det.cli([*argv, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "1.0"]) == 0
    assert "nan AP: no prediction scored 1.0 or more on that test set" in caplog.text
    assert train_det.cli([*data, "--resume", *opts, "SOLVER.MAX_ITER", "2"]) == 0
    # resuming past the run's new end, or from a folder without a checkpoint, is said
    with caplog.at_level(logging.WARNING):
        assert train_det.cli([*data, "--resume", *opts, "SOLVER.MAX_ITER", "1"]) == 0
        assert "ends at iteration 2, SOLVER.MAX_ITER is 1: nothing left to train" in caplog.text
        fresh = [*opts, "SOLVER.MAX_ITER", "1", "OUTPUT_DIR", str(tmp_path / "fresh")]
        fresh += ["MODEL.VIT.PRETRAINED", ""]  # (the encoder is gone)
        assert train_det.cli([*data, "--resume", *fresh]) == 0
        assert "no checkpoint in OUTPUT_DIR" in caplog.text


def test_resume_under_a_config_its_checkpoint_does_not_fit_is_refused(toy_coco, tmp_path, caplog):
    """--resume with another FPN width (or NUM_CLASSES, MODEL.VIT.*) skipped the tensors of
    another shape with a warning each, trained them from scratch at the resumed iteration and
    wrote over the run's model_final.pth."""
    out = tmp_path / "out"
    data = ["--config-file", TINY_CONFIG, "--coco-train", *toy_coco["train"], "--resume"]
    opts = [*TINY_OPTS, "SOLVER.STEPS", "()", "SOLVER.IMS_PER_BATCH", "2", "OUTPUT_DIR", str(out)]
    opts += ["MODEL.VIT.IMG_SIZE", "96", "INPUT.LSJ.IMAGE_SIZE", "96", "DATASETS.TEST", "()"]
    train_det = load_tool("train_det")
    assert train_det.cli([*data, *opts, "SOLVER.MAX_ITER", "1"]) == 0
    trained = (out / "model_final.pth").read_bytes()
    code = train_det.cli([*data, *opts, "SOLVER.MAX_ITER", "2", "MODEL.FPN.OUT_CHANNELS", "32"])
    _refused(caplog, code, "model_final.pth does not fit the detector of this config")
    assert (out / "model_final.pth").read_bytes() == trained


def test_several_test_sets_are_summarized_and_written_apart(toy_coco, tmp_path):
    """The summary kept the last set's AP under unnamed keys, and every set wrote the same
    coco_instances_results.json."""
    from mae_transfer.detection.train import summarize

    one = {"bbox": {"AP": 30.0, "AP50": 50.0, "AP75": 20.0}}
    two = {"bbox": {"AP": 10.0, "AP50": 20.0, "AP75": 5.0}}
    assert summarize(one) == {"bbox_AP": 30.0, "bbox_AP50": 50.0, "bbox_AP75": 20.0}
    both = summarize({"setA": one, "setB": two})
    assert both["setA/bbox_AP"] == 30.0 and both["setB/bbox_AP"] == 10.0 and len(both) == 6
    # with test-time augmentation (detectron2's names: the task's or the set's, + _TTA)
    tta = summarize({**one, "bbox_TTA": two["bbox"]})
    assert tta["bbox_AP"] == 30.0 and tta["bbox_AP_TTA"] == 10.0 and len(tta) == 6
    tta = summarize({"setA": one, "setB": two, "setA_TTA": two})
    assert tta["setA/bbox_AP_TTA"] == 10.0 and len(tta) == 9
    cfg = _cfg(toy_coco, tmp_path / "out")
    cfg.DATASETS.TEST = ("toy_coco_val", "toy_coco_train")
    folders = {Trainer.build_evaluator(cfg, name)._output_dir for name in cfg.DATASETS.TEST}
    assert folders == {str(tmp_path / "out" / "inference" / n) for n in cfg.DATASETS.TEST}
    cfg.DATASETS.TEST = ("toy_coco_val",)  # one set: in OUTPUT_DIR, as detectron2's tools
    assert Trainer.build_evaluator(cfg, "toy_coco_val")._output_dir == str(tmp_path / "out")


def load_tool(name: str):
    """tools/<name>.py as a module (in-process: cheaper than a fresh interpreter)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"tool_{name}", f"{ROOT}/tools/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("order", ["documented", "options_first", "overrides_then_option"])
def test_convert_tool_takes_its_arguments_in_any_order(tmp_path, order):
    """``SRC OUT --config-file CFG`` (the docstring's order) used to fail: the KEY VALUE list
    swallowed --config-file."""
    src, _ = _official_encoder_file(tmp_path)
    out = str(tmp_path / "d2.pth")
    argv = {
        "documented": [src, out, "--config-file", TINY_CONFIG, *TINY_OPTS],
        "options_first": ["--config-file", TINY_CONFIG, src, out, *TINY_OPTS],
        "overrides_then_option": [src, out, *TINY_OPTS, "--config-file", TINY_CONFIG],
    }[order]
    assert load_tool("convert_to_detectron2").main(argv) == 0
    state = torch.load(out, weights_only=True)["model"]
    assert state["backbone.bottom_up.vit.patch_embed.proj.weight"].shape == (32, 3, 8, 8)


def test_convert_tool_refuses_a_checkpoint_of_another_width(tmp_path, caplog):
    src, _ = _official_encoder_file(tmp_path)  # width 32; the config without overrides: 96
    tool = load_tool("convert_to_detectron2")
    assert tool.main([src, str(tmp_path / "d2.pth"), "--config-file", TINY_CONFIG]) == 2
    assert "width 32" in caplog.text and "width 96" in caplog.text
    assert tool.main(["nope.pth", str(tmp_path / "d2.pth"), "--config-file", TINY_CONFIG]) == 2
    assert "'nope.pth' does not exist" in caplog.text


def _refused(caplog, code: int, *expected: str) -> None:
    """Exit code 2 and one error record holding every expected piece."""
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert code == 2 and len(errors) == 1, (code, errors)
    assert all(e in errors[0] for e in expected), errors[0]


@pytest.mark.parametrize(
    "case",
    [
        "weights",
        "pretrained",
        "model_name",
        "config_file",
        "unknown_key",
        "out_indices",
        "no_test_set",
        "taken",
    ],
)
def test_train_det_refuses_bad_input_before_training_with_exit_2(toy_coco, tmp_path, caplog, case):
    """Each used to end in a traceback (exit 1); a missing test set only after the training."""
    config, opts, expected = TINY_CONFIG, list(TINY_OPTS), ()
    data = ["--coco-train", *toy_coco["train"], "--coco-val", *toy_coco["val"]]
    if case == "weights":
        opts += ["MODEL.WEIGHTS", str(tmp_path / "nothere.pth")]
        expected = ("MODEL.WEIGHTS", "nothere.pth' does not exist")
    elif case == "pretrained":  # 'checkpoint not found' as the model was built, no key named
        opts += ["MODEL.VIT.PRETRAINED", str(tmp_path / "nothere.pth")]
        expected = ("MODEL.VIT.PRETRAINED", "nothere.pth' does not exist")
    elif case == "model_name":
        opts += ["MODEL.VIT.NAME", "vit_foo"]
        expected = ("MODEL.VIT.NAME: unknown model 'vit_foo'",)
    elif case == "config_file":
        config, expected = str(tmp_path / "nothere.yaml"), ("nothere.yaml' does not exist",)
    elif case == "unknown_key":
        opts += ["MODEL.VIT.DEPTH", "4"]
        expected = ("Non-existent key: MODEL.VIT.DEPTH",)
    elif case == "out_indices":  # only the model knows its depth (4)
        opts += ["MODEL.VIT.OUT_INDICES", "[0, 1, 2, 7]"]
        expected = ("out_indices (0, 1, 2, 7) out of range for depth 4",)
    elif case == "taken":  # detectron2's own name: its COCO files, silently, not these
        opts += ["DATASETS.COCO", repr([["coco_2017_val", *toy_coco["val"]]])]
        expected = ("DATASETS.COCO names 'coco_2017_val', which is already registered",)
    else:  # as demo_tiny.yaml's toy_coco_val, which only --coco-val registers (here: other
        # tests of this process did; hence a name of its own)
        data, opts = data[:3], opts + ["DATASETS.TEST", "('toy_coco_val_not_given',)"]
        expected = ("DATASETS.TEST 'toy_coco_val_not_given' is not registered", "--coco-val")
        expected += ("(an LVIS file: --lvis-val)", "DATASETS.COCO (an LVIS file: DATASETS.LVIS)")
    argv = ["--config-file", config, *data, *opts, "OUTPUT_DIR", str(tmp_path / "out")]
    _refused(caplog, load_tool("train_det").cli(argv), *expected)
    assert not (tmp_path / "out").exists()  # refused before detectron2's set-up


@pytest.mark.parametrize(
    "case", ["missing_image", "not_json", "no_categories", "no_annotation", "wrong_size"]
)
def test_train_det_names_bad_data_files_before_training(toy_coco, tmp_path, caplog, case):
    """Each was a traceback with exit 1; a missing image, or one of another size than the
    file gives it (detectron2's SizeMismatchError), only when training drew it."""
    with open(toy_coco["train"][0]) as f:
        data = json.load(f)
    bad = tmp_path / "train.json"
    if case == "missing_image":
        data["images"][3]["file_name"] = "not_there.png"
        expected = ("1 of the 24 images", "not_there.png")
    elif case == "no_categories":
        del data["categories"]
        expected = ("has no 'categories'",)
    elif case == "no_annotation":
        data["annotations"] = []
        expected = ("has no image with an annotation",)
    elif case == "wrong_size":
        image = data["images"][5]
        size = f"{image['width']}x{image['height']} vs {image['width'] * 2}x{image['height']}"
        image["width"] *= 2
        expected = ("1 of 24 sampled images are not of the size", f"{image['file_name']} ({size})")
    text = json.dumps(data)
    if case == "not_json":
        text, expected = text[: len(text) // 2], ("is not valid JSON",)
    bad.write_text(text)
    argv = ["--config-file", TINY_CONFIG, "--coco-train", str(bad), toy_coco["train"][1]]
    argv += [*TINY_OPTS, "DATASETS.TEST", "()", "SOLVER.IMS_PER_BATCH", "2"]
    argv += ["OUTPUT_DIR", str(tmp_path / "out")]
    _refused(caplog, load_tool("train_det").cli(argv), *expected)
    assert not (tmp_path / "out" / "model_final.pth").exists()


def test_training_sets_of_different_categories_are_named_before_training(
    toy_coco, tmp_path, caplog
):
    """detectron2's 'Datasets have different metadata' was a traceback once the model was built."""
    with open(toy_coco["train"][0]) as f:
        data = json.load(f)
    data["categories"] = data["categories"][:-1]
    last = data["categories"][-1]["id"]
    data["annotations"] = [a for a in data["annotations"] if a["category_id"] <= last]
    (tmp_path / "part.json").write_text(json.dumps(data))
    sets = [["tA", *toy_coco["train"]], ["tB", str(tmp_path / "part.json"), toy_coco["train"][1]]]
    argv = ["--config-file", TINY_CONFIG, *TINY_OPTS, "DATASETS.COCO", repr(sets)]
    argv += ["DATASETS.TRAIN", "('tA', 'tB')", "DATASETS.TEST", "()", "SOLVER.IMS_PER_BATCH", "2"]
    code = load_tool("train_det").cli(argv + ["OUTPUT_DIR", str(tmp_path / "out")])
    # (detectron2 logs the two lists as errors of its own before raising)
    ours = [r.getMessage() for r in caplog.records if r.name == "train_det"]
    assert code == 2 and len(ours) == 1, (code, ours)
    assert "the training sets list different categories" in ours[0] and "tB: {1: " in ours[0]


def test_train_det_with_an_empty_test_set_trains_without_evaluating(toy_coco, tmp_path):
    """DATASETS.TEST '()' is detectron2's way to skip the evaluation, which the refusal of a
    missing test set names."""
    out = tmp_path / "out"
    argv = ["--config-file", TINY_CONFIG, "--coco-train", *toy_coco["train"], *TINY_OPTS]
    argv += ["DATASETS.TEST", "()", "SOLVER.MAX_ITER", "1", "SOLVER.STEPS", "()"]
    argv += ["SOLVER.IMS_PER_BATCH", "2", "OUTPUT_DIR", str(out)]
    assert load_tool("train_det").cli(argv) == 0
    assert (out / "model_final.pth").is_file()


def _val_with_categories(toy_coco, path, keep_ids, extra=()):
    """The toy val set with only the categories ``keep_ids`` (and their annotations), plus
    ``extra`` categories."""
    with open(toy_coco["val"][0]) as f:
        data = json.load(f)
    data["categories"] = [c for c in data["categories"] if c["id"] in keep_ids] + list(extra)
    data["annotations"] = [a for a in data["annotations"] if a["category_id"] in keep_ids]
    path.write_text(json.dumps(data))
    return [str(path), toy_coco["val"][1]]


def test_a_test_set_with_some_of_the_training_categories_is_numbered_as_training(
    toy_coco, tmp_path, caplog
):
    """detectron2 numbered the test set's classes from its own list: the detector's class 1
    was another class there, and the evaluation failed after the whole training."""
    from detectron2.data import MetadataCatalog

    val = _val_with_categories(toy_coco, tmp_path / "val_part.json", keep_ids={2, 3})
    opts = [*TINY_OPTS, "SOLVER.MAX_ITER", "1", "SOLVER.STEPS", "()", "SOLVER.IMS_PER_BATCH", "2"]
    opts += ["INPUT.LSJ.IMAGE_SIZE", "96", "MODEL.VIT.IMG_SIZE", "96"]
    opts += ["OUTPUT_DIR", str(tmp_path / "out")]

    def run(val):
        argv = ["--config-file", TINY_CONFIG, "--coco-train", *toy_coco["train"]]
        return load_tool("train_det").cli(argv + ["--coco-val", *val, *opts])

    assert run(val) == 0
    train, test = (MetadataCatalog.get(f"custom_coco_{s}") for s in ("train", "val"))
    assert test.thing_dataset_id_to_contiguous_id == train.thing_dataset_id_to_contiguous_id
    assert list(test.thing_classes) == list(train.thing_classes)
    assert "the extra outputs are never trained" not in caplog.text  # (the wrong advice)
    # a category the detector was never trained on is named before anything is trained
    foreign = _val_with_categories(
        toy_coco, tmp_path / "val_foreign.json", {2}, [{"id": 99, "name": "kite"}]
    )
    caplog.clear()
    _refused(caplog, run(foreign), "DATASETS.TEST 'custom_coco_val' has categories", "99: 'kite'")


def test_evaluating_a_test_set_against_the_config_s_default_training_set_says_what_to_give(
    toy_coco, tmp_path, caplog
):
    """--eval-only with --coco-val alone aligns the test set with the config's DATASETS.TRAIN
    (here COCO's builtin): the refusal listed all its categories (LVIS's: 40 kB on one line)
    and did not say to name the set the detector was trained on."""
    weights = tmp_path / "model_final.pth"
    weights.write_bytes(b"")  # (refused before it is read)
    argv = ["--config-file", TINY_CONFIG, "--coco-val", *toy_coco["val"], "--eval-only"]
    argv += [*TINY_OPTS, "MODEL.WEIGHTS", str(weights), "DATASETS.TRAIN", "('coco_2017_train',)"]
    code = load_tool("train_det").cli([*argv, "OUTPUT_DIR", str(tmp_path / "out")])
    _refused(caplog, code, "the training set 'coco_2017_train' does not", "--coco-train")
    error = next(r.getMessage() for r in caplog.records if r.levelname == "ERROR")
    assert "... (80 in all)" in error and len(error) < 1500, error


def test_a_trained_detector_must_fill_the_whole_model(toy_coco, tmp_path):
    """--eval-only and tools/visualize_det.py: a backbone-only (MAE) file or another model's
    checkpoint would leave heads random, silently; they are refused with what did not fit."""
    cfg = _cfg(toy_coco, tmp_path / "out")
    detector = tmp_path / "detector.pth"
    torch.save({"model": build_model(cfg).state_dict()}, detector)
    MAECheckpointer(build_model(cfg), whole_model=True).load(str(detector))  # fits
    mae, _ = _official_encoder_file(tmp_path)
    with pytest.raises(CheckpointError, match="holds a ViT but not a detector"):
        MAECheckpointer(build_model(cfg), whole_model=True).load(mae)
    wider = cfg.clone()
    wider.MODEL.VIT.SIZE_OVERRIDES = [["embed_dim", 48], ["depth", 4], ["num_heads", 2]]
    shape = r"of another shape \(backbone.fpn_lateral2.weight \(64, 32, 1, 1\) vs model \(64, 48"
    with pytest.raises(CheckpointError, match=shape):
        MAECheckpointer(build_model(wider), whole_model=True).load(str(detector))
    partial = {k: v for k, v in build_model(cfg).state_dict().items() if "mask_head" not in k}
    torch.save({"model": partial}, detector)
    with pytest.raises(CheckpointError, match=r"tensors missing \(roi_heads.mask_head"):
        MAECheckpointer(build_model(cfg), whole_model=True).load(str(detector))


def test_a_pkl_is_read_as_arrays_only(toy_coco, tmp_path):
    """detectron2 unpickles a .pkl (its model zoo's format) with pickle.load: any code runs."""
    import pickle

    cfg = _cfg(toy_coco, tmp_path / "out")
    state = build_model(cfg).state_dict()
    zoo = tmp_path / "model_zoo.pkl"  # detectron2's model-zoo form: numpy arrays
    arrays = {k: v.numpy() for k, v in state.items()}
    with open(zoo, "wb") as f:
        pickle.dump({"model": arrays, "__author__": "zoo", "matching_heuristics": False}, f)
    model = build_model(cfg)
    MAECheckpointer(model, whole_model=True).load(str(zoo))
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    hostile, ran = tmp_path / "hostile.pkl", tmp_path / "ran"
    with open(hostile, "wb") as f:
        pickle.dump({"model": {}, "__author__": RunsCode(str(ran))}, f)
    with pytest.raises(CheckpointError, match="is not part of a weights file"):
        MAECheckpointer(build_model(cfg)).load(str(hostile))
    assert not ran.exists()


def test_eval_only_checks_the_weights_before_launching_workers(
    toy_coco, tmp_path, caplog, monkeypatch
):
    """With --num-gpus > 1 the check inside the spawned workers was a traceback: the launching
    process checks the file first, on a model built on the meta device."""
    tool = load_tool("train_det")
    launched = []
    tool.launch = lambda *a, **k: launched.append(a)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # (the workers are not started)
    mae, _ = _official_encoder_file(tmp_path)
    data = ["--coco-val", *toy_coco["val"]]
    argv = ["--config-file", TINY_CONFIG, "--eval-only", "--num-gpus", "2", *data, *TINY_OPTS]
    argv += ["MODEL.WEIGHTS"]
    _refused(caplog, tool.cli([*argv, mae]), "holds a ViT but not a detector of this code")
    assert not launched
    cfg = _cfg(toy_coco, tmp_path / "out")
    detector = str(tmp_path / "detector.pth")
    torch.save({"model": build_model(cfg).state_dict()}, detector)
    assert tool.cli([*argv, detector]) == 0 and len(launched) == 1


@pytest.mark.parametrize("case", ["mae_file", "missing_file", "no_images"])
def test_visualize_det_refuses_bad_input_with_exit_2(toy_coco, tmp_path, caplog, case):
    mae, _ = _official_encoder_file(tmp_path)
    weights, images = mae, [toy_coco["val"][1]]
    expected = ("holds a ViT but not a detector of this code",)
    if case == "missing_file":
        weights, expected = str(tmp_path / "nothere.pth"), ("--weights", "does not exist")
    elif case == "no_images":
        images, expected = [str(tmp_path / "nothere")], ("--images", "nothere does not exist")
    argv = ["--config-file", TINY_CONFIG, "--weights", weights, "--images", *images]
    argv += ["--output", str(tmp_path / "pred.png"), *TINY_OPTS]
    _refused(caplog, load_tool("visualize_det").main(argv), *expected)
    assert not (tmp_path / "pred.png").exists()


@pytest.fixture
def fresh_precision(monkeypatch):
    """Fakes the CPU / GPU precision checks per test (see tests/test_precision.py)."""
    from mae_transfer import device

    monkeypatch.setattr(device, "_logged", set())
    device.cpu_bf16_check.cache_clear()
    yield monkeypatch
    device.cpu_bf16_check.cache_clear()


@pytest.mark.parametrize(
    "device,hardware,precision,expect",
    [
        ("cuda", "sm75", "auto", None),  # T4: bf16 is emulated there; fp32
        ("cuda", "sm80", "auto", torch.bfloat16),
        ("cuda", "sm90", "auto", torch.bfloat16),
        ("cuda", "sm70", "float16", torch.float16),  # V100: fp16 on request
        ("cpu", "amx", "auto", torch.bfloat16),  # an AMX CPU trains in bf16
        ("cpu", "avx2", "auto", None),  # an AVX2 CPU in fp32
    ],
)
def test_amp_precision_auto_follows_the_device(
    fresh_precision, device, hardware, precision, expect
):
    from test_precision import fake_cpu, fake_cuda

    from mae_transfer.detection.config import amp_dtype

    if device == "cuda":
        fake_cuda(fresh_precision, hardware)
    else:
        fake_cpu(fresh_precision, {"amx_bf16"} if hardware == "amx" else {"avx2"})
    opts = ["MODEL.DEVICE", device, "SOLVER.AMP.ENABLED", "True", "SOLVER.AMP.PRECISION", precision]
    cfg = build_cfg(TINY_CONFIG, opts)
    assert cfg.SOLVER.AMP.ENABLED and amp_dtype(cfg) == expect
    cfg.SOLVER.AMP.ENABLED = False
    assert amp_dtype(cfg) is None


def test_cpu_training_uses_the_precision_trainer_and_a_bf16_step_is_finite(
    fresh_precision, toy_coco, tmp_path
):
    """SOLVER.AMP on CPU follows the CPU rule through PrecisionAMPTrainer(device_type='cpu'):
    auto = bf16 on an AMX CPU, fp32 (SimpleTrainer) elsewhere; a bf16 step of Mask R-CNN runs."""
    from detectron2.engine import SimpleTrainer
    from detectron2.utils.events import EventStorage
    from test_precision import fake_cpu

    from mae_transfer.detection.train import PrecisionAMPTrainer

    def trainer(*opts):
        cfg = _cfg(toy_coco, tmp_path / "out", iters=2)
        cfg.merge_from_list(["SOLVER.AMP.ENABLED", "True", "SOLVER.IMS_PER_BATCH", "2", *opts])
        cfg.freeze()
        return Trainer(cfg)

    fake_cpu(fresh_precision, {"avx2"})
    assert type(trainer()._trainer) is SimpleTrainer
    fake_cpu(fresh_precision, {"avx512_bf16", "amx_bf16"})
    t = trainer()._trainer
    assert isinstance(t, PrecisionAMPTrainer)
    assert (t.dtype, t.device_type) == (torch.bfloat16, "cpu")
    assert not t.grad_scaler.is_enabled()
    t.model.train()
    with EventStorage() as storage:
        t.run_step()
    losses = {k: v[0] for k, v in storage.latest().items() if k.startswith("loss")}
    assert losses and all(torch.isfinite(torch.tensor(v)) for v in losses.values())


def _fake_update(trainer) -> None:
    """An optimizer step through the trainer's loss scaler, with made-up gradients (no data)."""
    scaler = getattr(trainer._trainer, "grad_scaler", None)
    for group in trainer.optimizer.param_groups:
        for p in group["params"]:
            p.grad = torch.full_like(p, 1e-3)
    if scaler is None or not scaler.is_enabled():
        trainer.optimizer.step()
        return
    scaler.scale(torch.ones(()))  # initialises the scale, as a backward pass would
    scaler.step(trainer.optimizer)
    scaler.update()


def test_resume_across_precisions_keeps_optimizer_state_and_implementation(
    fresh_precision, toy_coco, tmp_path
):
    """bf16 (fused AdamW) -> fp16 + clipping (not fused) -> fp16 (fused): each resume restores
    the AdamW moments, survives the empty loss-scaler state of a bf16 run, and keeps the
    resuming run's own fused / non-fused choice."""
    from mae_transfer.device import fused_adamw_supported

    if not fused_adamw_supported("cpu"):
        pytest.skip("fused AdamW is not available on this CPU build of torch")

    def trainer(*opts):
        cfg = _cfg(toy_coco, tmp_path / "out", iters=2)
        cfg.merge_from_list(["SOLVER.AMP.ENABLED", "True", *opts])
        cfg.freeze()
        return Trainer(cfg)

    def moments(t):
        return [s["exp_avg"].clone() for s in t.optimizer.state.values()]

    a = trainer("SOLVER.AMP.PRECISION", "bfloat16")
    assert a.optimizer.param_groups[0]["fused"]
    _fake_update(a)
    a.checkpointer.save("model_0000000")
    b = trainer("SOLVER.AMP.PRECISION", "float16", "SOLVER.CLIP_GRADIENTS.ENABLED", "True")
    assert not b.optimizer.param_groups[0]["fused"]
    b.resume_or_load(resume=True)  # the bf16 run saved an empty loss-scaler state
    assert b.start_iter == 1 and len(b.optimizer.state) == len(a.optimizer.state)
    assert all(torch.equal(x, y) for x, y in zip(moments(a), moments(b)))
    assert not any(g["fused"] for g in b.optimizer.param_groups)  # clipping needs unfused
    _fake_update(b)
    b.iter = 1
    b.checkpointer.save("model_0000001")
    c = trainer("SOLVER.AMP.PRECISION", "float16")
    c.resume_or_load(resume=True)
    assert c.start_iter == 2
    assert c._trainer.grad_scaler.get_scale() == b._trainer.grad_scaler.get_scale()
    assert all(g["fused"] for g in c.optimizer.param_groups)
    _fake_update(c)  # a fused step takes the scaler's grad_scale; an unfused one would assert


@pytest.mark.parametrize("grouping, workers", [(True, 0), (False, 0), (False, 2)])
def test_a_resumed_run_continues_the_data_order(toy_coco, tmp_path, grouping, workers):
    """The images after a resumed checkpoint are those the uninterrupted run drew next
    (detectron2 began its stream again: the first images twice), also when the resumed run
    has a new random seed, and with or without aspect-ratio grouping. Without grouping, two
    workers make every other batch each: after an odd number of batches the next one is the
    second worker's (the resumed run drew the first worker's batch after the checkpoint's)."""

    def trainer(seed):
        cfg = _cfg(toy_coco, tmp_path / "out", iters=8)
        cfg.merge_from_list(["SEED", str(seed), "DATALOADER.ASPECT_RATIO_GROUPING", str(grouping)])
        cfg.merge_from_list(["DATALOADER.NUM_WORKERS", str(workers)])
        cfg.merge_from_list(["SOLVER.IMS_PER_BATCH", "2", "INPUT.LSJ.ENABLED", "False"])
        cfg.freeze()
        from detectron2.utils.env import seed_all_rng

        seed_all_rng(seed)  # what train_det's default_setup does with SEED
        return Trainer(cfg)

    def files(t, n):
        return [[d["file_name"] for d in next(t._trainer._data_loader_iter)] for _ in range(n)]

    a = trainer(seed=1)
    drawn = files(a, 5)
    a.iter = 2  # three iterations done: six images
    a.checkpointer.save("model_0000002")
    b = trainer(seed=2)  # another seed: another order, unless resumed
    assert files(b, 2) != drawn[:2]
    b = trainer(seed=2)
    b.resume_or_load(resume=True)
    assert b.start_iter == 3 and files(b, 2) == drawn[3:5]


def _vit_of(backbone):
    vit = backbone.net if hasattr(backbone, "net") else backbone.bottom_up.vit
    kernel = tuple(vit.patch_embed.proj.weight.shape)
    return kernel, len(vit.blocks), vit.global_blocks, vit.pos_embed.shape


def _heads_of(roi_heads):
    """What the box and mask heads are: class, parameter count per head, and per box stage its
    matching IoU, box-delta weights and class-agnostic regression."""
    cascade = hasattr(roi_heads, "box_predictor") and isinstance(
        roi_heads.box_predictor, torch.nn.ModuleList
    )
    predictors = roi_heads.box_predictor if cascade else [roi_heads.box_predictor]
    matchers = roi_heads.proposal_matchers if cascade else [roi_heads.proposal_matcher]
    stages = [
        (m.thresholds[1], tuple(p.box2box_transform.weights), p.bbox_pred.out_features)
        for m, p in zip(matchers, predictors)
    ]
    sizes = {name: sum(p.numel() for p in m.parameters()) for name, m in roi_heads.named_children()}
    return type(roi_heads).__name__, sizes, stages


def _predictors_of(roi_heads):
    """Each box predictor's class, classes, test threshold and detections per image, and its
    sigmoid / fed-loss settings (fed_loss.py's; None for detectron2's softmax predictor)."""
    predictors = roi_heads.box_predictor
    predictors = predictors if isinstance(predictors, torch.nn.ModuleList) else [predictors]
    keys = ("_sigmoid_ce", "_fed_loss", "_fed_loss_max_classes", "_fed_loss_power")
    return [
        (type(p).__name__, p.num_classes, p.test_score_thresh, p.test_topk_per_image)
        + tuple(getattr(p, k, None) for k in keys)
        for p in predictors
    ]


def _data_of(lazy):
    """What the LazyConfig reads and how, in the YAML's terms: training and test sets, the
    training sampler and its repeat threshold, and the evaluator's class and detections."""
    names = lambda n: (n,) if isinstance(n, str) else tuple(n)  # noqa: E731
    sampler = lazy.dataloader.train.get("sampler", None)
    if sampler is None:
        sampler, thresh = "TrainingSampler", None  # detectron2's default
    else:
        thresh = sampler.repeat_factors.repeat_thresh
        sampler = sampler._target_.__name__
    evaluator = lazy.dataloader.evaluator
    return (
        names(lazy.dataloader.train.dataset.names),
        names(lazy.dataloader.test.dataset.names),
        sampler,
        thresh,
        evaluator._target_.__name__,
        evaluator.get("max_dets_per_image", None),
    )


def _yaml_data_of(yaml):
    from mae_transfer.detection.lvis import LVIS_MAX_DETS, is_lvis

    rfs = yaml.DATALOADER.SAMPLER_TRAIN == "RepeatFactorTrainingSampler"
    lvis = is_lvis(yaml.DATASETS.TEST[0])  # evaluated as Trainer.build_evaluator does
    return (
        tuple(yaml.DATASETS.TRAIN),
        tuple(yaml.DATASETS.TEST),
        yaml.DATALOADER.SAMPLER_TRAIN,
        yaml.DATALOADER.REPEAT_THRESHOLD if rfs else None,
        "LVISEvaluator" if lvis else "COCOEvaluator",
        LVIS_MAX_DETS if lvis else None,
    )


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(CONFIG_DIR, "lazy", "*.py"))))
def test_each_lazy_config_is_its_yaml_twin(path):
    """Each LazyConfig trains what the YAML of its name does: the same ViT (size, patch,
    global blocks, position table) and pyramid (parameter count), heads (the cascade's three
    stages: matching IoUs, box weights, class-agnostic boxes), layer decay, drop path, and
    the ViTDet schedule: warmup 250 iterations of 100 epochs from lr x 0.001 (not the R-50
    recipe's 0.067), steps at 88.9% / 96.3% of the iterations (x 3/4 for H's 75 epochs).
    The LVIS ones: the sigmoid ROI heads and predictor with the YAML's fed-loss settings, test
    threshold and detections per image, the fed loss counting the training set the loader
    reads, repeat factor sampling at the same threshold, LVISEvaluator at 300 detections, and
    ViTDet's LVIS schedule (lr 2e-4, 156,250 iterations, evaluated every 30k)."""
    lazy = LazyConfig.load(path)
    yaml = build_cfg(path.replace("/lazy/", "/").replace(".py", ".yaml"), ["MODEL.DEVICE", "meta"])
    lvis = yaml.MODEL.ROI_BOX_HEAD.USE_FED_LOSS
    if lvis:  # the frequencies of the sets the training loader reads (checked; not counted here)
        for predictor in _lazy_predictors(lazy):  # (each cascade stage's)
            assert predictor.fed_loss_datasets == lazy.dataloader.train.dataset.names
            # (a data set override reaches it: it is an interpolation of that key)
            assert OmegaConf.to_container(predictor)["fed_loss_datasets"].startswith("${")
        assert lazy.train.eval_period == yaml.TEST.EVAL_PERIOD  # (COCO's: end / every 5000)
    _without_training_set_counts(lazy)
    assert _data_of(lazy) == _yaml_data_of(yaml)
    with torch.device("meta"):
        lazy_model, yaml_model = instantiate(lazy.model), build_model(yaml)
    ours, theirs = lazy_model.backbone, yaml_model.backbone
    assert _vit_of(ours) == _vit_of(theirs)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(ours) == count(theirs)
    assert _heads_of(lazy_model.roi_heads) == _heads_of(yaml_model.roi_heads)
    assert _predictors_of(lazy_model.roi_heads) == _predictors_of(yaml_model.roi_heads)
    assert (_predictors_of(lazy_model.roi_heads)[0][0] == "SigmoidFastRCNNOutputLayers") == lvis
    cascade = os.path.basename(path).startswith("cascade_")
    assert isinstance(lazy_model.roi_heads, CascadeROIHeads) == cascade
    blocks = (ours.net if hasattr(ours, "net") else ours.bottom_up.vit).blocks
    assert blocks[-1].drop_path.drop_prob == pytest.approx(yaml.MODEL.VIT.DROP_PATH_RATE)
    assert lazy.optimizer.params.layer_decay == yaml.SOLVER.LAYER_DECAY
    lr = lazy.lr_multiplier
    assert lr.warmup_factor == yaml.SOLVER.WARMUP_FACTOR == 0.001
    assert lr.warmup_length * lazy.train.max_iter == pytest.approx(yaml.SOLVER.WARMUP_ITERS, abs=1)
    assert lazy.train.max_iter == yaml.SOLVER.MAX_ITER
    assert tuple(lr.scheduler.milestones) == tuple(yaml.SOLVER.STEPS)
    assert lazy.optimizer.params.base_lr == yaml.SOLVER.BASE_LR
    assert lazy.optimizer.params.weight_decay == yaml.SOLVER.WEIGHT_DECAY


def test_lazy_config_tests_at_the_size_it_trains_at():
    lazy = LazyConfig.load(os.path.join(CONFIG_DIR, "lazy", "mask_rcnn_vit_base_fpn_lsj_100ep.py"))
    yaml = build_cfg(os.path.join(CONFIG_DIR, "mask_rcnn_vit_base_fpn_lsj_100ep.yaml"))
    # evaluated at the size it trains at (the R-50 recipe's 800 / 1333 left test images
    # larger than the square the model pads them to)
    from mae_transfer.detection.train import build_augmentations

    (resize,) = instantiate(lazy.dataloader.test.mapper.augmentations)
    (expected,) = build_augmentations(yaml, is_train=False)
    assert (resize.short_edge_length, resize.max_size) == (
        expected.short_edge_length,
        expected.max_size,
    )
    assert lazy.model.backbone.bottom_up.square_pad == resize.max_size == 1024


def test_a_resumed_adamw_keeps_its_step_count_where_its_implementation_reads_it():
    """A non-fused checkpoint resumed by a fused run: the fused kernel reads ``step`` on the
    parameter's device (a meta-device parameter stands in for a CUDA one; the other way,
    a CUDA count moved to the CPU, needs a real device to copy from)."""
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.ones(3)
    before = torch.optim.AdamW([p], foreach=True)
    before.step()
    q = torch.nn.Parameter(torch.zeros(3, device="meta"))
    opt = torch.optim.AdamW([q], fused=True)
    with keep_optimizer_impl(opt):
        opt.load_state_dict(before.state_dict())
    assert opt.param_groups[0]["fused"] is True
    step = opt.state[q]["step"]
    assert step.device == q.device and step.dtype == torch.float32


def test_train_det_names_a_class_count_that_does_not_fit_the_data(toy_coco, tmp_path, caplog):
    import logging

    argv = ["--config-file", TINY_CONFIG, "--coco-train", *toy_coco["train"], *TINY_OPTS]
    argv += ["DATASETS.TEST", "()", "SOLVER.MAX_ITER", "1", "SOLVER.STEPS", "()"]
    argv += ["SOLVER.IMS_PER_BATCH", "2", "OUTPUT_DIR", str(tmp_path / "out")]
    with open(toy_coco["train"][0]) as f:
        n = len(json.load(f)["categories"])
    code = load_tool("train_det").cli(argv + ["MODEL.ROI_HEADS.NUM_CLASSES", "1"])
    _refused(caplog, code, f"has {n} categories but MODEL.ROI_HEADS.NUM_CLASSES is 1")
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert load_tool("train_det").cli(argv + ["MODEL.ROI_HEADS.NUM_CLASSES", str(n + 2)]) == 0
    assert f"{n} categories, MODEL.ROI_HEADS.NUM_CLASSES is {n + 2}" in caplog.text
    # our loggers write to detectron2's log file too (the weight-loading report, the summary)
    log = (tmp_path / "out" / "log.txt").read_text()
    assert f"{n} categories, MODEL.ROI_HEADS.NUM_CLASSES is {n + 2}" in log
    # marked as a warning, as detectron2 marks its own (it read as information)
    warned = [line for line in log.splitlines() if "never trained" in line]
    assert warned and all(line.startswith("WARNING [") for line in warned), warned


def test_drawn_class_names_come_from_the_detector_s_data_set(toy_coco, caplog):
    from mae_transfer.detection.train import build_cfg, register_coco_datasets
    from mae_transfer.detection.visualize import class_names

    cfg = build_cfg(TINY_CONFIG, TINY_OPTS, coco_val=toy_coco["val"])
    register_coco_datasets(cfg)
    with open(toy_coco["val"][0]) as f:
        names = [c["name"] for c in sorted(json.load(f)["categories"], key=lambda c: c["id"])]
    # the names of the user's set, read from its file (they were unknown before it loaded)
    assert list(class_names(cfg, cfg.DATASETS.TEST[0]).thing_classes) == names
    # a recipe config's coco_2017_val: COCO's 80 names would label this detector's 6 classes
    assert class_names(cfg, "coco_2017_val").get("thing_classes", None) is None
    assert "80 class names of 'coco_2017_val' do not fit the detector's" in caplog.text


def test_a_data_set_name_of_ours_is_registered_again_for_other_files(tmp_path):
    from detectron2.data import MetadataCatalog

    from mae_transfer.detection.train import build_cfg, register_coco_datasets

    for i in range(2):  # e.g. two demo runs in one process, each with its own data
        files = write_toy_coco(str(tmp_path / str(i)), num_train=2, num_val=1, size=64)
        entry = repr([["toy_again_train", *files["train"]]])
        register_coco_datasets(build_cfg(TINY_CONFIG, TINY_OPTS + ["DATASETS.COCO", entry]))
        assert MetadataCatalog.get("toy_again_train").json_file == files["train"][0]


def _box_only(src: str, dst: str) -> str:
    """A copy of COCO JSON ``src`` without masks."""
    with open(src) as f:
        data = json.load(f)
    for ann in data["annotations"]:
        ann.pop("segmentation")
    with open(dst, "w") as f:
        json.dump(data, f)
    return dst


def test_masks_the_config_cannot_read_are_refused_and_box_only_test_sets_get_box_ap(
    toy_coco, tmp_path, caplog
):
    """Box-only or RLE training data used to fail at the first iteration inside detectron2
    (exit 1), and a box-only test set failed in pycocotools' mask evaluation after the training."""
    import logging

    (train_json, root), (val_json, val_root) = toy_coco["train"], toy_coco["val"]
    boxes = _box_only(train_json, str(tmp_path / "boxes.json"))
    val_boxes = _box_only(val_json, str(tmp_path / "val_boxes.json"))
    opts = [*TINY_OPTS, "SOLVER.MAX_ITER", "1", "SOLVER.STEPS", "()", "SOLVER.IMS_PER_BATCH", "2"]
    train_det = load_tool("train_det")

    def argv(data, *more, out):
        return [
            "--config-file",
            TINY_CONFIG,
            *data,
            *opts,
            *more,
            "OUTPUT_DIR",
            str(tmp_path / out),
        ]

    no_test = ("DATASETS.TEST", "()")
    code = train_det.cli(argv(["--coco-train", boxes, root], *no_test, out="a"))
    _refused(caplog, code, "has boxes only", "add MODEL.MASK_ON False")
    caplog.clear()
    # the recipes' polygon format; the toy set's masks are RLE (demo_tiny.yaml reads bitmasks)
    polygon = ("INPUT.MASK_FORMAT", "polygon")
    code = train_det.cli(argv(["--coco-train", train_json, root], *no_test, *polygon, out="b"))
    _refused(caplog, code, "have RLE masks", "add INPUT.MASK_FORMAT bitmask")
    caplog.clear()

    # a box-only test set: box AP, and a warning that says why there is no mask AP
    data = ["--coco-train", train_json, root]
    test = ["DATASETS.COCO", repr([["toy_boxes_val", val_boxes, val_root]])]
    test += ["DATASETS.TEST", "('toy_boxes_val',)"]
    with caplog.at_level(logging.INFO):
        results = train_det.main(train_det.parser().parse_args(argv(data, *test, out="c")))
    assert "bbox" in results and "segm" not in results
    assert "have no 'segmentation', so mask AP cannot be computed" in caplog.text


def test_a_segmentor_checkpoint_initialises_the_detector_s_vit(toy_coco, tmp_path, caplog):
    """An mmengine iter_N.pth of a segmentor (ViT under backbone.vit., message hub in its meta)
    was refused by weights_only, and as a bare state dict taken for a detector of this code,
    of which nothing loaded (detectron2 only warned)."""
    from mmengine.logging import HistoryBuffer

    from mae_transfer.compat import mmengine_compat  # noqa: F401  (pickles as train_seg saves)

    _, enc = _official_encoder_file(tmp_path)
    state = {f"backbone.vit.{k}": v for k, v in enc.items()}
    state["decode_head.conv_seg.weight"] = torch.zeros(3, 8, 1, 1)
    path = str(tmp_path / "iter_40.pth")
    torch.save({"meta": {"hub": HistoryBuffer([1.0, 2.0], [1, 1])}, "state_dict": state}, path)
    cfg = _cfg(toy_coco, tmp_path / "out", weights=path)
    model = build_model(cfg)
    allowed = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()  # as in a process that never imported mmseg code
    try:
        with caplog.at_level("INFO"):
            MAECheckpointer(model).load(path)
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(allowed)
    vit = model.backbone.bottom_up.vit
    assert torch.equal(vit.blocks[2].attn.qkv.weight, enc["blocks.2.attn.qkv.weight"])
    assert "prefix 'backbone.vit.' stripped" in caplog.text
    with pytest.raises(CheckpointError, match="holds a ViT but not a detector"):
        MAECheckpointer(build_model(cfg), whole_model=True).load(path)


def test_train_det_takes_options_after_the_overrides():
    """An option after KEY VALUE pairs was one more override (yacs: 'odd length')."""
    argv = ["--config-file", TINY_CONFIG, "SOLVER.MAX_ITER", "1", "--coco-train", "a.json", "im"]
    argv += ["SOLVER.WEIGHT_DECAY", "-0.1", "OUTPUT_DIR", "out", "--resume"]
    args = load_tool("train_det").parser().parse_intermixed_args(argv)
    assert args.opts == ["SOLVER.MAX_ITER", "1", "SOLVER.WEIGHT_DECAY", "-0.1", "OUTPUT_DIR", "out"]
    assert args.coco_train == ["a.json", "im"] and args.resume and args.config_file == TINY_CONFIG


def test_drawn_predictions_are_each_image_s_best_scoring_top_k(monkeypatch, tmp_path):
    """The demo draws each scene's N best-scoring predictions (N its objects): at a fixed
    0.3 its rows showed one prediction or none."""
    from types import SimpleNamespace

    import numpy as np
    from detectron2.structures import Boxes, Instances

    import mae_transfer.detection.visualize as visualize

    inst = Instances((32, 32), scores=torch.tensor([0.125, 0.5, 0.25, 0.0625]))
    inst.pred_boxes = Boxes(torch.tensor([[0.0, 0.0, 8.0, 8.0]]).repeat(4, 1))
    drawn = []

    class Recorder:
        def __init__(self, img, **kw):
            self.img = img

        def draw_instance_predictions(self, instances):
            drawn.append(instances.scores.tolist())
            return SimpleNamespace(get_image=lambda: self.img)

    monkeypatch.setattr(
        visualize, "predict", lambda cfg, model, path: (np.zeros((32, 32, 3)), inst)
    )
    monkeypatch.setattr(visualize, "Visualizer", Recorder)
    monkeypatch.setattr(visualize, "class_names", lambda cfg, name: None)
    cfg = SimpleNamespace(INPUT=SimpleNamespace(FORMAT="RGB"), DATASETS=SimpleNamespace(TEST=["t"]))
    out = str(tmp_path / "p.png")
    visualize.draw_predictions(cfg, None, ["a", "b"], out, 0.0, top_k=[2, 1])
    assert drawn == [[0.5, 0.25], [0.5]]
    drawn.clear()
    visualize.draw_predictions(cfg, None, ["a"], out, 0.2)
    assert drawn == [[0.5, 0.25]] and os.path.isfile(out)
