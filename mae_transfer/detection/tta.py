"""Test-time augmentation: detectron2's ``GeneralizedRCNNWithTTA`` on our detectors, driven by
detectron2's ``TEST.AUG`` keys, run as its ``tools/train_net.py`` runs it (``test_with_TTA``).

For each image the detector runs at every short side of ``TEST.AUG.MIN_SIZES`` (the long side
at most ``TEST.AUG.MAX_SIZE``), and flipped too with ``TEST.AUG.FLIP``; the boxes of all runs,
brought back to the image, are merged by per-class NMS, then the mask head runs on the merged
boxes in every run and the masks are averaged. Results come under the test sets' names (or the
tasks' with one set) ending in ``_TTA``.

Two differences from detectron2's tool:

- the augmented images are resized from the image as read, not from the test loader's output
  (detectron2 resizes the already resized image again: e.g. an LSJ test image shrunk to 1024 px
  and then enlarged to a short side of 1200);
- with several test sets each writes to its own folder, ``inference_TTA/<name>``.

Our backbones pad an image smaller than their square (``MODEL.VIT.SQUARE_PAD``, the LSJ crop
size) to it and run a larger one at its own size, the position table interpolated: every TTA
size works (none was seen in training other than the LSJ crop's scales).
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from typing import Dict

from detectron2.data import build_detection_test_loader
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.modeling import GeneralizedRCNNWithTTA
from detectron2.utils import comm

from .backbone import _square_pad
from .data import ImageMapper

logger = logging.getLogger(__name__)

SUFFIX = "_TTA"  # detectron2's tools/train_net.py's


def evaluate_with_tta(trainer_cls, cfg, model) -> Dict:
    """Evaluates ``model`` with test-time augmentation on every ``DATASETS.TEST`` set, with
    ``trainer_cls.build_evaluator``'s evaluator; returns detectron2's results with each key
    (the set's name, or with one set the task's: ``bbox_TTA``, ``segm_TTA``) ending in
    ``_TTA``, as ``tools/train_net.py``'s ``test_with_TTA``."""
    _log_sizes(cfg)
    tta_model = GeneralizedRCNNWithTTA(cfg, model)
    # the image as read: each augmentation resizes it once (DatasetMapperTTA)
    mapper = ImageMapper(cfg, is_train=False, augmentations=[])
    results = OrderedDict()
    for name in cfg.DATASETS.TEST:
        folder = os.path.join(cfg.OUTPUT_DIR, "inference" + SUFFIX)
        if len(cfg.DATASETS.TEST) > 1:
            folder = os.path.join(folder, name)
        evaluator = trainer_cls.build_evaluator(cfg, name, output_folder=folder)
        loader = build_detection_test_loader(cfg, name, mapper=mapper)
        results[name] = inference_on_dataset(tta_model, loader, evaluator)
        if comm.is_main_process():
            logger.info("test-time augmentation, %s:", name)
            print_csv_format(results[name])
    if len(results) == 1:
        results = list(results.values())[0]
    return OrderedDict((k + SUFFIX, v) for k, v in results.items())


def _log_sizes(cfg) -> None:
    aug, square = cfg.TEST.AUG, _square_pad(cfg)
    logger.info(
        "test-time augmentation: short sides %s (long side at most %d)%s",
        list(aug.MIN_SIZES),
        aug.MAX_SIZE,
        ", each also flipped" if aug.FLIP else "",
    )
    if square and any(s > square for s in aug.MIN_SIZES):
        logger.info(
            "TEST.AUG.MIN_SIZES above the %d px square the backbone pads to: those images run "
            "at their own size, the position table interpolated",
            square,
        )
