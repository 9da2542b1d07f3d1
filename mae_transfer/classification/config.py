"""Fine-tuning and linear-probing configurations: the shared run fields plus each protocol's.

Flag names are the official ``main_finetune.py`` / ``main_linprobe.py`` ones. The dataclass
defaults are the ViT-B recipe of the paper (A.1, the official FINETUNE.md / LINPROBE.md);
``configs/finetune`` and ``configs/linprobe`` hold one file per model size with the source of
each number.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Type, Union

from mae_transfer.checkpoint import is_url
from mae_transfer.data.transforms import hw
from mae_transfer.engine.config import (
    Checks,
    ConfigError,
    TrainConfig,
    build_parser,
    check_model_fields,
    check_train_config,
    check_types,
    parse_config,
)
from mae_transfer.engine.config import make_config as _make_config

from .model import GLOBAL_POOLS, build_classifier

__all__ = [
    "ClassifyConfig",
    "ConfigError",
    "FinetuneConfig",
    "LinprobeConfig",
    "load_config",
    "make_config",
    "validate",
]


@dataclass
class ClassifyConfig(TrainConfig):
    """What fine-tuning and linear probing share."""

    model: str = "vit_base_patch16"  # the encoder (the MAE name of the same size works too)
    model_kwargs: Dict[str, Any] = field(default_factory=dict)  # e.g. tiny sizes for tests
    input_size: Union[int, List[int]] = 224
    nb_classes: int = 0  # 0: the number of class folders in train/
    finetune: str = ""  # pretrained checkpoint that initialises the encoder
    global_pool: str = "avg"
    eval: bool = False  # only evaluate (the model from --resume / --finetune) on val/
    eval_crop_pct: Optional[float] = None  # resize by 1 / crop_pct, centre crop; None: official
    # rule, 224/256 up to 224 px and 1.0 above (see eval_crop_pct())
    max_train_images: int = 0  # a fixed random subset of train/ (0 = all)
    max_val_images: int = 0
    save_every_epochs: int = 10


@dataclass
class FinetuneConfig(ClassifyConfig):
    """End-to-end fine-tuning (defaults: ViT-B, the paper's A.1 and the official FINETUNE.md)."""

    batch_size: int = 32  # x accum_iter 4 x 8 GPUs = 1024
    accum_iter: int = 4
    epochs: int = 100
    warmup_epochs: int = 5
    blr: float = 5e-4
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    layer_decay: float = 0.65
    drop_path: float = 0.1
    # augmentation (timm): RandAugment, random erasing, mixup / cutmix, label smoothing
    aa: str = "rand-m9-mstd0.5-inc1"  # "" for none
    color_jitter: Optional[float] = None  # used only without RandAugment (timm's rule)
    reprob: float = 0.25
    remode: str = "pixel"
    recount: int = 1
    smoothing: float = 0.1
    mixup: float = 0.8
    cutmix: float = 1.0
    # cutmix's box side as a fraction of the image's, drawn in [min, max): when set, cutmix is
    # on and this range replaces the cutmix alpha (timm's Mixup), as the official flag
    cutmix_minmax: Optional[List[float]] = None
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"


@dataclass
class LinprobeConfig(ClassifyConfig):
    """Linear probing of a frozen encoder (defaults: ViT-B, the official LINPROBE.md)."""

    global_pool: str = "cls"  # the official linear probe classifies the class token
    batch_size: int = 512  # x accum_iter 4 x 8 GPUs = 16384
    accum_iter: int = 4
    epochs: int = 90
    warmup_epochs: int = 10
    blr: float = 0.1
    min_lr: float = 0.0
    weight_decay: float = 0.0
    momentum: float = 0.9  # LARS
    trust_coefficient: float = 0.001
    cache_features: bool = False  # extract features once (no augmentation), train the head on them


FLAG_HELP = {
    "model": "encoder: vit_{tiny,small,base,large}_patch16 or vit_huge_patch14 (the MAE name "
    "of the same size, e.g. mae_vit_base_patch16, means the same encoder)",
    "input_size": "image size: one int or two (H W)",
    "nb_classes": "classes of the head (0: the number of class folders in train/)",
    "finetune": "pretraining checkpoint that initialises the encoder (official, ours, "
    "OpenMMLab's or Hugging Face's; a file or an http(s) URL)",
    "global_pool": f"feature the head sees: one of {GLOBAL_POOLS}",
    "eval": "evaluate the model of --resume (or --finetune) on val/ and exit",
    "data_path": "ImageNet root with train/ and val/ class folders",
    "layer_decay": "layer-wise lr decay (1.0 = none)",
    "drop_path": "stochastic depth rate",
    "aa": "timm RandAugment policy ('' = none)",
    "reprob": "random erasing probability",
    "smoothing": "label smoothing",
    "mixup": "mixup alpha (0 = off)",
    "cutmix": "cutmix alpha (0 = off)",
    "cutmix_minmax": "cutmix box side as a fraction of the image side, MIN MAX (e.g. 0.2 0.8); "
    "when set, cutmix is on and this range replaces the --cutmix alpha (timm's Mixup)",
    "cache_features": "extract the frozen features once (no augmentation) and train on them",
    "max_train_images": "a fixed random subset of train/ (0 = all)",
    "max_val_images": "a fixed random subset of val/ (0 = all)",
}


def eval_crop_pct(cfg: ClassifyConfig) -> float:
    """The evaluation's crop fraction: ``cfg.eval_crop_pct``, or the official rule (224/256 for
    inputs up to 224 px, 1.0 above: resize to the input size, e.g. ViT-H at 448)."""
    if cfg.eval_crop_pct is not None:
        return cfg.eval_crop_pct
    size = cfg.input_size if isinstance(cfg.input_size, int) else max(cfg.input_size)
    return 224 / 256 if size <= 224 else 1.0


def build_protocol_parser(cls: Type[ClassifyConfig], prog: str):
    what = "End-to-end fine-tuning" if cls is FinetuneConfig else "Linear probing"
    p = build_parser(cls, prog, f"{what} of a ViT classifier.", FLAG_HELP)
    # the official scripts' spellings, so that their command lines run as written
    pool = next(a for a in p._actions if a.dest == "global_pool")
    pool.nargs, pool.const = "?", "avg"  # a bare --global_pool: the official flag (avg)
    pool.help += "; a bare --global_pool means avg"
    p.add_argument(
        "--cls_token",
        dest="global_pool",
        action="store_const",
        const="cls",
        help="the official flag: --global_pool cls",
    )
    p.add_argument(
        "--dist_eval",
        action="store_true",
        help="the official flag, accepted: the evaluation is always split over the processes "
        "(with exact counts: no image repeated to fill a shard)",
    )
    if cls is FinetuneConfig:
        minmax = next(a for a in p._actions if a.dest == "cutmix_minmax")
        minmax.nargs, minmax.metavar = 2, ("MIN", "MAX")
        p.add_argument(
            "--resplit",
            action="store_true",
            help="the official flag, accepted without effect, as there: the official "
            "main_finetune.py parses it but never passes it to timm's create_transform",
        )
    return p


def load_config(
    cls: Type[ClassifyConfig], argv: Optional[Sequence[str]], prog: str
) -> Tuple[ClassifyConfig, Any]:
    """Parses flags, merges defaults < YAML < flags. Returns (config, parsed args)."""
    return parse_config(cls, argv, build_protocol_parser(cls, prog))


def make_config(cls: Type[ClassifyConfig], values: Dict[str, Any]) -> ClassifyConfig:
    return _make_config(cls, values)


def _build(cfg: ClassifyConfig, img_size):
    """The classifier as the trainers build it (for the meta-device check of validation)."""
    kwargs = dict(cfg.model_kwargs)
    if isinstance(cfg, FinetuneConfig):
        kwargs = {"drop_path_rate": cfg.drop_path, **kwargs}
    pool = cfg.global_pool if cfg.global_pool in GLOBAL_POOLS else "avg"  # checked apart
    probe = isinstance(cfg, LinprobeConfig)
    return build_classifier(cfg.model, max(cfg.nb_classes, 1), img_size, pool, probe, **kwargs)


def validate(cfg: ClassifyConfig, check_paths: bool = True) -> None:
    """Raises ConfigError listing every invalid value (before anything is built)."""
    checks = Checks("fine-tuning" if isinstance(cfg, FinetuneConfig) else "linear-probing")
    cfg = check_types(cfg, checks)
    check_train_config(cfg, checks, check_paths)
    check_model_fields(cfg, checks, lambda img_size: _build(cfg, img_size))
    need = checks.need
    need(
        cfg.nb_classes >= 0,
        f"nb_classes must be >= 0 (0 = count class folders), got {cfg.nb_classes}",
    )
    need(
        cfg.global_pool in GLOBAL_POOLS,
        f"global_pool must be one of {GLOBAL_POOLS}, got {cfg.global_pool!r}",
    )
    need(
        cfg.eval_crop_pct is None or 0 < cfg.eval_crop_pct <= 1,
        f"eval_crop_pct must be in (0, 1] (or unset), got {cfg.eval_crop_pct}",
    )
    for name in ("max_train_images", "max_val_images"):
        need(getattr(cfg, name) >= 0, f"{name} must be >= 0 (0 = all), got {getattr(cfg, name)}")
    if isinstance(cfg, FinetuneConfig):
        _check_finetune(cfg, checks)
    else:
        _check_linprobe(cfg, checks)
    _check_paths(cfg, checks, check_paths)
    checks.raise_if_any()


def _check_finetune(cfg: FinetuneConfig, checks: Checks) -> None:
    need = checks.need
    need(0 < cfg.layer_decay <= 1, f"layer_decay must be in (0, 1], got {cfg.layer_decay}")
    need(0 <= cfg.drop_path < 1, f"drop_path must be in [0, 1), got {cfg.drop_path}")
    for name in ("reprob", "smoothing", "mixup_prob", "mixup_switch_prob"):
        value = getattr(cfg, name)
        need(0 <= value <= 1, f"{name} must be in [0, 1], got {value}")
    for name in ("mixup", "cutmix"):
        need(getattr(cfg, name) >= 0, f"{name} must be >= 0 (0 = off), got {getattr(cfg, name)}")
    need(
        cfg.color_jitter is None or cfg.color_jitter >= 0,
        f"color_jitter must be >= 0 (0 = off), got {cfg.color_jitter}",
    )
    need(
        cfg.remode in ("const", "rand", "pixel"),
        f"remode must be const, rand or pixel, got {cfg.remode!r}",
    )
    need(cfg.recount >= 1, f"recount must be >= 1, got {cfg.recount}")
    modes = ("batch", "pair", "elem")
    need(cfg.mixup_mode in modes, f"mixup_mode must be one of {modes}, got {cfg.mixup_mode!r}")
    _check_cutmix_minmax(cfg, checks)
    mixing = mixes(cfg)
    need(
        not mixing or cfg.batch_size % 2 == 0,
        f"batch_size must be even with mixup / cutmix (timm mixes pairs), got {cfg.batch_size}",
    )
    if cfg.aa:  # parsed as timm's transform factory will: rand-, augmix- or an AutoAugment one
        try:
            from timm.data import auto_augment as policies

            hparams = {"translate_const": 100, "img_mean": (124, 116, 104)}
            if cfg.aa.startswith("rand"):
                policies.rand_augment_transform(cfg.aa, hparams)
            elif cfg.aa.startswith("augmix"):
                policies.augment_and_mix_transform(cfg.aa, hparams)
            else:
                policies.auto_augment_transform(cfg.aa, hparams)
        except Exception as e:  # noqa: BLE001 - timm's parse error, named
            checks.errors.append(f"aa {cfg.aa!r} is not a timm augmentation policy: {e!r}")


def mixes(cfg: FinetuneConfig) -> bool:
    """Whether batches are mixed: mixup or cutmix on (an alpha > 0, or a cutmix_minmax range,
    as in timm and the official script) and a mixing probability above 0."""
    cutmix = cfg.cutmix > 0 or cfg.cutmix_minmax is not None
    return (cfg.mixup > 0 or cutmix) and cfg.mixup_prob > 0


def _check_cutmix_minmax(cfg: FinetuneConfig, checks: Checks) -> None:
    """Two fractions 0 < min < max <= 1 whose box sides differ by a pixel at the input size
    (timm draws the side with randint(int(size x min), int(size x max)), which fails on an
    empty range, mid-training)."""
    minmax = cfg.cutmix_minmax
    if minmax is None:
        return
    pair = isinstance(minmax, (list, tuple)) and len(minmax) == 2
    if not pair or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in minmax):
        checks.errors.append(f"cutmix_minmax must be two numbers, MIN MAX, got {minmax!r}")
        return
    low, high = minmax
    if not 0 < low < high <= 1:
        checks.errors.append(
            f"cutmix_minmax must satisfy 0 < MIN < MAX <= 1 (fractions of the image side), "
            f"got {low} {high}"
        )
        return
    try:
        sides = hw(cfg.input_size)
    except (TypeError, ValueError, IndexError):
        return  # a bad input_size: named by its own check
    for side in dict.fromkeys(sides):  # timm draws the height and the width alike
        if int(side * low) >= int(side * high):
            checks.errors.append(
                f"cutmix_minmax {low} {high}: at an image side of {side} px (input_size "
                f"{cfg.input_size}) both give a box side of {int(side * low)} px; widen the range"
            )
            return


