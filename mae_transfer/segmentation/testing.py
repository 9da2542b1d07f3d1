"""Test-time options of tools/test_seg.py: multi-scale + flip testing (--tta), predictions
written as label images (--pred-dir) and drawn (--show-dir).

Multi-scale + flip ("ms+flip" in BEiT's and mmseg's tables): the test pipeline's own resize is
repeated at each ratio of its scale (BEiT / mmseg 0.x's ``img_scale`` x ``img_ratios``, the
protocol of the published multi-scale numbers), each scale also flipped; mmseg's SegTTAModel
averages the softmax of the predictions, each brought back to the image's size and
orientation. mmseg 1.x's ADE20K ``tta_pipeline`` resizes the image as stored by the ratios
instead, so its ratio 1.0 is not the single-scale test; it is not used.
"""

from __future__ import annotations

import logging
import os
from typing import Dict, List, Optional, Sequence

from mmengine.config import Config
from mmengine.model import BaseTTAModel, is_model_wrapper

from mae_transfer.engine.config import ConfigError

from .checkpoint import check_fits, read_segmentor
from .loading import IMAGE_LOADERS, type_name
from .runner import (
    build_cfg,
    check_data,
    dataset_configs,
    launcher_env,
    make_runner,
    model_state_shapes,
)

logger = logging.getLogger(__name__)

# BEiT's / mmseg's ADE20K ratios
DEFAULT_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
# resizes that round the size the Resize made (to a multiple), which --tta keeps after it
SIZE_KEEPING = ("ResizeToMultiple",)


def _scaled(resize: Dict, ratio: float) -> Dict:
    """``resize`` (a Resize config) at ``ratio`` times its size; a pipeline without a resize
    (``resize`` empty) gets the image's own size times ``ratio``."""
    if resize.get("scale") is not None:
        scale = resize["scale"]
        scale = (scale, scale) if isinstance(scale, (int, float)) else scale
        return {**resize, "scale": tuple(int(round(s * ratio)) for s in scale)}
    factor = resize.get("scale_factor", 1.0)
    factor = factor if isinstance(factor, (list, tuple)) else (factor, factor)
    base = {"type": "Resize", "keep_ratio": True, **resize}
    return {**base, "scale_factor": tuple(f * ratio for f in factor)}


def check_ratios(ratios: Sequence[float]) -> None:
    """Raises ConfigError unless ``ratios`` are numbers above 0, at least one."""
    bad = [r for r in ratios if not isinstance(r, (int, float)) or not r > 0]
    if not ratios or bad:
        raise ConfigError(f"--tta-ratios must be numbers above 0, got {list(ratios)}")


def tta_pipeline(test_pipeline: Sequence[Dict], ratios: Sequence[float], flip: bool) -> List:
    """The test pipeline turned into one of mmcv's TestTimeAug: what precedes its first
    ``Resize`` (image loading) as it is, then every ratio of that resize, each unflipped and,
    with ``flip``, flipped horizontally, then the rest (labels, packing) as it is.

    Raises:
        ConfigError: a bad ratio, a pipeline that is already a test-time augmentation, or
            one that resizes by another transform (which would undo the scales).
    """
    check_ratios(ratios)
    names = [type_name(t) for t in test_pipeline]
    if "TestTimeAug" in names:
        raise ConfigError("the test pipeline is a TestTimeAug already: test without --tta")
    others = [n for n in names if "Resize" in (n or "") and n not in ("Resize", *SIZE_KEEPING)]
    if others:  # a Resize put before them would be undone: no scale would reach the model
        raise ConfigError(
            f"--tta scales the test pipeline's Resize; it has {', '.join(others)}: give a "
            "test_pipeline with mmcv's Resize (scale, keep_ratio) instead"
        )
    if "Resize" in names:
        at = names.index("Resize")
        resize, rest = dict(test_pipeline[at]), test_pipeline[at + 1 :]
    else:  # the image as loaded, scaled
        at = 1 + max(i for i, n in enumerate(names) if n in IMAGE_LOADERS)
        resize, rest = {}, test_pipeline[at:]
    choices = [[_scaled(resize, r) for r in ratios]]
    if flip:
        choices.append(
            [
                dict(type="RandomFlip", prob=p, direction="horizontal")
                for p in (0.0, 1.0)  # unflipped, flipped
            ]
        )
    choices += [[dict(t)] for t in rest]
    return [*map(dict, test_pipeline[:at]), dict(type="TestTimeAug", transforms=choices)]


