"""LVIS for the detectron2 transfer: the LVIS-format loader, sigmoid CE and the federated loss,
repeat factor sampling, LVIS evaluation, the LVIS configs and the values they refuse."""

from __future__ import annotations

import glob
import itertools
import json
import math
import os
import re

import numpy as np
import pytest
import torch

pytest.importorskip("detectron2")
pytest.importorskip("lvis")

import mae_transfer.detection  # noqa: E402,F401  (compat fixes before detectron2's imports)

# isort: split
from conftest import ROOT  # noqa: E402
from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from detectron2.layers import ShapeSpec  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.modeling.box_regression import Box2BoxTransform  # noqa: E402
from detectron2.structures import Boxes, Instances  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402
from PIL import Image  # noqa: E402

from mae_transfer.detection.data import ResumableRepeatFactorSampler, train_sampler  # noqa: E402
from mae_transfer.detection.fed_loss import (  # noqa: E402
    SigmoidFastRCNNOutputLayers,
    fed_loss_classes,
    set_fed_loss_frequencies,
    sigmoid_ce_loss,
)
from mae_transfer.detection.train import (  # noqa: E402
    Trainer,
    build_cfg,
    register_coco_datasets,
    summarize,
)
from mae_transfer.engine.config import ConfigError  # noqa: E402

CONFIG_DIR = os.path.join(ROOT, "configs", "detectron2")
TINY_CONFIG = os.path.join(CONFIG_DIR, "demo_tiny.yaml")

# (name, LVIS frequency, colour): "unseen" has no instance at all (image_count 0)
CLASSES = [
    ("red_box", "f", (220, 40, 40)),
    ("green_box", "c", (40, 200, 60)),
    ("blue_box", "r", (40, 60, 220)),
    ("unseen", "r", (0, 0, 0)),
]
SIZE = 64


