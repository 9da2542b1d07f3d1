#!/usr/bin/env python
"""Mask R-CNN on the MAE ViT with detectron2: train, resume, evaluate (detectron2's conventions).

    python tools/train_det.py \
        --config-file configs/detectron2/mask_rcnn_vit_base_fpn_lsj_100ep.yaml \
        --num-gpus 8 MODEL.WEIGHTS mae_pretrain_vit_base.pth
    python tools/train_det.py --config-file ... --eval-only MODEL.WEIGHTS output/model_final.pth
    python tools/train_det.py --config-file ... --coco-train ann.json images/ --coco-val ...
    python tools/train_det.py \
        --config-file configs/detectron2/mask_rcnn_vit_base_fpn_lvis_100ep.yaml \
        --lvis-train lvis_v1_train.json coco/ --lvis-val lvis_v1_val.json coco/ ...

MODEL.WEIGHTS may be an official mae_pretrain_vit_*.pth, a checkpoint of our pretraining or a
detectron2 checkpoint. COCO itself is detectron2's builtin ``coco_2017_*`` (under
$DETECTRON2_DATASETS/coco), LVIS v1 its builtin ``lvis_v1_*`` (there too); other COCO-format
data sets come from --coco-train/--coco-val or DATASETS.COCO in the config, LVIS-format ones
from --lvis-train/--lvis-val (IMAGE_ROOT: the folder of COCO's train2017/ and val2017/) or
DATASETS.LVIS.
"""

from __future__ import annotations

import logging
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mae_transfer.detection  # noqa: E402,F401  (compat fixes + backbone registration)

# isort: split
from detectron2.engine import default_argument_parser, default_setup, launch  # noqa: E402
from detectron2.utils import comm  # noqa: E402

from mae_transfer.detection import MAECheckpointer  # noqa: E402
from mae_transfer.detection.train import (  # noqa: E402
    Trainer,
    align_test_categories,
    attach_logs,
    build_cfg,
    check_datasets,
    check_detector_weights,
    check_num_classes,
    check_pretrained,
    check_weights,
    eval_tasks,
    register_coco_datasets,
    summarize,
)
from mae_transfer.engine.config import ConfigError  # noqa: E402
from mae_transfer.engine.launch import exit_code  # noqa: E402

logger = logging.getLogger("train_det")


def has_checkpoint(cfg) -> bool:
    """Whether OUTPUT_DIR holds a checkpoint for --resume (detectron2's last_checkpoint file)."""
    return os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint"))


def load_cfg(args):
    """The run's config with its weights file and data sets checked (ConfigError otherwise)."""
    cfg = build_cfg(
        args.config_file, args.opts, args.coco_train, args.coco_val, args.lvis_train, args.lvis_val
    )
    check_weights(cfg, args.resume, args.eval_only)
    resuming = args.resume and has_checkpoint(cfg)
    if cfg.MODEL.VIT.PRETRAINED and (args.eval_only or resuming):
        # the trained detector's weights replace the encoder's that began its training
        # (that file may be gone since)
        logger.info(
            "MODEL.VIT.PRETRAINED %s not loaded: a trained detector is", cfg.MODEL.VIT.PRETRAINED
        )
        cfg.MODEL.VIT.PRETRAINED = ""
    check_pretrained(cfg)
    register_coco_datasets(cfg)
    check_datasets(cfg, args.eval_only)
    return cfg


def setup(args):
    cfg = load_cfg(args)
    cfg.freeze()
    default_setup(cfg, args)  # sets up detectron2's and fvcore's loggers only
    # ours too (the weight-loading report, data set checks, the summary): to the console and
    # to detectron2's log.txt
    attach_logs(("mae_transfer", "train_det"), cfg.OUTPUT_DIR, comm.get_rank())
    return cfg


def check_test_sets(cfg) -> None:
    """Before training: each test set read once (names, masks), numbered as the training's."""
    align_test_categories(cfg)
    for name in cfg.DATASETS.TEST:
        eval_tasks(cfg, name)
    check_num_classes(cfg, cfg.DATASETS.TEST)