def apply_tta(cfg: Config, ratios: Sequence[float] = DEFAULT_RATIOS, flip: bool = True) -> int:
    """Tests ``cfg`` with test-time augmentation: each test data set's pipeline becomes
    :func:`tta_pipeline`, the model mmseg's SegTTAModel around the segmentor. Returns the
    number of predictions per image."""
    ds = cfg.test_dataloader.get("dataset") or {}
    found = False
    for node, key in dataset_configs(ds, "test_dataloader.dataset"):
        if isinstance(node.get("pipeline"), list):
            if "LoadAnnotations" not in map(type_name, node["pipeline"]):
                raise ConfigError(f"{key}.pipeline has no LoadAnnotations: nothing to score")
            node["pipeline"] = tta_pipeline(node["pipeline"], ratios, flip)
            found = True
    if not found:
        raise ConfigError("test_dataloader.dataset has no pipeline to augment")
    cfg.model = dict(type="SegTTAModel", module=cfg.model)
    return len(ratios) * (2 if flip else 1)


def write_outputs(cfg: Config, pred_dir: str = "", show_dir: str = "", world_size: int = 1) -> None:
    """``pred_dir``: every test image's prediction as an 8-bit label PNG named as the image
    (mmseg's IoUMetric ``output_dir``; ADE20K's numbering, 0 = unlabeled, where the data set
    reduces the zero label, as its evaluation server takes them). ``show_dir``: image, ground
    truth and prediction drawn side by side for every test image (mmseg's
    SegVisualizationHook), in one process only.

    Raises:
        ConfigError: ``pred_dir`` with a test evaluator that is not mmseg's IoUMetric, or a
            folder that cannot be made; ``show_dir`` with several processes (mmseg's
            visualizer draws on rank 0 only: the other ranks' images would be missing).
    """
    if show_dir and world_size > 1:
        raise ConfigError(
            f"--show-dir with {world_size} processes would draw rank 0's share of the images "
            "only (mmseg draws on rank 0): run it in one process, without --launcher"
        )
    if pred_dir:
        evaluators = cfg.test_evaluator
        evaluators = evaluators if isinstance(evaluators, list) else [evaluators]
        metrics = [e for e in evaluators if type_name(e) == "IoUMetric"]
        if not metrics:
            names = [type_name(e) for e in evaluators]
            raise ConfigError(f"--pred-dir: the test_evaluator {names} has no IoUMetric to write")
        try:  # every rank writes its images' files; mmseg's IoUMetric makes it on rank 0 only
            os.makedirs(pred_dir, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"--pred-dir {pred_dir}: cannot make it: {e}") from e
        for evaluator in metrics:
            evaluator["output_dir"] = pred_dir
    if show_dir:
        hooks = cfg.setdefault("default_hooks", {})
        hooks["visualization"] = {
            **(hooks.get("visualization") or {"type": "SegVisualizationHook"}),
            "draw": True,
            "interval": 1,
        }
        visualizer = {**cfg.get("visualizer", {"type": "SegLocalVisualizer"})}
        # named by the Runner after this run: an instance of the config's name made earlier
        # in the process (a training run) would be taken, with its own save_dir
        visualizer.pop("name", None)
        visualizer["save_dir"] = show_dir
        visualizer["vis_backends"] = [dict(type="LocalVisBackend")]  # PNG files, no event files
        cfg.visualizer = visualizer


def evaluate_segmentor(
    config: str,
    checkpoint: str,
    options: Optional[Dict] = None,
    work_dir: Optional[str] = None,
    launcher: str = "none",
    tta_ratios: Optional[Sequence[float]] = None,
    tta_flip: bool = True,
    pred_dir: str = "",
    show_dir: str = "",
) -> Dict[str, float]:
    """The test metrics of a trained segmentor (``checkpoint``, all of its weights, checked
    against ``config`` with ``options`` before anything runs), in fp32.

    Args:
        tta_ratios: test with :func:`apply_tta` at these ratios ([] for the config's
            ``img_ratios``, else :data:`DEFAULT_RATIOS`); None: single-scale.
        pred_dir, show_dir: :func:`write_outputs`.
    """
    if tta_ratios:
        check_ratios(tta_ratios)  # before the checkpoint is read
    # evaluated in fp32: the numbers do not depend on the GPU generation
    cfg = build_cfg(config, options, work_dir, launcher, amp="fp32", for_training=False)
    # loaded here, all of it, not by mmengine (cfg.load_from), which loads what fits
    state, _ = read_segmentor(checkpoint)
    check_fits(state, model_state_shapes(cfg), checkpoint)
    check_data(cfg, for_training=False)
    world = int({**os.environ, **launcher_env(launcher)}.get("WORLD_SIZE", 1))
    write_outputs(cfg, pred_dir, show_dir, world if launcher != "none" else 1)
    if tta_ratios is not None:
        ratios = tta_ratios or cfg.get("img_ratios") or DEFAULT_RATIOS
        n = apply_tta(cfg, ratios, tta_flip)
        logger.info("test-time augmentation: %d predictions per image", n)
    runner = make_runner(cfg)
    model = runner.model.module if is_model_wrapper(runner.model) else runner.model
    model = model.module if isinstance(model, BaseTTAModel) else model
    model.load_state_dict(state, strict=True)
    del state
    return {k: float(v) for k, v in runner.test().items()}
