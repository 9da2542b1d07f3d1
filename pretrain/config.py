"""Pretraining configuration: the shared run fields (:class:`TrainConfig`) plus MAE's own.

Flag names are the official ``main_pretrain.py`` ones where they exist. ``validate`` rejects bad
values, all at once and before anything is built, naming each value and the fix.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from mae_transfer.engine.config import (
    AMP_MODES,
    Checks,
    ConfigError,
    TrainConfig,
    check_model_fields,
    check_train_config,
    check_types,
    parse_config,
    read_yaml,
    save_config,
)
from mae_transfer.engine.config import (
    build_parser as _build_parser,
)
from mae_transfer.engine.config import make_config as _make_config

__all__ = [
    "AMP_MODES",
    "ConfigError",
    "PretrainConfig",
    "build_parser",
    "load_config",
    "make_config",
    "read_yaml",
    "save_config",
    "validate",
]

MASK_NOISE_MODES = ("per_sample", "global")
KNN_POOLS = ("cls", "avg")


@dataclass
class PretrainConfig(TrainConfig):
    # model
    model: str = "mae_vit_large_patch16"
    model_kwargs: Dict[str, Any] = field(default_factory=dict)  # e.g. tiny sizes for tests
    input_size: Union[int, List[int]] = 224  # int or [H, W]
    mask_ratio: float = 0.75
    norm_pix_loss: bool = False
    mask_noise: str = "per_sample"  # per_sample: mask depends on (seed, epoch, image), not rank
    dataset_repeats: int = 1  # virtual passes over a small folder per epoch (demo data)
    decode_on_device: bool = False  # JPEGs decoded in the step (nvJPEG on CUDA), not the loader
    reduced_decode: bool = True  # large JPEGs decoded at 1/4-1/8 size (DCT scaling) when cropped
    # the official main_pretrain.py defaults (the paper's recipe: configs/pretrain/*.yaml)
    epochs: int = 400
    warmup_epochs: int = 40
    # k-NN monitor of the encoder (class folders <dir>/<class>/<image>); off when unset
    knn_train: str = ""
    knn_val: str = ""
    knn_every: int = 1  # epochs
    knn_max_images: int = 10000  # per split, a fixed random subset; 0 = all
    knn_pool: str = "cls"  # the encoder's feature: class token or average of the patch tokens


FLAG_HELP = {
    "model": "registered MAE model name (see `python -m pretrain --list-models`)",
    "input_size": "image size: one int or two (H W)",
    "mask_ratio": "fraction of patches removed",
    "norm_pix_loss": "normalise each target patch by its mean and std",
    "data_path": "ImageNet root (with train/) or any folder of images",
    "decode_on_device": "decode JPEGs on the training device (nvJPEG through torchvision on "
    "CUDA); loader workers then only read files and draw crops",
    "reduced_decode": "decode a JPEG at 1/4 or 1/8 size when the crop is at least that many "
    "times the output (faster on photographs >= 4x the input size; pixels differ from "
    "full-size decoding by ~0.6 grey levels on average, see README)",
    "knn_train": "class folders for the k-NN monitor's memory bank (e.g. a subset of train/)",
    "knn_val": "class folders the k-NN monitor classifies (e.g. val/)",
    "knn_every": "run the k-NN monitor every this many epochs",
    "knn_max_images": "images per k-NN split (a fixed random subset; 0 = all). On ImageNet the "
    "default 10000 leaves ~10 bank images per class: read k 20 (k 200 must vote mostly with "
    "other classes); 0 extracts the 1.28M training images each time, about another epoch",
    "knn_pool": f"k-NN feature: one of {KNN_POOLS}",
}


def build_parser() -> argparse.ArgumentParser:
    # the console script (pyproject's mae-pretrain) or the module, as the user typed it
    prog = (
        "mae-pretrain" if os.path.basename(sys.argv[0]) == "mae-pretrain" else "python -m pretrain"
    )
    p = _build_parser(PretrainConfig, prog, "MAE pretraining.", FLAG_HELP)
    p.add_argument("--list-models", action="store_true", help="list registered models and exit")
    return p


def load_config(argv: Optional[Sequence[str]] = None) -> Tuple[PretrainConfig, Any]:
    """Parses flags, merges defaults < YAML < flags. Returns (config, parsed args)."""
    return parse_config(PretrainConfig, argv, build_parser())


def make_config(values: Dict[str, Any]) -> PretrainConfig:
    return _make_config(PretrainConfig, values)


def validate(cfg: PretrainConfig, check_paths: bool = True) -> None:
    """Raises ConfigError listing every invalid value; checks nothing that needs the model.

    ``check_paths=False``: not whether data, k-NN folders and ``resume`` exist here (a Slurm
    submission: the storage may be mounted only on the cluster's nodes, where every task runs
    the full check before it starts).
    """
    checks = Checks("pretraining")
    cfg = check_types(cfg, checks)
    check_train_config(cfg, checks, check_paths)
    need = checks.need
    if _is_mae(cfg.model):
        from mae_transfer.registry import create_model

        def build(img_size):
            kwargs = dict(cfg.model_kwargs, norm_pix_loss=cfg.norm_pix_loss)
            return create_model(cfg.model, img_size=img_size, **kwargs)

        model = check_model_fields(cfg, checks, build)
        if model is not None:
            checks.errors.extend(patch_problems(cfg, model))
    else:
        checks.errors.append(
            f"model {cfg.model!r} is not an MAE model: pretraining needs an mae_vit_* name "
            "(the vit_* names are the encoders that fine-tuning and transfer use)"
        )
    need(
        0.0 < cfg.mask_ratio < 1.0,
        f"mask_ratio must be in (0, 1): the loss is taken on masked patches; got {cfg.mask_ratio}",
    )
    need(cfg.mask_noise in MASK_NOISE_MODES, f"mask_noise must be one of {MASK_NOISE_MODES}")
    need(
        cfg.dataset_repeats >= 1, f"dataset_repeats must be an int >= 1, got {cfg.dataset_repeats}"
    )
    _check_data_path(cfg, checks, check_paths)
    _check_knn(cfg, checks, check_paths)
    checks.raise_if_any()


def patch_problems(cfg: PretrainConfig, model) -> List[str]:
    """What the input size and mask ratio cannot do with ``model``'s patches: the loss needs
    images the patches tile, and a mask ratio that keeps at least one patch visible."""
    from mae_transfer.data.transforms import hw
    from mae_transfer.mae import kept_patches

    (h, w), p = hw(cfg.input_size), model.patch_size
    if h % p or w % p:
        return [f"input_size {cfg.input_size} is not a multiple of the patch size {p}"]
    n = model.patch_embed.num_patches
    if 0.0 < cfg.mask_ratio < 1.0 and kept_patches(n, cfg.mask_ratio) < 1:
        return [f"mask_ratio {cfg.mask_ratio} keeps no patch of the {n}"]
    return []


def _is_mae(name: str) -> bool:
    from mae_transfer.registry import resolve_name

    try:
        return resolve_name(name).startswith("mae_")
    except KeyError:
        return True  # check_model_fields names the unknown model


def _check_data_path(cfg: PretrainConfig, checks: Checks, check_paths: bool) -> None:
    if not cfg.data_path:
        checks.errors.append(
            "data_path is required: an ImageNet root (with train/) or a folder of images"
        )
    elif not check_paths:
        return
    elif not os.path.isdir(cfg.data_path):
        checks.errors.append(f"data_path {cfg.data_path!r} is not a directory")
    else:
        from mae_transfer.data import first_image, split_root

        if first_image(cfg.data_path) is None:
            base = split_root(cfg.data_path)
            where = (
                f"its train/ folder {base!r} holds no images (an ImageNet-style root trains on "
                "train/ only)"
                if base != cfg.data_path
                else "holds no images"
            )
            checks.errors.append(
                f"data_path {cfg.data_path!r}: {where}; expected an ImageNet root with "
                "train/<class>/*.JPEG or a folder of images"
            )


def _check_knn(cfg: PretrainConfig, checks: Checks, check_paths: bool) -> None:
    need = checks.need
    need(
        bool(cfg.knn_train) == bool(cfg.knn_val),
        "the k-NN monitor needs both knn_train and knn_val (class folders), or neither",
    )
    for name in ("knn_train", "knn_val"):
        path = getattr(cfg, name)
        ok = not path or not check_paths or os.path.isdir(path)
        need(ok, f"{name} {path!r} is not a directory")
    need(cfg.knn_every >= 1, f"knn_every must be an int >= 1, got {cfg.knn_every}")
    need(
        cfg.knn_max_images >= 0, f"knn_max_images must be >= 0 (0 = all), got {cfg.knn_max_images}"
    )
    need(cfg.knn_pool in KNN_POOLS, f"knn_pool must be one of {KNN_POOLS}, got {cfg.knn_pool!r}")