def _image(rng, kinds):
    """A 64 px grey-noise image with one rectangle per kind, each in its own quadrant."""
    pixels = rng.integers(90, 140, (SIZE, SIZE, 3)).astype(np.uint8)
    objects = []
    for q, kind in enumerate(kinds):
        w, h = (int(v) for v in rng.integers(12, 28, 2))
        x0 = int(32 * (q % 2) + rng.integers(0, 32 - w + 1))
        y0 = int(32 * (q // 2) + rng.integers(0, 32 - h + 1))
        pixels[y0 : y0 + h, x0 : x0 + w] = CLASSES[kind][2]
        objects.append((kind, [x0, y0, w, h]))
    return pixels, objects


def write_tiny_lvis(root: str, split: str, n: int, seed: int, image_counts=True) -> str:
    """An LVIS-format file over ``n`` generated images in root/split; returns its path."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, split), exist_ok=True)
    images, annotations = [], []
    for i in range(n):
        # the rare class in every 4th image only; "unseen" in none
        kinds = [0, 1, 2] if i % 4 == 0 else [int(k) for k in rng.choice(2, rng.integers(1, 3))]
        pixels, objects = _image(rng, kinds)
        name = f"{split}_{i:03d}.png"
        Image.fromarray(pixels).save(os.path.join(root, split, name))
        present = {k + 1 for k, _ in objects}
        images.append(
            {
                "id": i + 1,
                "width": SIZE,
                "height": SIZE,
                # LVIS v1 names the file by its COCO URL: <split folder>/<file>
                "coco_url": f"http://images.example.org/{split}/{name}",
                "file_name": name,  # (for the same images read as a COCO file)
                "not_exhaustive_category_ids": [1] if i % 3 == 0 else [],
                "neg_category_ids": sorted({1, 2, 3, 4} - present)[:1],
            }
        )
        for kind, (x, y, w, h) in objects:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": kind + 1,
                    "bbox": [x, y, w, h],
                    "area": float(w * h),
                    "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]],
                }
            )
    categories = []
    for k, (name, frequency, _) in enumerate(CLASSES):
        cat = {"id": k + 1, "name": name, "synonyms": [name], "frequency": frequency}
        if image_counts:
            cat["image_count"] = len(
                {a["image_id"] for a in annotations if a["category_id"] == k + 1}
            )
        categories.append(cat)
    data = {"images": images, "annotations": annotations, "categories": categories}
    path = os.path.join(root, f"lvis_{split}{'' if image_counts else '_uncounted'}.json")
    with open(path, "w") as f:
        json.dump(data, f)
    return path


@pytest.fixture(scope="module")
def tiny_lvis(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("tiny_lvis"))
    return {
        "root": root,
        "train": write_tiny_lvis(root, "train", 16, seed=0),
        "val": write_tiny_lvis(root, "val", 4, seed=1),
        "train_uncounted": write_tiny_lvis(root, "train", 16, seed=0, image_counts=False),
    }


TINY_OPTS = [
    "MODEL.VIT.SIZE_OVERRIDES",
    "[['embed_dim', 32], ['depth', 4], ['num_heads', 2]]",
    "MODEL.VIT.IMG_SIZE",
    str(SIZE),
    "INPUT.LSJ.IMAGE_SIZE",
    str(SIZE),
    "INPUT.MASK_FORMAT",
    "polygon",  # LVIS's masks are polygons
    "MODEL.ROI_HEADS.NUM_CLASSES",
    str(len(CLASSES)),
    "SOLVER.IMS_PER_BATCH",
    "2",
    "SOLVER.STEPS",
    "()",
    "SOLVER.WARMUP_ITERS",
    "1",
]
FED_LOSS = [
    "MODEL.ROI_HEADS.NAME",
    "SigmoidROIHeads",
    "MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE",
    "True",
    "MODEL.ROI_BOX_HEAD.USE_FED_LOSS",
    "True",
    "MODEL.ROI_BOX_HEAD.FED_LOSS_NUM_CLASSES",
    "3",
]


def _lvis_cfg(tiny_lvis, out, opts=(), iters=3, val=True):
    opts = TINY_OPTS + [
        "OUTPUT_DIR",
        str(out),
        "SOLVER.MAX_ITER",
        str(iters),
        *opts,
    ]
    train = (tiny_lvis["train"], tiny_lvis["root"])
    cfg = build_cfg(
        TINY_CONFIG, opts, lvis_train=train, lvis_val=val and (tiny_lvis["val"], tiny_lvis["root"])
    )
    if not val:
        cfg.DATASETS.TEST = ()
    register_coco_datasets(cfg)
    return cfg


def _file(path):
    with open(path) as f:
        return json.load(f)


def test_an_lvis_file_is_read_with_its_categories_frequencies_and_image_lists(tiny_lvis, tmp_path):
    cfg = _lvis_cfg(tiny_lvis, tmp_path)
    assert cfg.DATASETS.TRAIN == ("custom_lvis_train",) and cfg.DATASETS.TEST == (
        "custom_lvis_val",
    )
    dicts = DatasetCatalog.get("custom_lvis_train")
    data = _file(tiny_lvis["train"])
    assert len(dicts) == 16
    first = dicts[0]
    # the file by its coco_url: <image root>/<split folder>/<file>
    assert first["file_name"] == os.path.join(tiny_lvis["root"], "train", "train_000.png")
    assert first["not_exhaustive_category_ids"] == [1] and first["neg_category_ids"] == [4]
    assert [o["category_id"] for o in first["annotations"]] == [0, 1, 2]  # ids 1..K -> 0..K-1
    assert first["annotations"][0]["segmentation"] == data["annotations"][0]["segmentation"]
    meta = MetadataCatalog.get("custom_lvis_train")
    assert meta.evaluator_type == "lvis"
    assert meta.thing_classes == [c[0] for c in CLASSES]
    counts = {c["id"]: c["image_count"] for c in data["categories"]}
    assert {e["id"]: e["image_count"] for e in meta.class_image_count} == counts
    assert counts[3] == 4 and counts[4] == 0  # the rare class in every 4th image; unseen none
    # a file whose categories have no image_count: counted from its annotations, the same
    register_coco_datasets(
        _with(
            cfg, "DATASETS.LVIS", [["uncounted", tiny_lvis["train_uncounted"], tiny_lvis["root"]]]
        )
    )
    DatasetCatalog.get("uncounted")
    assert MetadataCatalog.get("uncounted").class_image_count == meta.class_image_count


def _with(cfg, key, value):
    cfg = cfg.clone()
    cfg.defrost()
    cfg.merge_from_list([key, repr(value) if not isinstance(value, str) else value])
    return cfg


def _bce(x: float, t: int) -> float:
    p = 1 / (1 + math.exp(-x))
    return -(t * math.log(p) + (1 - t) * math.log(1 - p))


def test_sigmoid_ce_is_the_hand_computed_binary_cross_entropy():
    logits = torch.tensor(
        [[2.0, -1.0, 0.5, 3.0], [-0.5, 1.5, -2.0, -3.0], [0.3, 0.0, 1.0, 9.0]],
        requires_grad=True,
    )
    gt = torch.tensor([0, 2, 3])  # class 0, class 2, background (K = 3)
    targets = [[1, 0, 0], [0, 0, 1], [0, 0, 0]]  # the background column is not read
    values = logits.tolist()
    hand = sum(_bce(values[r][k], targets[r][k]) for r in range(3) for k in range(3)) / 3
    assert sigmoid_ce_loss(logits, gt).item() == pytest.approx(hand, rel=1e-6)
    scored = torch.tensor([True, False, True])
    hand = sum(_bce(values[r][k], targets[r][k]) for r in range(3) for k in (0, 2)) / 3
    loss = sigmoid_ce_loss(logits, gt, scored)
    assert loss.item() == pytest.approx(hand, rel=1e-6)
    loss.backward()
    assert logits.grad[:, 1].abs().sum() == 0 and logits.grad[:, 3].abs().sum() == 0
    assert (logits.grad[:, [0, 2]] != 0).all()
    empty = torch.zeros(0, 4, requires_grad=True)
    assert sigmoid_ce_loss(empty, torch.zeros(0, dtype=torch.long)).item() == 0.0


def test_the_fed_loss_scores_and_trains_only_the_chosen_classes():
    k = 10
    gt = torch.tensor([1, 4, 4, k, k])  # classes 1 and 4, and background proposals
    weights = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, k + 1, requires_grad=True)
    chosen = fed_loss_classes(gt, k, weights, max_classes=5, generator=g)
    # 5 = classes 1 and 4 + background (counted, never scored, as detectron2's) + 2 drawn
    assert chosen.shape == (k,) and chosen.sum() == 4 and chosen[1] and chosen[4]
    sigmoid_ce_loss(logits, gt, chosen).backward()
    has_grad = logits.grad.abs().sum(0) > 0
    assert has_grad[:k].tolist() == chosen.tolist() and not has_grad[k]
    for _ in range(50):  # a class of weight 0 is never drawn
        assert not fed_loss_classes(gt, k, weights, 5, generator=g)[[2, 5, 8]].any()


def test_the_fed_loss_draws_negatives_by_frequency_weight():
    weights = torch.tensor([1.0, 0.0, 9.0])
    g = torch.Generator().manual_seed(0)
    background_only = torch.tensor([3, 3])  # one class left to draw (background counts)
    draws = torch.stack([fed_loss_classes(background_only, 3, weights, 2, g) for _ in range(2000)])
    assert draws.sum(1).eq(1).all() and draws[:, 1].sum() == 0
    assert draws[:, 2].float().mean().item() == pytest.approx(0.9, abs=0.03)


def test_the_fed_loss_of_every_class_is_plain_sigmoid_ce():
    k = 6
    logits = torch.randn(8, k + 1)
    gt = torch.tensor([0, 3, 3, 5, 6, 6, 6, 6])
    chosen = fed_loss_classes(gt, k, torch.ones(k), max_classes=k + 1)
    assert chosen.all()
    # by hand: -log p for the proposal's own class, -log(1 - p) for the others; label k
    # (background) has no column of its own: every one of its K targets is 0
    p = logits[:, :k].sigmoid()
    target = torch.zeros(8, k)
    target[gt < k, gt[gt < k]] = 1.0
    by_hand = -(target * p.log() + (1 - target) * (1 - p).log()).sum() / 8
    assert torch.allclose(sigmoid_ce_loss(logits, gt, chosen), by_hand)
    assert torch.allclose(sigmoid_ce_loss(logits, gt), by_hand)
    # and the predictor's loss_cls with it is sigmoid CE (not detectron2's softmax CE)
    cfg = build_cfg(TINY_CONFIG, TINY_OPTS + FED_LOSS[:4] + ["MODEL.ROI_HEADS.NUM_CLASSES", str(k)])
    predictor = build_model(cfg).roi_heads.box_predictor
    proposals = Instances((64, 64))
    proposals.proposal_boxes = Boxes(torch.tensor([[0.0, 0, 10, 10]] * 8))
    proposals.gt_boxes = Boxes(torch.tensor([[1.0, 1, 11, 11]] * 8))
    proposals.gt_classes = gt
    with EventStorage():
        losses = predictor.losses((logits, torch.zeros(8, 4 * k)), [proposals])
    assert losses["loss_cls"].item() == pytest.approx(by_hand.item(), rel=1e-5)


def test_a_later_detectron2_s_own_sigmoid_branch_is_not_taken(monkeypatch):
    """A later detectron2's FastRCNNOutputLayers reads use_sigmoid_ce / use_fed_loss itself
    in losses() and predict_probs(), which ours call: those names must stay off (ours are
    private), or its branch would run and ask for a class-weight buffer we never build. And
    built from a config with USE_FED_LOSS (the parent heads build their own predictor before
    ours replaces it) it counts the training set's frequencies at once, before any data set
    is read: the parent heads get the config with those keys off."""
    from detectron2.modeling.roi_heads import fast_rcnn

    parent = fast_rcnn.FastRCNNOutputLayers
    original_losses, original_probs = parent.losses, parent.predict_probs
    original_from_config = parent.from_config.__func__

    def later_from_config(cls, cfg, input_shape):
        if cls is parent and cfg.MODEL.ROI_BOX_HEAD.USE_FED_LOSS:  # main's weights, at once
            raise AttributeError("'class_image_count' does not exist in the metadata")
        return original_from_config(cls, cfg, input_shape)

    monkeypatch.setattr(parent, "from_config", classmethod(later_from_config))

    def later(original):
        def method(self, predictions, proposals):
            if getattr(self, "use_sigmoid_ce", False) or getattr(self, "use_fed_loss", False):
                return self.fed_loss_cls_weights  # AttributeError, as on detectron2 main
            return original(self, predictions, proposals)

        return method

    monkeypatch.setattr(parent, "losses", later(original_losses))
    monkeypatch.setattr(parent, "predict_probs", later(original_probs))
    cascade = ["MODEL.ROI_HEADS.NAME", "SigmoidCascadeROIHeads"]
    cascade += ["MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", "True", "MODEL.MASK_ON", "False"]
    stages = build_model(build_cfg(TINY_CONFIG, TINY_OPTS + FED_LOSS + cascade)).roi_heads
    assert all(p._fed_loss for p in stages.box_predictor)
    model = build_model(build_cfg(TINY_CONFIG, TINY_OPTS + FED_LOSS))
    set_fed_loss_frequencies(model, torch.tensor([16, 9, 4, 1]))
    predictor = model.roi_heads.box_predictor
    proposals = Instances((64, 64))
    proposals.proposal_boxes = Boxes(torch.tensor([[0.0, 0, 10, 10]] * 3))
    proposals.gt_boxes, proposals.gt_classes = proposals.proposal_boxes, torch.tensor([0, 2, 4])
    logits = torch.randn(3, len(CLASSES) + 1)
    with EventStorage():
        losses = predictor.losses((logits, torch.zeros(3, 4 * len(CLASSES))), [proposals])
    assert torch.isfinite(losses["loss_cls"]) and "loss_box_reg" in losses
    (probs,) = predictor.predict_probs((logits, None), [proposals])
    assert torch.allclose(probs, logits.sigmoid())


def test_the_sigmoid_predictor_scores_by_sigmoid_and_needs_frequencies_for_the_fed_loss():
    cfg = build_cfg(TINY_CONFIG, TINY_OPTS + FED_LOSS)
    model = build_model(cfg)
    predictor = model.roi_heads.box_predictor
    assert isinstance(predictor, SigmoidFastRCNNOutputLayers) and predictor._fed_loss
    logits = torch.randn(3, len(CLASSES) + 1)
    proposals = Instances((64, 64))
    proposals.proposal_boxes = Boxes(torch.tensor([[0.0, 0, 10, 10]] * 3))
    (probs,) = predictor.predict_probs((logits, None), [proposals])
    assert torch.allclose(probs, logits.sigmoid())  # not a softmax over K + 1
    proposals.gt_boxes, proposals.gt_classes = proposals.proposal_boxes, torch.tensor([0, 2, 4])
    deltas = torch.zeros(3, 4 * len(CLASSES))
    with EventStorage(), pytest.raises(RuntimeError, match="needs the training set's class freq"):
        predictor.losses((logits, deltas), [proposals])
    assert set_fed_loss_frequencies(model, torch.tensor([16, 9, 4, 0])) == 1
    assert predictor.fed_loss_weights.tolist() == [4.0, 3.0, 2.0, 0.0]  # image count ^ 0.5
    with pytest.raises(ValueError, match="3 class frequencies for a classifier of 4 classes"):
        predictor.set_class_frequencies(torch.tensor([1, 2, 3]))


@pytest.mark.parametrize(
    "opts, expected",
    [
        (
            ["MODEL.ROI_HEADS.NAME", "SigmoidROIHeads", "MODEL.ROI_BOX_HEAD.USE_FED_LOSS", "True"],
            "USE_FED_LOSS scores each class by its own sigmoid; with the softmax cross-entropy "
            "(USE_SIGMOID_CE False) it cannot: set USE_SIGMOID_CE True",
        ),
        (
            FED_LOSS[2:],  # detectron2 0.6's StandardROIHeads would train softmax, silently
            "box predictor is softmax only), not by MODEL.ROI_HEADS.NAME 'StandardROIHeads': "
            "set MODEL.ROI_HEADS.NAME 'SigmoidROIHeads'",
        ),
        (
            FED_LOSS[2:] + ["MODEL.ROI_HEADS.NAME", "CascadeROIHeads"],
            "set MODEL.ROI_HEADS.NAME 'SigmoidCascadeROIHeads'",
        ),
        (
            FED_LOSS + ["MODEL.ROI_BOX_HEAD.FED_LOSS_NUM_CLASSES", "0"],
            "FED_LOSS_NUM_CLASSES (classes scored per batch) must be >= 1, got 0",
        ),
        (
            FED_LOSS + ["MODEL.ROI_BOX_HEAD.FED_LOSS_FREQ_WEIGHT_POWER", "-0.5"],
            "FED_LOSS_FREQ_WEIGHT_POWER must be >= 0",
        ),
        (
            ["DATALOADER.SAMPLER_TRAIN", "RepeatFactorTrainingSampler"]
            + ["DATALOADER.REPEAT_THRESHOLD", "-0.001"],
            "DATALOADER.REPEAT_THRESHOLD (RepeatFactorTrainingSampler: images with a class in "
            "fewer than this fraction of images are repeated) must be in (0, 1], got -0.001",
        ),
        (
            ["DATALOADER.SAMPLER_TRAIN", "RepeatFactorSampler"],
            "DATALOADER.SAMPLER_TRAIN must be one of",
        ),
        (
            ["DATASETS.LVIS", "[['a', 'b.json']]"],
            "DATASETS.LVIS entries are [name, json_file, image_root], got ['a', 'b.json']",
        ),
    ],
)
def test_bad_lvis_values_are_refused_before_anything_is_built(opts, expected):
    with pytest.raises(ConfigError, match=re.escape(expected)):
        build_cfg(TINY_CONFIG, TINY_OPTS + opts)


def _broken_copy(tiny_lvis, tmp_path, change) -> str:
    data = _file(tiny_lvis["train"])
    change(data)
    path = str(tmp_path / "broken.json")
    with open(path, "w") as f:
        json.dump(data, f)
    return path


@pytest.mark.parametrize(
    "case, expected",
    [
        ("partial_image_count", "1 categories (ids [2]) have no 'image_count' and 3 have one"),
        ("no_frequency", "categories [1] have no 'frequency' r / c / f"),
        ("no_image_lists", "lack not_exhaustive_category_ids or neg_category_ids"),
        ("absent_image", "1 of the 16 images"),
    ],
)
def test_lvis_files_missing_what_training_or_evaluation_reads_are_named(
    tiny_lvis, tmp_path, case, expected
):
    def change(data):
        if case == "partial_image_count":
            del data["categories"][1]["image_count"]
        elif case == "no_frequency":
            del data["categories"][0]["frequency"]
        elif case == "no_image_lists":
            del data["images"][5]["neg_category_ids"]
        else:
            data["images"][3]["coco_url"] = "http://images.example.org/train/gone.png"

    path = _broken_copy(tiny_lvis, tmp_path, change)
    cfg = _lvis_cfg(tiny_lvis, tmp_path / "out", val=False)
    register_coco_datasets(
        _with(cfg, "DATASETS.LVIS", [[f"broken_{case}", path, tiny_lvis["root"]]])
    )
    with pytest.raises(ConfigError, match=re.escape(expected)):
        DatasetCatalog.get(f"broken_{case}")


def test_fed_loss_frequencies_missing_or_of_other_classes_are_refused_before_training(
    tiny_lvis, tmp_path
):
    root = tiny_lvis["root"]
    coco = [
        ["coco_a", tiny_lvis["train"], f"{root}/train"],
        ["coco_b", tiny_lvis["train"], f"{root}/train"],
    ]
    cfg = _lvis_cfg(tiny_lvis, tmp_path / "out", FED_LOSS, val=False)
    # two COCO-format sets (no image_count): which frequencies to draw negatives by is unknown
    two = _with(cfg, "DATASETS.COCO", coco)
    two.DATASETS.TRAIN = ("coco_a", "coco_b")
    register_coco_datasets(two)
    with pytest.raises(
        ConfigError, match=r"the training sets \['coco_a', 'coco_b'\] have no class"
    ):
        Trainer(two)
    # one COCO-format set: counted from its annotations, as LVIS counts image_count
    one = two.clone()
    one.DATASETS.TRAIN = ("coco_a",)
    trainer = Trainer(one)
    counts = [c["image_count"] for c in _file(tiny_lvis["train"])["categories"]]
    weights = trainer.model.roi_heads.box_predictor.fed_loss_weights
    assert torch.allclose(weights, torch.tensor(counts, dtype=torch.float) ** 0.5)
    # the file's 4 categories for a classifier of 5
    five = _with(cfg, "MODEL.ROI_HEADS.NUM_CLASSES", "5")
    with pytest.raises(ConfigError, match="has frequencies of 4 categories, MODEL.ROI_HEADS.NUM_"):
        Trainer(five)


def test_repeat_factor_sampling_repeats_rare_images_and_resumes_its_order(tiny_lvis, tmp_path):
    rfs = ["DATALOADER.SAMPLER_TRAIN", "RepeatFactorTrainingSampler"]
    cfg = _lvis_cfg(
        tiny_lvis, tmp_path / "out", rfs + ["DATALOADER.REPEAT_THRESHOLD", "0.5"], val=False
    )
    sampler = train_sampler(Trainer.build_train_loader(cfg))
    assert isinstance(sampler, ResumableRepeatFactorSampler)
    # an image is repeated by its rarest class c: max(1, sqrt(0.5 / f(c))), f(c) the fraction
    # of images with c; the blue (rare) box is in 4 of 16: sqrt(0.5 / 0.25) = 1.41
    dicts = DatasetCatalog.get("custom_lvis_train")
    classes = [{o["category_id"] for o in d["annotations"]} for d in dicts]
    share = {c: sum(c in cs for cs in classes) / len(dicts) for c in range(3)}
    assert share[2] == 0.25
    expected = [max(1.0, *(math.sqrt(0.5 / share[c]) for c in cs)) for cs in classes]
    factors = (sampler._int_part + sampler._frac_part).tolist()
    assert factors == pytest.approx(expected, rel=1e-5)
    assert factors[0] == pytest.approx(math.sqrt(2), rel=1e-5)
    stream = list(itertools.islice(iter(sampler), 40))
    sampler.skip = 12
    assert list(itertools.islice(iter(sampler), 28)) == stream[12:]
    # --resume: the checkpoint records its order; a resumed trainer continues it
    first = Trainer(cfg)
    first.iter = 4
    state = first.state_dict()
    seed = train_sampler(first.data_loader)._seed
    assert state["data_order"]["seed"] == seed
    second = Trainer(cfg)
    second.load_state_dict(state)
    resumed = train_sampler(second.data_loader)
    assert isinstance(resumed, ResumableRepeatFactorSampler)
    assert (resumed._seed, resumed.skip) == (seed, 5 * cfg.SOLVER.IMS_PER_BATCH)


def test_a_short_fed_loss_run_ends_in_an_lvis_evaluation(tiny_lvis, tmp_path):
    opts = FED_LOSS + ["DATALOADER.SAMPLER_TRAIN", "RepeatFactorTrainingSampler"]
    opts += ["DATALOADER.REPEAT_THRESHOLD", "0.5", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.02"]
    cfg = _lvis_cfg(tiny_lvis, tmp_path / "out", opts, iters=3)
    cfg.freeze()
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    results = trainer.train()
    assert math.isfinite(trainer.storage.history("loss_cls").latest())
    for task in ("bbox", "segm"):  # LVISEvaluator's: AP by frequency group too
        assert {"AP", "AP50", "APr", "APc", "APf"} <= set(results[task])
        assert math.isfinite(results[task]["AP"])
    summary = summarize(results)
    assert {"bbox_AP", "bbox_APr", "segm_APf"} <= set(summary)
    assert os.path.isfile(tmp_path / "out" / "lvis_instances_results.json")
    weights = trainer.model.roi_heads.box_predictor.fed_loss_weights
    counts = [c["image_count"] for c in _file(tiny_lvis["train"])["categories"]]
    assert weights.tolist() == pytest.approx([c**0.5 for c in counts])


def test_the_cascade_trains_with_the_fed_loss_in_every_stage(tiny_lvis, tmp_path):
    opts = FED_LOSS + ["MODEL.ROI_HEADS.NAME", "SigmoidCascadeROIHeads"]
    opts += ["MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", "True", "MODEL.MASK_ON", "False"]
    cfg = _lvis_cfg(tiny_lvis, tmp_path / "out", opts, iters=1, val=False)
    trainer = Trainer(cfg)
    predictors = trainer.model.roi_heads.box_predictor
    assert [type(p).__name__ for p in predictors] == ["SigmoidFastRCNNOutputLayers"] * 3
    assert [p.box2box_transform.weights[0] for p in predictors] == [10, 20, 30]
    assert all(p.fed_loss_weights is not None for p in predictors)
    trainer.train()
    last = trainer.storage.latest()
    for stage in range(3):
        assert math.isfinite(last[f"loss_cls_stage{stage}"][0])


# ViTDet's LVIS configs (projects/ViTDet/configs/LVIS/*_vitdet_{b,l,h}_100ep.py) per size: layer
# decay, drop path and lr (its H: drop path 0.4 where its COCO H has 0.5, lr 1e-4 where its LVIS
# B / L have 2e-4); all sizes and both heads: 100 epochs of LVIS
VITDET_LVIS = {"base": (0.7, 0.1, 2e-4), "large": (0.8, 0.4, 2e-4), "huge": (0.9, 0.4, 1e-4)}
LVIS_CONFIGS = sorted(glob.glob(os.path.join(CONFIG_DIR, "*_lvis_100ep.yaml")))


def _flat(node, prefix=""):
    """A config as {dotted key: value}."""
    out = {}
    for k, v in node.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def _differing(a, b) -> set:
    fa, fb = _flat(a), _flat(b)
    return {k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k)}


def _coco_twin(name: str, size: str) -> str:
    """The COCO Mask R-CNN config of the LVIS one's size and pyramid (ViTDet's H: 75 epochs)."""
    pyramid = "vitdet" if "_vitdet_" in name else "vit"
    kind = f"mask_rcnn_{pyramid}_{size}_{'fpn_' if pyramid == 'vit' else ''}lsj_*ep.yaml"
    (path,) = glob.glob(os.path.join(CONFIG_DIR, kind))
    return path


def test_the_lvis_configs_are_the_nine_of_vitdet_s_table_and_ours():
    names = {os.path.basename(p) for p in LVIS_CONFIGS}
    sizes = ("base", "large", "huge")
    assert names == {f"mask_rcnn_vit_{s}_fpn_lvis_100ep.yaml" for s in sizes} | {
        f"{head}mask_rcnn_vitdet_{s}_lvis_100ep.yaml" for s in sizes for head in ("", "cascade_")
    }


@pytest.mark.parametrize("path", LVIS_CONFIGS, ids=os.path.basename)
def test_the_lvis_configs_are_vitdet_s_lvis_recipe(path):
    name = os.path.basename(path)
    size = re.search(r"_(base|large|huge)_", name).group(1)
    cascade = name.startswith("cascade_")
    cfg = build_cfg(path, ["MODEL.DEVICE", "meta"])
    # the LVIS recipe, the same at every size
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 1203 and cfg.DATASETS.TRAIN == ("lvis_v1_train",)
    assert cfg.DATASETS.TEST == ("lvis_v1_val",)
    head = cfg.MODEL.ROI_BOX_HEAD
    assert head.USE_SIGMOID_CE and head.USE_FED_LOSS
    assert (head.FED_LOSS_FREQ_WEIGHT_POWER, head.FED_LOSS_NUM_CLASSES) == (0.5, 50)
    assert cfg.DATALOADER.SAMPLER_TRAIN == "RepeatFactorTrainingSampler"
    assert cfg.DATALOADER.REPEAT_THRESHOLD == 0.001
    assert cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST == 0.02 and cfg.TEST.DETECTIONS_PER_IMAGE == 300
    assert (cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS) == (156250, (138889, 150463))
    assert (cfg.SOLVER.WARMUP_ITERS, cfg.TEST.EVAL_PERIOD) == (250, 30000)
    # ViTDet's values for the size
    solver = (cfg.SOLVER.LAYER_DECAY, cfg.MODEL.VIT.DROP_PATH_RATE, cfg.SOLVER.BASE_LR)
    assert solver == VITDET_LVIS[size]
    # the rest is the COCO config's of that size and pyramid (but ViTDet's LVIS H drop path)
    coco = build_cfg(_coco_twin(name, size), ["MODEL.DEVICE", "meta"])
    assert _differing(cfg.MODEL.VIT, coco.MODEL.VIT) == (
        {"DROP_PATH_RATE"} if size == "huge" else set()
    )
    assert cfg.MODEL.BACKBONE == coco.MODEL.BACKBONE and cfg.INPUT == coco.INPUT
    assert (cfg.MODEL.WEIGHTS, cfg.SOLVER.LAYER_DECAY) == (
        coco.MODEL.WEIGHTS,
        coco.SOLVER.LAYER_DECAY,
    )
    # what differs from the ViT-B LVIS config of the same heads and pyramid: the ViT, its layer
    # decay, and for ViT-H the lr (never the LVIS settings or the schedule)
    base = build_cfg(path.replace(f"_{size}_", "_base_"), ["MODEL.DEVICE", "meta"])
    expected = set()
    if size != "base":
        expected = {"WEIGHTS", "VIT.NAME", "VIT.DROP_PATH_RATE", "VIT.USE_CHECKPOINT"}
        expected = {f"MODEL.{k}" for k in expected} | {"SOLVER.LAYER_DECAY"}
        expected |= set() if "_vitdet_" in name else {"MODEL.VIT.OUT_INDICES"}
        expected |= {"MODEL.VIT.PATCH_SIZE", "SOLVER.BASE_LR"} if size == "huge" else set()
    assert _differing(cfg, base) == expected
    if cascade:  # ViTDet's LVIS cascade: its LVIS Mask R-CNN with three class-agnostic stages
        plain = build_cfg(path.replace("cascade_", ""), ["MODEL.DEVICE", "meta"])
        cascade_keys = {"MODEL.ROI_HEADS.NAME", "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG"}
        assert _differing(cfg, plain) == cascade_keys
    with torch.device("meta"):
        model = build_model(cfg)
    # ViTDet's global blocks (the others windowed, 14): each quarter's last
    vit = model.backbone.net if "_vitdet_" in name else model.backbone.bottom_up.vit
    depth = {"base": 12, "large": 24, "huge": 32}[size]
    assert vit.global_blocks == tuple(range(depth // 4 - 1, depth, depth // 4))
    assert {b.window_size for b in vit.blocks} == {0, 14}
    heads = model.roi_heads
    assert type(heads).__name__ == ("SigmoidCascadeROIHeads" if cascade else "SigmoidROIHeads")
    predictors = list(heads.box_predictor) if cascade else [heads.box_predictor]
    assert len(predictors) == (3 if cascade else 1)
    for predictor in predictors:  # every stage's: sigmoid CE + fed loss, LVIS's test settings
        assert isinstance(predictor, SigmoidFastRCNNOutputLayers) and predictor.num_classes == 1203
        assert predictor._sigmoid_ce and predictor._fed_loss
        assert (predictor._fed_loss_power, predictor._fed_loss_max_classes) == (0.5, 50)
        assert (predictor.test_score_thresh, predictor.test_topk_per_image) == (0.02, 300)


def test_train_det_takes_lvis_files(tiny_lvis, tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("tool_train_det", f"{ROOT}/tools/train_det.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    args = tool.parser().parse_intermixed_args(
        ["--config-file", TINY_CONFIG, "--lvis-train", tiny_lvis["train"], tiny_lvis["root"]]
        + ["--lvis-val", tiny_lvis["val"], tiny_lvis["root"], "OUTPUT_DIR", str(tmp_path)]
        + TINY_OPTS
    )
    cfg = tool.load_cfg(args)
    expected = [
        ["custom_lvis_train", tiny_lvis["train"], tiny_lvis["root"]],
        ["custom_lvis_val", tiny_lvis["val"], tiny_lvis["root"]],
    ]
    registered = cfg.DATASETS.LVIS
    assert registered == expected
    assert Trainer.build_evaluator(cfg, "custom_lvis_val").__class__.__name__ == "LVISEvaluator"


def test_an_lvis_test_set_with_some_of_the_training_categories_is_numbered_as_training(
    tiny_lvis, tmp_path
):
    """As for COCO files: the test file is rewritten with the training set's categories
    (the missing ones with the training file's entries, frequencies included), so the
    detector's class k is the same category in the evaluation, which runs to the end."""
    from mae_transfer.detection.train import align_test_categories

    val = _file(tiny_lvis["val"])
    dropped = val["categories"][1]["id"]
    val["categories"] = [c for c in val["categories"] if c["id"] != dropped]
    for entry in val["categories"]:  # a test file without image counts, the training's with
        del entry["image_count"]
    val["annotations"] = [a for a in val["annotations"] if a["category_id"] != dropped]
    for image in val["images"]:
        for key in ("neg_category_ids", "not_exhaustive_category_ids"):
            image[key] = [c for c in image[key] if c != dropped]
    part = tmp_path / "val_part.json"
    part.write_text(json.dumps(val))
    opts = TINY_OPTS + ["OUTPUT_DIR", str(tmp_path / "out"), "SOLVER.MAX_ITER", "1", *FED_LOSS]
    opts += ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"]
    cfg = build_cfg(
        TINY_CONFIG,
        opts,
        lvis_train=(tiny_lvis["train"], tiny_lvis["root"]),
        lvis_val=(str(part), tiny_lvis["root"]),
    )
    register_coco_datasets(cfg)
    trainer = Trainer(cfg)  # reads the training set
    DatasetCatalog.get("custom_lvis_val")
    train, test = (MetadataCatalog.get(f"custom_lvis_{s}") for s in ("train", "val"))
    assert test.thing_dataset_id_to_contiguous_id != train.thing_dataset_id_to_contiguous_id
    align_test_categories(cfg)
    DatasetCatalog.get("custom_lvis_val")  # (its metadata is set when it loads)
    test = MetadataCatalog.get("custom_lvis_val")
    assert test.thing_dataset_id_to_contiguous_id == train.thing_dataset_id_to_contiguous_id
    written = {c["id"]: c for c in _file(test.json_file)["categories"]}
    trained = {c["id"]: c for c in _file(tiny_lvis["train"])["categories"]}
    assert written[dropped]["frequency"] == trained[dropped]["frequency"]
    assert not any("image_count" in c for c in written.values())  # (a test set's: not read)
    trainer.resume_or_load(resume=False)
    results = trainer.train()
    assert math.isfinite(results["bbox"]["AP"])


LAZY_LVIS = [
    "mask_rcnn_vit_base_fpn_lvis_100ep.py",
    "mask_rcnn_vitdet_base_lvis_100ep.py",
    "cascade_mask_rcnn_vitdet_base_lvis_100ep.py",  # a fed-loss predictor per stage
]


def _tiny_lazy_lvis(tiny_lvis, path, out):
    """An LVIS LazyConfig on the tiny LVIS files as a user points it at their own: the files
    registered, their names, classes and sizes given as overrides, saved and read back as
    detectron2's lazyconfig_train_net.py saves it (config.yaml)."""
    from detectron2.config import LazyConfig

    from mae_transfer.detection.train import register_lvis

    for split in ("train", "val"):
        if f"lazy_lvis_{split}" not in DatasetCatalog.list():
            register_lvis(f"lazy_lvis_{split}", tiny_lvis[split], tiny_lvis["root"])
    cfg = LazyConfig.load(path)
    vitdet = "vitdet" in os.path.basename(path)
    vit = "model.backbone" if vitdet else "model.backbone.bottom_up"
    tiny = ["embed_dim=32", "depth=4", "num_heads=2", f"img_size={SIZE}", f"square_pad={SIZE}"]
    overrides = [f"{vit}.{kv}" for kv in tiny] + ([] if vitdet else [f"{vit}.out_indices=null"])
    overrides += [
        "dataloader.train.dataset.names=lazy_lvis_train",
        "dataloader.test.dataset.names=lazy_lvis_val",
        f"model.roi_heads.num_classes={len(CLASSES)}",
        "dataloader.train.total_batch_size=2",
        "dataloader.train.num_workers=0",
        "dataloader.test.num_workers=0",
        f"dataloader.evaluator.output_dir={out}",
        "train.max_iter=2",
    ]
    LazyConfig.apply_overrides(cfg, overrides)
    resize, crop, _ = cfg.dataloader.train.mapper.augmentations  # LSJ at 64 px
    resize.update(target_height=SIZE, target_width=SIZE)
    crop.crop_size = (SIZE, SIZE)
    cfg.dataloader.test.mapper.augmentations[0].update(short_edge_length=SIZE, max_size=SIZE)
    LazyConfig.save(cfg, str(out / "config.yaml"))
    return LazyConfig.load(str(out / "config.yaml"))


@pytest.mark.parametrize("name", LAZY_LVIS)
def test_an_lvis_lazy_config_trains_in_detectron2_s_own_loop(tiny_lvis, tmp_path, name):
    """tools/lazyconfig_train_net.py's steps, none of our Trainer: the model (its fed loss
    weighted by the training set's counts from the config alone), the optimizer, the train
    loader with repeat factor sampling, two steps of detectron2's trainer, LVIS evaluation."""
    from detectron2.config import instantiate
    from detectron2.data.samplers import RepeatFactorTrainingSampler
    from detectron2.engine import AMPTrainer, SimpleTrainer, hooks
    from detectron2.evaluation import LVISEvaluator, inference_on_dataset

    cfg = _tiny_lazy_lvis(tiny_lvis, os.path.join(CONFIG_DIR, "lazy", name), tmp_path)
    model = instantiate(cfg.model)
    cascade = name.startswith("cascade_")
    predictors = model.roi_heads.box_predictor
    predictors = list(predictors) if cascade else [predictors]
    assert len(predictors) == (3 if cascade else 1)
    counts = [c["image_count"] for c in _file(tiny_lvis["train"])["categories"]]
    for predictor in predictors:  # (the cascade's: each stage's)
        assert isinstance(predictor, SigmoidFastRCNNOutputLayers) and predictor._fed_loss
        assert predictor.fed_loss_weights.tolist() == pytest.approx([c**0.5 for c in counts])
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    loader = instantiate(cfg.dataloader.train)
    sampler = loader.dataset.dataset.sampler  # grouped by aspect ratio, over the sampled stream
    assert isinstance(sampler, RepeatFactorTrainingSampler)
    # detectron2 0.6's AMPTrainer is CUDA-only (fp16): the CPU run is the fp32 SimpleTrainer
    amp = cfg.train.amp.enabled and torch.cuda.is_available()
    trainer = (AMPTrainer if amp else SimpleTrainer)(model, loader, optimizer)
    trainer.register_hooks([hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier))])
    trainer.train(0, cfg.train.max_iter)
    for loss in [f"loss_cls_stage{i}" for i in range(3)] if cascade else ["loss_cls"]:
        steps = trainer.storage.history(loss).values()
        assert len(steps) == 2 and all(math.isfinite(v) for v, _ in steps)
    evaluator = instantiate(cfg.dataloader.evaluator)
    assert isinstance(evaluator, LVISEvaluator) and evaluator._max_dets_per_image == 300
    results = inference_on_dataset(model, instantiate(cfg.dataloader.test), evaluator)
    assert {"AP", "APr", "APc", "APf"} <= set(results["bbox"]) and "segm" in results
    assert os.path.isfile(tmp_path / "lvis_instances_results.json")


