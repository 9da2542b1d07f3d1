"""Colour overlays of segmentation predictions (and ground truth), tiled into one PNG."""

from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from mae_transfer.drawing import legend, text_size, title_bar

from .loading import read_rgb


def init_segmentor(cfg, checkpoint: str, device: str = "cpu"):
    """The segmentor of ``cfg`` (an mmengine Config, from :func:`runner.build_cfg`) in eval
    mode, with every weight from ``checkpoint`` (:func:`load_segmentor`, strict) and the
    classes and palette of the checkpoint's meta, else of the config's test data set."""
    from mmseg.apis import init_model

    from .checkpoint import load_segmentor

    model = init_model(cfg, None, device="cpu")  # built, not loaded: mmseg loads what fits
    meta = load_segmentor(model, checkpoint)
    model.dataset_meta = meta.get("dataset_meta") or dataset_meta(cfg, model)
    return model.to(device).eval()


def dataset_meta(cfg, model) -> dict:
    """Classes and palette of the config's test data set: its ``metainfo=`` (a data set of
    one's own classes), else its type's METAINFO; a fixed random palette where neither has
    one."""
    from mmseg.registry import DATASETS

    dataset = cfg.test_dataloader.dataset
    dataset_cls = DATASETS.get(dataset.type)
    meta = dict(getattr(dataset_cls, "METAINFO", None) or {})
    given = dict(dataset.get("metainfo") or {})
    if given.get("classes") and not given.get("palette"):  # own classes: not the type's colours
        meta.pop("palette", None)
    meta.update(given)
    if not meta.get("palette"):
        num_classes = model.decode_head.num_classes
        meta["palette"] = np.random.RandomState(0).randint(0, 256, (num_classes, 3)).tolist()
    return meta


@torch.no_grad()
def predict(model, image_path: str) -> np.ndarray:
    """(H, W) class indices for one image, with the model's own test pipeline (model.cfg)."""
    from mmseg.apis import inference_model

    model.eval()
    result = inference_model(model, image_path)
    return result.pred_sem_seg.data[0].cpu().numpy()


def overlay(image: np.ndarray, labels: np.ndarray, palette, alpha: float = 0.7) -> np.ndarray:
    """A colour per class over an RGB image, mostly opaque, and each region's border in its
    class colour (at 0.5 the objects' own colours showed through: a red square and a yellow
    ring both came out orange); label 255 (ignore) is left uncoloured."""
    colors = np.zeros((256, 3), np.float64)
    colors[: len(palette)] = np.asarray(palette, np.float64)
    out = image.astype(np.float64)
    valid = labels != 255
    out[valid] = (1 - alpha) * out[valid] + alpha * colors[labels[valid]]
    border = np.zeros_like(valid)
    border[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    border[1:, :] |= labels[1:] != labels[:-1]
    border &= valid
    out[border] = colors[labels[border]]
    return out.clip(0, 255).astype(np.uint8)


def load_labels(path: str, reduce_zero_label: bool = True) -> np.ndarray:
    """A label PNG as class indices, ADE-style 0 -> 255 (ignore) and c -> c - 1."""
    labels = np.asarray(Image.open(path)).astype(np.int64)
    if reduce_zero_label:
        labels = np.where(labels == 0, 255, labels - 1)
    return labels.astype(np.uint8 if labels.max() <= 255 else np.int64)


MAX_CELL_WIDTH = 640  # px: a drawn photo is reduced to this width (a cell of the grid)


def comparison_grid(
    image_paths: Sequence[str],
    columns: Sequence[tuple],
    palette,
    gt_paths: Optional[Sequence[str]] = None,
    scale: Optional[float] = None,
    classes: Optional[Sequence[str]] = None,
) -> np.ndarray:
    """Rows of image | ground truth | each (title, model) prediction, with titles on top and,
    given the ``classes``' names, a legend of the classes drawn below.

    Args:
        scale: the cells' zoom; None: 2 for cells up to 256 px wide (the toy scenes), down to
            640 px wide for larger ones (at 2x, eight photos made a 4112 x 12958 PNG).
    """
    titles = ["image"] + (["ground truth"] if gt_paths else []) + [t for t, _ in columns]
    # read as the models' test pipeline reads it (EXIF orientation applied or not, as
    # mmcv applies it), so that each prediction lies over the image it was made on
    pipeline = _test_pipeline([model for _, model in columns])
    rows: List[List[np.ndarray]] = []
    drawn = set()  # classes in any label map
    for i, path in enumerate(image_paths):
        img = read_rgb(path, pipeline)
        maps = [load_labels(gt_paths[i])] if gt_paths else []
        maps += [predict(model, path) for _, model in columns]
        drawn.update(int(c) for m in maps for c in np.unique(m) if c != 255)
        rows.append([img] + [overlay(img, m, palette) for m in maps])
    # images of different sizes: every cell padded (white, right and bottom) to the largest
    h = max(c.shape[0] for cells in rows for c in cells)
    w = max(c.shape[1] for cells in rows for c in cells)
    grid = np.concatenate(
        [np.concatenate([_pad(_fit(c, h, w)) for c in cells], axis=1) for cells in rows], axis=0
    )
    if scale is None:
        scale = 2.0 if w <= 256 else min(1.0, MAX_CELL_WIDTH / w)
    if scale != 1:  # enlarged: pixels kept sharp; reduced: averaged
        fast = Image.Resampling.NEAREST if scale > 1 else Image.Resampling.BOX
        size = (round(grid.shape[1] * scale), round(grid.shape[0] * scale))
        grid = np.asarray(Image.fromarray(grid).resize(size, fast))
    cell_w = grid.shape[1] // len(titles)
    size = text_size(grid.shape[1] / len(titles) * 4)  # as if four columns wide
    parts = [title_bar(grid.shape[1], [(k * cell_w + 4, t) for k, t in enumerate(titles)], size)]
    parts.append(grid)
    if classes is not None and drawn:
        named = [(classes[c] if c < len(classes) else str(c), palette[c]) for c in sorted(drawn)]
        parts.append(legend(grid.shape[1], named, size))
    return np.concatenate(parts, axis=0)


def _test_pipeline(models) -> Optional[list]:
    """The test pipeline of the first model built from a config (``model.cfg``, which mmseg's
    inference_model reads), else None (mmcv's default loading)."""
    for model in models:
        cfg = getattr(model, "cfg", None)
        if cfg is not None and cfg.get("test_pipeline"):
            return cfg.test_pipeline
    return None


def _fit(img: np.ndarray, h: int, w: int) -> np.ndarray:
    """``img`` padded with white to (h, w) (it is at most that large)."""
    return np.pad(img, ((0, h - img.shape[0]), (0, w - img.shape[1]), (0, 0)), constant_values=255)


def _pad(img: np.ndarray, pad: int = 2) -> np.ndarray:
    return np.pad(img, ((pad, pad), (pad, pad), (0, 0)), constant_values=255)
