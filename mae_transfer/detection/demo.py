"""The detection stage of the demo: Mask R-CNN on the toy shapes, MAE vs random init."""

from __future__ import annotations

import os
from typing import Dict

import numpy as np
from detectron2.data import DatasetCatalog
from detectron2.utils.env import seed_all_rng
from detectron2.utils.logger import setup_logger
from PIL import Image

from mae_transfer.datasets import write_toy_coco

from .train import Trainer, build_cfg, register_coco_datasets, summarize
from .visualize import draw_predictions, labelled_rows

CONFIG = os.path.join(
    os.path.dirname(__file__), "..", "..", "configs", "detectron2", "demo_tiny.yaml"
)


def run_demo(out: str, encoder: str, quick: bool = False) -> Dict:
    """Trains twice (MAE encoder / random init), evaluates, draws; returns APs and paths."""
    n_train, n_val, iters = (32, 8, 10) if quick else (240, 60, 180)
    files = write_toy_coco(os.path.join(out, "data", "toy_coco"), n_train, n_val)
    datasets = [["toy_coco_train", *files["train"]], ["toy_coco_val", *files["val"]]]
    setup_logger(name="detectron2", abbrev_name="d2")
    results: Dict = {}
    tiles = []
    for init in ("mae", "random"):
        opts = [
            "MODEL.WEIGHTS",
            encoder if init == "mae" else "",
            "OUTPUT_DIR",
            os.path.join(out, "detection", init),
            "DATASETS.COCO",
            repr(datasets),
            "SOLVER.MAX_ITER",
            str(iters),
            "SOLVER.STEPS",
            f"({int(iters * 5 / 6)},)",
            "SOLVER.WARMUP_ITERS",
            str(max(1, iters // 10)),
        ]
        cfg = build_cfg(CONFIG, opts)
        cfg.freeze()
        register_coco_datasets(cfg)
        seed_all_rng(cfg.SEED)  # same init, data order and sampling for both runs
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=False)
        results[init] = summarize(trainer.train())
        paths = [d["file_name"] for d in DatasetCatalog.get("toy_coco_val")[:4]]
        png = os.path.join(out, "detection", f"predictions_{init}.png")
        draw_predictions(cfg, trainer.model, paths, png, score_thresh=0.5)
        tiles.append((f"{init} init", np.asarray(Image.open(png))))
    results["predictions"] = os.path.join(out, "detection", "predictions.png")
    Image.fromarray(labelled_rows(tiles)).save(results["predictions"])
    return results