def test_the_lazy_fed_loss_counts_named_sets_as_the_yaml_path_and_refuses_others(tiny_lvis):
    """fed_loss_datasets: the image counts of an LVIS file's categories; a COCO-format set
    (no counts in its metadata) counted from its annotations, the same; an unregistered name,
    and several sets without counts, named."""
    from detectron2.data.datasets import register_coco_instances

    from mae_transfer.detection.train import register_lvis

    def predictor(names, num_classes=len(CLASSES)):
        return SigmoidFastRCNNOutputLayers(
            ShapeSpec(channels=8),
            box2box_transform=Box2BoxTransform(weights=(10, 10, 5, 5)),
            num_classes=num_classes,
            use_sigmoid_ce=True,
            use_fed_loss=True,
            fed_loss_datasets=names,
        )

    counts = torch.tensor([c["image_count"] for c in _file(tiny_lvis["train"])["categories"]])
    if "counts_lvis" not in DatasetCatalog.list():
        register_lvis("counts_lvis", tiny_lvis["train"], tiny_lvis["root"])
        for name in ("counts_coco", "counts_coco_b"):  # the same file read as COCO's format
            register_coco_instances(name, {}, tiny_lvis["train"], f"{tiny_lvis['root']}/train")
    # several sets, some without counts: which frequencies to draw negatives by is unknown
    with pytest.raises(ConfigError, match=r"\['counts_coco', 'counts_coco_b'\] have no class"):
        predictor(["counts_lvis", "counts_coco", "counts_coco_b"])
    for name in ("counts_lvis", "counts_coco"):
        weights = predictor(name).fed_loss_weights
        assert torch.allclose(weights, counts.float() ** 0.5), name
    assert predictor([]).fed_loss_weights is None  # none named: given later, as in the YAML path
    with pytest.raises(ConfigError, match=r"\['nowhere'\] are not registered: register"):
        predictor(["counts_lvis", "nowhere"])
    with pytest.raises(ConfigError, match="has frequencies of 4 categories"):
        predictor("counts_lvis", num_classes=5)
    # --eval-only where the training file is not: the override that avoids reading it, named
    if "counts_absent" not in DatasetCatalog.list():
        register_coco_instances("counts_absent", {}, f"{tiny_lvis['root']}/absent.json", "x")
    with pytest.raises(ConfigError, match=r"could not be read .*fed_loss_datasets=\[\]"):
        predictor("counts_absent")


