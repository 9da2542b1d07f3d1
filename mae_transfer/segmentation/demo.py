"""The segmentation stage of the demo: UperNet on the toy scenes, MAE vs random init, seeds.

Each (init, seed) pair is one fine-tuning run (:func:`train_run`, run in a fresh process by
:mod:`mae_transfer.demo.lanes`); the MAE and random runs of a seed share the data order and
the heads' initialisation (mmengine's ``randomness.seed``).
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

from PIL import Image

from mae_transfer.datasets import write_toy_ade
from mae_transfer.demo.lanes import Job

CONFIG = os.path.join(
    os.path.dirname(__file__), "..", "..", "configs", "mmseg", "demo_tiny_toy-96x96.py"
)
INITS = ("mae", "random")
METRICS = {"mIoU": "mIoU"}


def demo_options(
    data_root: str, work_dir: str, pretrained, iters: int, seed: Optional[int] = None
) -> Dict:
    opts = {"work_dir": work_dir, "model.backbone.pretrained": pretrained}
    for loader in ("train_dataloader", "val_dataloader", "test_dataloader"):
        opts[f"{loader}.dataset.data_root"] = data_root
    # no validation inside train(): train_run calls runner.val() once, for the metrics
    opts.update({"train_cfg.max_iters": iters, "train_cfg.val_begin": iters + 1})
    opts["default_hooks.checkpoint.interval"] = iters
    if seed is not None:
        opts["randomness.seed"] = seed
    return opts


def schedule(iters: int, warmup_fraction: float = 1 / 15) -> List[Dict]:
    """The config's lr schedule fitted to ``iters``: linear warmup over a fifteenth (30 of 450
    iterations), then poly decay to 0 at the last iteration."""
    if iters < 2:
        raise ValueError(f"the demo's segmentation schedule needs >= 2 iterations, got {iters}")
    warmup = min(max(1, round(iters * warmup_fraction)), iters - 1)
    return [
        dict(type="LinearLR", start_factor=1e-3, by_epoch=False, begin=0, end=warmup),
        dict(type="PolyLR", eta_min=0.0, power=1.0, begin=warmup, end=iters, by_epoch=False),
    ]


def write_data(out: str, num_train: int, num_val: int) -> str:
    """The toy ADE20K-layout set; returns its root."""
    root = os.path.join(out, "data", "toy_ade")
    write_toy_ade(root, num_train, num_val)
    return root


def train_run(
    work_dir: str, pretrained: Optional[str], seed: int, data_root: str, opts=None
) -> Dict[str, float]:
    """One fine-tuning run, then evaluation on the val set: {"mIoU": .., "aAcc": .., ...}."""
    from .runner import build_cfg, make_runner

    iters = schedule_length(opts)
    options = demo_options(data_root, work_dir, pretrained, iters, seed)
    options["param_scheduler"] = schedule(iters)
    options.update(opts or {})
    runner = make_runner(build_cfg(CONFIG, options))
    runner.train()
    return {k: float(v) for k, v in runner.val().items()}


def schedule_length(opts) -> int:
    """The schedule's length: ``train_cfg.max_iters`` of ``opts``, else the config's."""
    if opts and "train_cfg.max_iters" in opts:
        return int(opts["train_cfg.max_iters"])
    from mmengine.config import Config

    return int(Config.fromfile(CONFIG).train_cfg.max_iters)


def make_jobs(out: str, encoder: str, data_root: str, seeds: Sequence[int], opts=None) -> List[Job]:
    """One :class:`Job` per (init, seed); outputs in ``out/segmentation/<init>_seed<seed>/``."""
    jobs = []
    for seed in seeds:
        for init in INITS:
            work_dir = os.path.join(out, "segmentation", f"{init}_seed{seed}")
            kwargs = dict(
                work_dir=work_dir,
                pretrained=encoder if init == "mae" else None,
                seed=seed,
                data_root=data_root,
                opts=opts,
            )
            jobs.append(
                Job(
                    name=f"segmentation {init} seed {seed}",
                    function="mae_transfer.segmentation.demo:train_run",
                    kwargs=kwargs,
                    log=os.path.join(work_dir, "stdout.log"),
                    cost=1.0,
                )
            )
    return jobs


def draw(out: str, data_root: str, seed: int, opts=None) -> str:
    """Overlays of both inits' ``seed`` runs on 4 val images, beside the ground truth."""
    from mmseg.apis import init_model

    from .dataset import ToyADEDataset
    from .runner import build_cfg
    from .visualize import comparison_grid

    iters = schedule_length(opts)
    models = []
    for init in INITS:
        work_dir = os.path.join(out, "segmentation", f"{init}_seed{seed}")
        options = demo_options(data_root, work_dir, None, iters, seed)
        options.update(opts or {})
        cfg = build_cfg(CONFIG, options, for_training=False)
        checkpoint = os.path.join(work_dir, f"iter_{iters}.pth")
        models.append((f"{init} init (seed {seed})", init_model(cfg, checkpoint, device="cpu")))
    val_dir = os.path.join(data_root, "images", "validation")
    names = sorted(n for n in os.listdir(val_dir) if n.endswith(".jpg"))[:4]
    images = [os.path.join(val_dir, n) for n in names]
    gts = [os.path.join(data_root, "annotations", "validation", n[:-4] + ".png") for n in names]
    meta = ToyADEDataset.METAINFO
    grid = comparison_grid(images, models, meta["palette"], gts, classes=meta["classes"])
    path = os.path.join(out, "segmentation", "overlay.png")
    Image.fromarray(grid).save(path)
    return path
