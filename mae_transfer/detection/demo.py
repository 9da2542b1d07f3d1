"""The detection stage of the demo: Mask R-CNN on the toy scenes, MAE vs random init, seeds.

Each (init, seed) pair is one fine-tuning run (:func:`train_run`, run in a fresh process by
:mod:`mae_transfer.demo.lanes`); the MAE and random runs of a seed share the data order and
the heads' initialisation.
"""

from __future__ import annotations

import logging
import os
from typing import Dict, List, Sequence

import numpy as np
from PIL import Image

from mae_transfer.datasets import write_toy_coco
from mae_transfer.demo.lanes import Job

CONFIG = os.path.join(
    os.path.dirname(__file__), "..", "..", "configs", "detectron2", "demo_tiny.yaml"
)
INITS = ("mae", "random")
# the picture: 96 px scenes drawn 3x (at 2x detectron2's labels were cut at the borders);
# each image's N best-scoring predictions, N its objects: a tiny detector's scores are low
# (at a fixed 0.3, most rows showed one prediction or none)
PICTURE_SCALE = 3.0
METRICS = {"bbox_AP": "box AP", "segm_AP": "mask AP"}


def write_data(out: str, num_train: int, num_val: int) -> List[list]:
    """The toy COCO sets; returns DATASETS.COCO entries [[name, json, image root], ...]."""
    files = write_toy_coco(os.path.join(out, "data", "toy_coco"), num_train, num_val)
    return [["toy_coco_train", *files["train"]], ["toy_coco_val", *files["val"]]]


def run_options(output_dir: str, weights: str, seed: int, datasets, opts: Sequence = ()) -> list:
    """detectron2 ``KEY VALUE`` overrides of one run (``opts`` last)."""
    return [
        "MODEL.WEIGHTS",
        weights,
        "OUTPUT_DIR",
        output_dir,
        "DATASETS.COCO",
        repr(datasets),
        "SEED",
        str(seed),
        *opts,
    ]


def train_run(
    output_dir: str, weights: str, seed: int, datasets, opts: Sequence = ()
) -> Dict[str, float]:
    """One fine-tuning run, then COCO evaluation on the val set: {"bbox_AP": .., ...}."""
    from detectron2.utils.env import seed_all_rng
    from detectron2.utils.logger import setup_logger

    from .train import Trainer, build_cfg, register_coco_datasets, summarize

    setup_logger(output=output_dir, name="detectron2", abbrev_name="d2")
    cfg = build_cfg(CONFIG, run_options(output_dir, weights, seed, datasets, opts))
    cfg.freeze()
    register_coco_datasets(cfg)
    seed_all_rng(cfg.SEED)  # head init, data order and sampling: the same for both inits
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    return summarize(trainer.train())


def make_jobs(
    out: str, encoder: str, datasets, seeds: Sequence[int], opts: Sequence = ()
) -> List[Job]:
    """One :class:`Job` per (init, seed); outputs in ``out/detection/<init>_seed<seed>/``."""
    jobs = []
    for seed in seeds:
        for init in INITS:
            run_dir = os.path.join(out, "detection", f"{init}_seed{seed}")
            weights = encoder if init == "mae" else ""
            jobs.append(
                Job(
                    name=f"detection {init} seed {seed}",
                    function="mae_transfer.detection.demo:train_run",
                    kwargs=dict(
                        output_dir=run_dir, weights=weights, seed=seed, datasets=datasets, opts=opts
                    ),
                    log=os.path.join(run_dir, "stdout.log"),
                    cost=1.0,
                )
            )
    return jobs


def schedule_length(opts: Sequence = ()) -> int:
    """The runs' iterations: ``SOLVER.MAX_ITER`` of the config with ``opts``."""
    from .train import build_cfg

    return int(build_cfg(CONFIG, list(opts)).SOLVER.MAX_ITER)


def draw(out: str, datasets, seed: int, opts: Sequence = ()) -> str:
    """Predictions of both inits' ``seed`` runs on 4 val images, one row each."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.data import DatasetCatalog
    from detectron2.modeling import build_model

    from .train import build_cfg, register_coco_datasets
    from .visualize import draw_ground_truth, draw_predictions, labelled_rows

    logging.getLogger("fvcore").setLevel(logging.WARNING)
    rows = []
    for init in INITS:
        run_dir = os.path.join(out, "detection", f"{init}_seed{seed}")
        cfg = build_cfg(CONFIG, run_options(run_dir, "", seed, datasets, opts))
        register_coco_datasets(cfg)
        model = build_model(cfg)
        DetectionCheckpointer(model).load(os.path.join(run_dir, "model_final.pth"))
        records = DatasetCatalog.get(cfg.DATASETS.TEST[0])[:4]
        if not rows:
            truth = draw_ground_truth(cfg, records, scale=PICTURE_SCALE)
            rows.append(("ground truth", truth))
        png = os.path.join(run_dir, "predictions.png")
        paths = [d["file_name"] for d in records]
        top_k = [len(d["annotations"]) for d in records]
        draw_predictions(cfg, model, paths, png, 0.0, scale=PICTURE_SCALE, top_k=top_k)
        label = f"{init} init (seed {seed}): each image's N best-scoring predictions, N its objects"
        rows.append((label, np.asarray(Image.open(png))))
    path = os.path.join(out, "detection", "predictions.png")
    Image.fromarray(labelled_rows(rows)).save(path)
    return path