def test_an_lvis_test_subset_of_detectron2_s_builtin_lvis_v1_is_numbered_as_it(tiny_lvis, tmp_path):
    """detectron2 0.6's lvis_v1_train has no id map in its metadata (LVIS's ids are 1..1203):
    a test file of some LVIS v1 categories is numbered as LVIS v1, the missing entries taken
    from the LVIS v1 list detectron2 ships (was: numbered from its own list, silently)."""
    from detectron2.data.datasets.lvis_v1_categories import LVIS_CATEGORIES

    from mae_transfer.detection.train import align_test_categories, categories

    assert categories("lvis_v1_train") == {c["id"]: c["name"] for c in LVIS_CATEGORIES}
    val = _file(tiny_lvis["val"])
    lvis_id = {c["id"]: 2 * i + 1 for i, c in enumerate(val["categories"])}  # LVIS ids 1, 3, ..
    by_id = {c["id"]: c for c in LVIS_CATEGORIES}
    val["categories"] = [dict(by_id[lvis_id[c["id"]]]) for c in val["categories"]]
    for a in val["annotations"]:
        a["category_id"] = lvis_id[a["category_id"]]
    for image in val["images"]:
        for key in ("neg_category_ids", "not_exhaustive_category_ids"):
            image[key] = [lvis_id[c] for c in image[key]]
    part = tmp_path / "val_of_lvis_v1.json"
    part.write_text(json.dumps(val))
    opts = TINY_OPTS + ["OUTPUT_DIR", str(tmp_path / "out"), "MODEL.ROI_HEADS.NUM_CLASSES", "1203"]
    cfg = build_cfg(TINY_CONFIG, opts, lvis_val=(str(part), tiny_lvis["root"]))
    cfg.DATASETS.TRAIN = ("lvis_v1_train",)
    register_coco_datasets(cfg)
    DatasetCatalog.get("custom_lvis_val")
    assert len(MetadataCatalog.get("custom_lvis_val").thing_classes) == len(lvis_id)
    align_test_categories(cfg)
    DatasetCatalog.get("custom_lvis_val")
    test = MetadataCatalog.get("custom_lvis_val")
    assert test.thing_dataset_id_to_contiguous_id == {k: k - 1 for k in range(1, 1204)}
    assert categories("custom_lvis_val") == categories("lvis_v1_train")
    written = _file(test.json_file)["categories"]
    assert [c["frequency"] for c in written] == [c["frequency"] for c in LVIS_CATEGORIES]


def test_our_log_lines_print_once_after_the_lvis_package_is_imported():
    """lvis's __init__ calls logging.basicConfig: imported at the first LVIS evaluation, after
    our console handler was attached, it printed every record of ours a second time."""
    import subprocess
    import sys

    code = (
        "import logging; from mae_transfer.detection.train import attach_logs; "
        "attach_logs(('mine',), ''); import lvis; "
        "logging.getLogger('mine').info('the summary'); "
        "logging.getLogger('mine').warning('a warning')"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    out = run.stdout + run.stderr
    assert out.count("the summary") == 1 and out.count("a warning") == 1, out
    assert "WARNING [" in out