def warn_about_resume(cfg, resume: bool, start_iter: int) -> None:
    """--resume that finds nothing to resume, or a checkpoint at or past SOLVER.MAX_ITER, said
    once (detectron2 starts from MODEL.WEIGHTS, or trains nothing, without a word)."""
    if not (resume and comm.is_main_process()):
        return
    if not has_checkpoint(cfg):
        logger.warning(
            "--resume: no checkpoint in OUTPUT_DIR %s (no last_checkpoint file): training "
            "starts at iteration 0 from MODEL.WEIGHTS / MODEL.VIT.PRETRAINED",
            cfg.OUTPUT_DIR,
        )
    elif start_iter >= cfg.SOLVER.MAX_ITER:
        logger.warning(
            "--resume: the checkpoint in %s ends at iteration %d, SOLVER.MAX_ITER is %d: "
            "nothing left to train (raise SOLVER.MAX_ITER to train on)",
            cfg.OUTPUT_DIR,
            start_iter,
            cfg.SOLVER.MAX_ITER,
        )


def main(args):
    cfg = setup(args)
    if args.eval_only:
        check_test_sets(cfg)
        model = Trainer.build_model(cfg)
        # a trained detector, all of it: an MAE file or another model's would evaluate heads
        # left at random
        MAECheckpointer(model, save_dir=cfg.OUTPUT_DIR, whole_model=True).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        results = Trainer.test(cfg, model)
        if cfg.TEST.AUG.ENABLED:  # as detectron2's tools/train_net.py: results named *_TTA
            results.update(Trainer.test_with_TTA(cfg, model))
    else:
        trainer = Trainer(cfg)  # its data loader has read the training sets
        check_num_classes(cfg, cfg.DATASETS.TRAIN)
        check_test_sets(cfg)
        trainer.resume_or_load(resume=args.resume)
        warn_about_resume(cfg, args.resume, trainer.start_iter)
        results = trainer.train()
    if comm.is_main_process() and results:
        summary = summarize(results)
        logger.info("summary: %s", summary)
        if any(v != v for v in summary.values()):  # NaN
            logger.warning(
                "nan AP: no prediction scored %s or more on that test set (MODEL.ROI_HEADS."
                "SCORE_THRESH_TEST), so COCO evaluation had nothing to score: a model that has "
                "not trained long enough yet",
                cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST,
            )
    return results


def parser():
    p = default_argument_parser()
    p.add_argument("--coco-train", nargs=2, metavar=("JSON", "IMAGE_ROOT"), default=None)
    p.add_argument("--coco-val", nargs=2, metavar=("JSON", "IMAGE_ROOT"), default=None)
    p.add_argument("--lvis-train", nargs=2, metavar=("JSON", "IMAGE_ROOT"), default=None)
    p.add_argument("--lvis-val", nargs=2, metavar=("JSON", "IMAGE_ROOT"), default=None)
    # detectron2's KEY VALUE overrides are argparse.REMAINDER: an option after them was taken
    # as one more override (yacs: "odd length"). As words between options they may go anywhere.
    next(a for a in p._actions if a.dest == "opts").nargs = "*"
    return p


def cli(argv=None) -> int:
    """Exit code 0; 2 for a bad config value, a missing file or data set, or weights that do
    not fit the model (checked before any process starts, and again on every rank)."""
    args = parser().parse_intermixed_args(argv)

    def body():
        cfg = load_cfg(args)
        gpus = torch.cuda.device_count()
        if args.num_gpus > 1 and gpus < args.num_gpus:  # else a spawned worker's traceback
            raise ConfigError(
                f"--num-gpus {args.num_gpus}: detectron2 starts one process per GPU and this "
                f"machine has {gpus or 'no CUDA GPU'}"
            )
        if args.eval_only and not args.resume and args.num_gpus * args.num_machines > 1:
            check_detector_weights(cfg)  # in one process, main's own load says it
        launch(
            main,
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            args=(args,),
        )

    return exit_code(
        body,
        logger,
        resume="add --resume to the same command to continue from OUTPUT_DIR's last checkpoint",
    )


if __name__ == "__main__":
    sys.exit(cli())
