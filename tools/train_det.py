#!/usr/bin/env python
"""Mask R-CNN on the MAE ViT with detectron2: train, resume, evaluate (detectron2's conventions).

    python tools/train_det.py \
        --config-file configs/detectron2/mask_rcnn_vit_base_fpn_lsj_100ep.yaml \
        --num-gpus 8 MODEL.WEIGHTS mae_pretrain_vit_base.pth
    python tools/train_det.py --config-file ... --eval-only MODEL.WEIGHTS output/model_final.pth
    python tools/train_det.py --config-file ... --coco-train ann.json images/ --coco-val ...

MODEL.WEIGHTS may be an official mae_pretrain_vit_*.pth, a checkpoint of our pretraining or a
detectron2 checkpoint. COCO itself is detectron2's builtin ``coco_2017_*`` (under
$DETECTRON2_DATASETS/coco); other COCO-format data sets come from --coco-train/--coco-val or
DATASETS.COCO in the config.
"""

from __future__ import annotations

import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mae_transfer.detection  # noqa: E402,F401  (compat fixes + backbone registration)

# isort: split
from detectron2.engine import default_argument_parser, default_setup, launch  # noqa: E402
from detectron2.utils import comm  # noqa: E402

from mae_transfer.detection import MAECheckpointer  # noqa: E402
from mae_transfer.detection.train import (  # noqa: E402
    Trainer,
    build_cfg,
    check_weights,
    register_coco_datasets,
    summarize,
)

logger = logging.getLogger("train_det")


def setup(args):
    cfg = build_cfg(args.config_file, args.opts, args.coco_train, args.coco_val)
    check_weights(cfg, args.resume)
    cfg.freeze()
    default_setup(cfg, args)
    register_coco_datasets(cfg)
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        MAECheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        results = Trainer.test(cfg, model)
    else:
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=args.resume)
        results = trainer.train()
    if comm.is_main_process() and results:
        logger.info("summary: %s", summarize(results))
    return results


def parser():
    p = default_argument_parser()
    p.add_argument("--coco-train", nargs=2, metavar=("JSON", "IMAGE_ROOT"), default=None)
    p.add_argument("--coco-val", nargs=2, metavar=("JSON", "IMAGE_ROOT"), default=None)
    return p


if __name__ == "__main__":
    args = parser().parse_args()
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
