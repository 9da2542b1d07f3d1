"""The demo's stages, strung together by ``tools/demo.py``.

1. data: unlabeled scenes for pretraining, labelled object crops for k-NN, a COCO-format and an
   ADE20K-layout set with few labelled images (every set generated, deterministic);
2. pretraining: a tiny MAE on the unlabeled scenes, the k-NN monitor on the crops every few
   epochs (the curve), the loss curve and the reconstruction grid;
3. representation: k-NN of the pretrained encoder vs randomly initialised ones;
4. transfer: Mask R-CNN and UperNet fine-tuned from the MAE encoder and from random
   initialisation, several seeds each, in parallel single-threaded lanes;
5. summary: mean and min-max per side and metric, a bar chart, ``summary.json``.

Both sides of every comparison get the same data, schedule, hyper-parameters and seeds.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import asdict, dataclass, replace
from typing import Dict, List, Sequence, Tuple

from mae_transfer.datasets import write_unlabeled_scenes
from mae_transfer.datasets.scenes import render_scene

from . import charts, representation
from .lanes import run_jobs
from .stats import metric_spreads, table_rows

logger = logging.getLogger(__name__)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PRETRAIN_CONFIG = os.path.join(ROOT, "configs", "pretrain", "demo_tiny.yaml")
INITS = ("mae", "random")
KNN_METRICS = {"knn_k20_top1": "k-NN top-1 (k 20)"}


@dataclass(frozen=True)
class Settings:
    """Sizes and lengths of one demo run (everything else is in the configs)."""

    scenes: int = 3000  # unlabeled pretraining images
    epochs: int = 0  # 0: the pretraining config's
    knn_every: int = 0  # 0: the pretraining config's
    crops_per_class: int = 100  # k-NN memory bank per class (half as many are classified)
    det_train: int = 400  # labelled images: 13% of what pretraining saw (other scenes)
    det_val: int = 100
    det_iters: int = 0  # 0: the detectron2 config's
    seg_train: int = 400
    seg_val: int = 100
    seg_iters: int = 0  # 0: the mmseg config's
    seeds: Tuple[int, ...] = (0, 1, 2)
    lanes: int = 2  # parallel single-threaded fine-tuning processes


FULL = Settings()
QUICK = replace(
    FULL,
    scenes=96,
    epochs=2,
    knn_every=1,
    crops_per_class=6,
    det_train=16,
    det_val=4,
    det_iters=6,
    seg_train=16,
    seg_val=4,
    seg_iters=6,
    seeds=(0, 1),
    lanes=0,  # one after the other in this process: no per-run start-up of torch and frameworks
)


# -- 1-2: data and pretraining ----------------------------------------------------------------
def pretrain(out: str, s: Settings) -> Dict:
    """Pretrains on generated scenes with the k-NN monitor; returns paths and the curve."""
    from pretrain.config import make_config, read_yaml
    from pretrain.main import run as run_pretraining
    from pretrain.visualize import load_mae_for_visualization, visualize

    data = os.path.join(out, "data")
    values = read_yaml(PRETRAIN_CONFIG)
    size = values["input_size"]
    scenes = write_unlabeled_scenes(os.path.join(data, "scenes"), s.scenes, size)
    knn_train, knn_val = representation.crop_dirs(
        os.path.join(data, "crops"), 0, s.crops_per_class, size
    )
    run_dir = os.path.join(out, "pretrain")
    if os.path.isdir(run_dir):  # a demo run starts over (no resuming into an earlier demo's run)
        shutil.rmtree(run_dir)
    values.update(data_path=scenes, output_dir=run_dir, knn_train=knn_train, knn_val=knn_val)
    if s.epochs:
        values.update(epochs=s.epochs, warmup_epochs=min(values["warmup_epochs"], s.epochs - 1))
    if s.knn_every:
        values.update(knn_every=s.knn_every)
    stats = run_pretraining(make_config(values))
    checkpoint = os.path.join(run_dir, "checkpoint-last.pth")
    images = [render_scene(4242, i, size).image for i in range(4)]  # unseen scenes
    grid = visualize(
        load_mae_for_visualization(checkpoint),
        images,
        os.path.join(run_dir, "reconstruction.png"),
        title="tiny MAE after the demo pretraining (mask ratio 0.75, unseen scenes)",
    )
    return {
        "scenes": s.scenes,
        "epochs": values["epochs"],
        "knn_every": values.get("knn_every"),
        "final_loss": stats.get("train_loss"),
        "checkpoint": checkpoint,
        "encoder": os.path.join(run_dir, "encoder.pth"),
        "loss_curve": os.path.join(run_dir, "loss_curve.png"),
        "reconstruction": grid,
        "knn_curve_records": representation.curve_from_log(os.path.join(run_dir, "log.jsonl")),
        "knn_pool": values.get("knn_pool", "cls"),
    }


# -- 3: representation ------------------------------------------------------------------------
def representation_check(out: str, s: Settings, pre: Dict) -> Dict:
    """k-NN of the MAE encoder vs random inits on each seed's crops, and the curve's chart."""
    runs = representation.compare(
        pre["checkpoint"],
        os.path.join(out, "data", "crops"),
        s.seeds,
        s.crops_per_class,
        pre["knn_pool"],
    )
    random = metric_spreads({"random": runs["random"]}, "knn_k20_top1")["random"]
    curve = charts.plot_knn_curve(
        pre["knn_curve_records"],
        os.path.join(out, "pretrain", "knn_curve.png"),
        {"knn_k20_top1": random},
    )
    return {"runs": runs, "knn_curve": curve}


# -- 4: transfer ------------------------------------------------------------------------------
def transfer(out: str, s: Settings, encoder: str, det: bool, seg: bool) -> Dict:
    """Every (task, init, seed) fine-tuning run, in ``s.lanes`` processes; then the pictures."""
    jobs, stages = [], {}
    if det:
        from mae_transfer.detection import demo as det_demo

        datasets = det_demo.write_data(out, s.det_train, s.det_val)
        det_opts = _iters_opts(s.det_iters)
        jobs += det_demo.make_jobs(out, encoder, datasets, s.seeds, det_opts)
        stages["detection"] = (det_demo, dict(datasets=datasets, opts=det_opts))
    if seg:
        from mae_transfer.segmentation import demo as seg_demo

        data_root = seg_demo.write_data(out, s.seg_train, s.seg_val)
        seg_opts = {"train_cfg.max_iters": s.seg_iters} if s.seg_iters else {}
        jobs += seg_demo.make_jobs(out, encoder, data_root, s.seeds, seg_opts)
        stages["segmentation"] = (seg_demo, dict(data_root=data_root, opts=seg_opts))
    results = run_jobs(jobs, lanes=s.lanes)
    summary = {}
    for stage, (module, kwargs) in stages.items():
        runs = {i: [results[f"{stage} {i} seed {seed}"] for seed in s.seeds] for i in INITS}
        picture = module.draw(out, seed=s.seeds[0], **kwargs)
        iters = module.schedule_length(kwargs["opts"])
        summary[stage] = {"runs": runs, "picture": picture, "iters": iters}
    return summary


def _iters_opts(iters: int) -> List[str]:
    """detectron2 overrides for a shorter schedule: lr step at 5/6, warmup a tenth."""
    if not iters:
        return []
    return [
        "SOLVER.MAX_ITER",
        str(iters),
        "SOLVER.STEPS",
        f"({max(1, iters * 5 // 6)},)",
        "SOLVER.WARMUP_ITERS",
        str(max(1, iters // 10)),
    ]


# -- 5: summary -------------------------------------------------------------------------------
def comparison_rows(summary: Dict) -> List[tuple]:
    """(stage, metric, {init: Spread}, verdict) for every comparison the demo made."""
    from mae_transfer.detection.demo import METRICS as DET_METRICS
    from mae_transfer.segmentation.demo import METRICS as SEG_METRICS

    runs = {}
    metrics = dict(KNN_METRICS)
    if "representation" in summary:
        runs["representation"] = summary["representation"]["runs"]
    for stage, stage_metrics in (("detection", DET_METRICS), ("segmentation", SEG_METRICS)):
        if stage in summary:
            runs[stage] = summary[stage]["runs"]
            metrics.update(stage_metrics)
    return table_rows(runs, metrics)


def finish(out: str, summary: Dict, s: Settings) -> List[tuple]:
    """Rows of the comparison, the bar chart (``comparison.png``), settings in the summary."""
    rows = comparison_rows(summary)
    summary["settings"] = resolved_settings(summary, s)
    summary["comparison"] = [
        {"stage": st, "metric": m, **{i: asdict(sp[i]) for i in INITS}, "verdict": v}
        for st, m, sp, v in rows
    ]
    if rows:
        summary["chart"] = charts.plot_comparison(
            rows,
            os.path.join(out, "comparison.png"),
            f"MAE-initialised vs randomly initialised ({len(s.seeds)} seeds)",
        )
    return rows


def resolved_settings(summary: Dict, s: Settings) -> Dict:
    """``s`` as run: a length left to its config (0) is the config's value, where that stage
    ran (``summary.json`` said 0 epochs and 0 iterations)."""
    settings = asdict(s)
    pre = summary.get("pretrain", {})
    for key, value in (
        ("epochs", pre.get("epochs")),
        ("knn_every", pre.get("knn_every")),
        ("det_iters", summary.get("detection", {}).get("iters")),
        ("seg_iters", summary.get("segmentation", {}).get("iters")),
    ):
        if value is not None:
            settings[key] = value
    return settings


def seeds_arg(text: str) -> Sequence[int]:
    return tuple(int(t) for t in text.split(",") if t.strip())
