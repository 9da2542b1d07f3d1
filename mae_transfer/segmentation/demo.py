"""The segmentation stage of the demo: UperNet on the toy ADE data, MAE vs random init."""

from __future__ import annotations

import os
from typing import Dict

from PIL import Image

from mae_transfer.datasets import write_toy_ade

from .dataset import ToyADEDataset
from .runner import build_cfg, make_runner
from .visualize import comparison_grid

CONFIG = os.path.join(
    os.path.dirname(__file__), "..", "..", "configs", "mmseg", "demo_tiny_toy-128x128.py"
)


def demo_options(data_root: str, work_dir: str, pretrained, iters: int) -> Dict:
    opts = {"work_dir": work_dir, "model.backbone.pretrained": pretrained}
    for loader in ("train_dataloader", "val_dataloader", "test_dataloader"):
        opts[f"{loader}.dataset.data_root"] = data_root
    # no validation inside train(): run_demo calls runner.val() once, for the metrics
    opts.update({"train_cfg.max_iters": iters, "train_cfg.val_begin": iters + 1})
    opts["default_hooks.checkpoint.interval"] = iters
    return opts


def run_demo(out: str, encoder: str, quick: bool = False) -> Dict:
    """Trains twice (MAE encoder / random init), evaluates mIoU, draws overlays."""
    n_train, n_val, iters = (32, 8, 10) if quick else (240, 60, 450)
    root = os.path.join(out, "data", "toy_ade")
    write_toy_ade(root, n_train, n_val)
    results: Dict = {}
    models = []
    for init in ("mae", "random"):
        work_dir = os.path.join(out, "segmentation", init)
        pretrained = encoder if init == "mae" else None
        cfg = build_cfg(CONFIG, demo_options(root, work_dir, pretrained, iters))
        runner = make_runner(cfg)
        runner.train()
        metrics = runner.val()
        results[init] = {k: float(v) for k, v in metrics.items()}
        model = runner.model
        model.cfg = cfg
        models.append((f"{init} init", model))
    val_dir = os.path.join(root, "images", "validation")
    names = sorted(os.listdir(val_dir))[:4]
    images = [os.path.join(val_dir, n) for n in names]
    gts = [os.path.join(root, "annotations", "validation", n[:-4] + ".png") for n in names]
    palette = ToyADEDataset.METAINFO["palette"]
    grid = comparison_grid(images, models, palette, gts)
    results["overlay"] = os.path.join(out, "segmentation", "overlay.png")
    Image.fromarray(grid).save(results["overlay"])
    return results
