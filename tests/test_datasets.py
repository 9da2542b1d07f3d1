"""The demo's generated data: deterministic for a seed, labels consistent with the pictures."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
from PIL import Image

from mae_transfer.datasets import (
    TOY_ADE_CLASSES,
    write_object_crops,
    write_toy_ade,
    write_toy_coco,
    write_unlabeled_scenes,
)
from mae_transfer.datasets.scenes import SHAPES, mask_bbox, render_scene, rle_encode


def _digest(root: str) -> dict:
    """{relative path: sha1} of every file under ``root``."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            path = os.path.join(d, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, root)] = hashlib.sha1(fh.read()).hexdigest()
    return out


def test_scene_is_a_pure_function_of_seed_and_index():
    a, b = render_scene(3, 7, 96), render_scene(3, 7, 96)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.horizon, b.horizon)
    assert [o.kind for o in a.objects] == [o.kind for o in b.objects]
    assert all(np.array_equal(x.mask, y.mask) for x, y in zip(a.objects, b.objects))
    assert not np.array_equal(a.image, render_scene(3, 8, 96).image)
    assert not np.array_equal(a.image, render_scene(4, 7, 96).image)


def test_objects_do_not_overlap_and_keep_half_of_themselves():
    kinds = set()
    for i in range(40):
        scene = render_scene(11, i, 96)
        assert 1 <= len(scene.objects) <= 6  # 2-6 wanted; placement may give up on one
        total = np.zeros((96, 96), int)
        for o in scene.objects:
            total += o.mask
            kinds.add(o.kind)
        assert total.max() <= 1  # visible masks are disjoint
    assert kinds == set(range(len(SHAPES)))


def test_rle_round_trips_through_pycocotools():
    from pycocotools import mask as mask_utils

    scene = render_scene(5, 2, 96)
    for o in scene.objects:
        rle = mask_utils.frPyObjects(rle_encode(o.mask), 96, 96)
        assert np.array_equal(mask_utils.decode(rle).astype(bool), o.mask)
        x0, y0, x1, y1 = mask_bbox(o.mask)
        assert list(mask_utils.toBbox(rle)) == [x0, y0, x1 - x0, y1 - y0]


def test_writers_give_identical_files_for_a_seed(tmp_path):
    for run in ("a", "b"):
        root = tmp_path / run
        write_toy_coco(str(root / "coco"), num_train=5, num_val=2, size=64)
        write_toy_ade(str(root / "ade"), num_train=4, num_val=2, size=64)
        write_unlabeled_scenes(str(root / "scenes"), 6, size=64)
        write_object_crops(str(root / "crops"), per_class=2, seed=9, size=64, crop_size=32)
    a, b = _digest(str(tmp_path / "a")), _digest(str(tmp_path / "b"))
    assert a == b and len(a) > 30
    crops = [k for k in a if k.startswith("crops") and k.endswith(".png")]
    assert len(crops) == 2 * len(SHAPES)
    other = tmp_path / "c"
    write_unlabeled_scenes(str(other), 6, size=64, seed=1001)  # another seed, other pictures
    assert _digest(str(other))["scene_00000.jpg"] != a[os.path.join("scenes", "scene_00000.jpg")]


def test_coco_and_ade_labels_match_the_scenes(tmp_path):
    files = write_toy_coco(str(tmp_path / "coco"), num_train=6, num_val=2, size=64, seed=3)
    with open(files["train"][0]) as f:
        coco = json.load(f)
    assert [c["name"] for c in coco["categories"]] == list(SHAPES)
    expected = [
        (o.kind + 1, int(o.mask.sum())) for i in range(6) for o in render_scene(3, i, 64).objects
    ]
    assert [(a["category_id"], a["area"]) for a in coco["annotations"]] == expected
    write_toy_ade(str(tmp_path / "ade"), num_train=3, num_val=1, size=64, seed=3)
    labels = np.asarray(
        Image.open(tmp_path / "ade" / "annotations" / "training" / "training_00000.png")
    )
    scene = render_scene(3, 0, 64)
    for o in scene.objects:
        assert (labels[o.mask] == 3 + o.kind).all()
    assert set(np.unique(labels)) <= set(range(len(TOY_ADE_CLASSES) + 1))