def _check_linprobe(cfg: LinprobeConfig, checks: Checks) -> None:
    need = checks.need
    need(0 <= cfg.momentum < 1, f"momentum must be in [0, 1), got {cfg.momentum}")
    need(cfg.trust_coefficient > 0, f"trust_coefficient must be > 0, got {cfg.trust_coefficient}")
    need(
        cfg.eval or not isinstance(cfg.batch_size, int) or cfg.batch_size >= 2,
        f"batch_size must be >= 2 for linear probing (the probe's BatchNorm normalises each "
        f"process's batch), got {cfg.batch_size}",
    )


def _check_paths(cfg: ClassifyConfig, checks: Checks, check_paths: bool) -> None:
    need = checks.need
    if not cfg.data_path:
        checks.errors.append("data_path is required: a root with train/ and val/ class folders")
    elif check_paths:
        for split in ([] if cfg.eval else ["train"]) + ["val"]:
            path = os.path.join(cfg.data_path, split)
            need(os.path.isdir(path), f"data_path {cfg.data_path!r} has no {split}/ class folders")
    if cfg.eval:
        need(
            bool(cfg.resume or cfg.finetune),
            "eval needs a checkpoint: --resume a fine-tuned / linear-probe checkpoint",
        )
    elif isinstance(cfg, LinprobeConfig):
        need(
            bool(cfg.finetune or cfg.resume),
            "linear probing needs the pretrained encoder: --finetune CHECKPOINT",
        )
    if check_paths and cfg.finetune:
        need(
            os.path.isfile(cfg.finetune) or is_url(cfg.finetune),
            f"finetune checkpoint {cfg.finetune!r} does not exist",
        )
