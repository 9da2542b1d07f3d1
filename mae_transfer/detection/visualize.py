"""Predictions drawn on images with detectron2's Visualizer, tiled into one PNG."""

from __future__ import annotations

import logging
from typing import List, Optional, Sequence

import numpy as np
import torch
from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T
from detectron2.utils.visualizer import Visualizer
from PIL import Image

from mae_transfer.drawing import text_size, title_bar

from .data import read_image
from .train import build_augmentations, thing_classes

logger = logging.getLogger(__name__)


@torch.no_grad()
def predict(cfg, model, image_path: str):
    """Runs the model on one image file with the test-time resize; returns Instances on CPU."""
    img = read_image(image_path, format=cfg.INPUT.FORMAT)
    aug = T.AugmentationList(build_augmentations(cfg, is_train=False))
    inp = T.AugInput(img)
    aug(inp)
    tensor = torch.as_tensor(np.ascontiguousarray(inp.image.transpose(2, 0, 1)))
    model.eval()
    out = model([{"image": tensor, "height": img.shape[0], "width": img.shape[1]}])[0]
    return img, out["instances"].to("cpu")


def class_names(cfg, name: str):
    """The metadata whose ``thing_classes`` label the drawing: data set ``name``'s, read from
    its annotation file if not yet known (a COCO-format set learns its names when loaded), or
    none (class indices) when its names do not fit the model's classes, e.g. COCO's 80 names
    of a recipe config's DATASETS.TEST over a detector of another data set."""
    names = thing_classes(name)
    if names is not None and len(names) != cfg.MODEL.ROI_HEADS.NUM_CLASSES:
        logger.warning(
            "the %d class names of %r do not fit the detector's %d classes: drawn as class "
            "indices (give --coco-val JSON IMAGE_ROOT of its data set for names)",
            len(names),
            name,
            cfg.MODEL.ROI_HEADS.NUM_CLASSES,
        )
        return MetadataCatalog.get("__mae_transfer_no_names__")
    return MetadataCatalog.get(name)


def draw_predictions(
    cfg,
    model,
    image_paths: Sequence[str],
    output: str,
    score_thresh: float = 0.5,
    dataset: Optional[str] = None,
    columns: int = 4,
    scale: float = 2.0,
    top_k: Optional[Sequence[int]] = None,
) -> str:
    """Draws boxes, masks, class names and scores above ``score_thresh`` (of image i, its
    ``top_k[i]`` best-scoring at most); writes ``output``."""
    metadata = class_names(cfg, dataset or (cfg.DATASETS.TEST or cfg.DATASETS.TRAIN)[0])
    tiles: List[np.ndarray] = []
    for i, path in enumerate(image_paths):
        img, inst = predict(cfg, model, path)
        inst = inst[inst.scores >= score_thresh]
        if top_k is not None:
            inst = inst[inst.scores.argsort(descending=True)[: top_k[i]]]
        rgb = img if cfg.INPUT.FORMAT == "RGB" else img[:, :, ::-1]
        vis = Visualizer(rgb, metadata=metadata, scale=scale)
        tiles.append(vis.draw_instance_predictions(inst).get_image())
    Image.fromarray(tile(tiles, columns)).save(output)
    return output


def draw_ground_truth(
    cfg, records: Sequence[dict], columns: int = 4, scale: float = 2.0
) -> np.ndarray:
    """The annotated boxes, masks and class names of data set ``records`` (detectron2's
    dicts), tiled as :func:`draw_predictions` tiles predictions: the reference to read them by."""
    metadata = class_names(cfg, (cfg.DATASETS.TEST or cfg.DATASETS.TRAIN)[0])
    tiles = []
    for record in records:
        vis = Visualizer(read_image(record["file_name"], "RGB"), metadata=metadata, scale=scale)
        tiles.append(vis.draw_dataset_dict(record).get_image())
    return tile(tiles, columns)


def tile(images: Sequence[np.ndarray], columns: int, pad: int = 4) -> np.ndarray:
    """Tiles equally-sized-or-smaller HxWx3 images into a grid on a white canvas."""
    h = max(i.shape[0] for i in images)
    w = max(i.shape[1] for i in images)
    rows = -(-len(images) // columns)
    cols = min(columns, len(images))
    canvas = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for k, im in enumerate(images):
        r, c = divmod(k, columns)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        canvas[y : y + im.shape[0], x : x + im.shape[1]] = im[..., :3]
    return canvas


def labelled_rows(rows: Sequence[tuple]) -> np.ndarray:
    """Stacks (label, HxWx3 image) rows vertically, each under a bar with its label."""
    width = max(img.shape[1] for _, img in rows)
    parts = []
    for label, img in rows:
        parts.append(title_bar(width, [(6, label)], text_size(width)))
        body = np.full((img.shape[0], width, 3), 255, np.uint8)
        body[:, : img.shape[1]] = img[..., :3]
        parts.append(body)
    return np.concatenate(parts, axis=0)
