"""Pretraining configuration: defaults in one dataclass, a YAML file over them, flags over both.

Flag names are the official ``main_pretrain.py`` ones where they exist. ``validate`` rejects bad
values, all at once and before anything is built, naming each value and the fix.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Union

import yaml

AMP_MODES = ("auto", "fp32", "bf16", "fp16")
MASK_NOISE_MODES = ("per_sample", "global")


class ConfigError(ValueError):
    """One or more configuration values are invalid; the message lists them all."""


@dataclass
class PretrainConfig:
    # model
    model: str = "mae_vit_large_patch16"
    model_kwargs: Dict[str, Any] = field(default_factory=dict)  # e.g. tiny sizes for tests
    input_size: Union[int, List[int]] = 224  # int or [H, W]
    mask_ratio: float = 0.75
    norm_pix_loss: bool = False
    mask_noise: str = "per_sample"  # per_sample: mask depends on (seed, epoch, image), not rank
    # optimisation; lr = blr * batch_size * accum_iter * world_size / 256 unless lr is given
    batch_size: int = 64  # per process
    accum_iter: int = 1
    epochs: int = 400
    warmup_epochs: int = 40
    blr: float = 1e-3
    lr: Optional[float] = None
    min_lr: float = 0.0
    weight_decay: float = 0.05
    clip_grad: Optional[float] = None
    # data
    data_path: str = ""
    dataset_repeats: int = 1  # virtual passes over a small folder per epoch (demo data)
    num_workers: int = 8
    pin_mem: bool = True
    # run
    output_dir: str = "./output_dir"
    log_dir: Optional[str] = None  # TensorBoard; defaults to output_dir
    resume: str = ""
    auto_resume: bool = True  # continue from output_dir/checkpoint-last.pth when present
    seed: int = 0
    device: str = "auto"  # auto = cuda when available, else cpu
    amp: str = "auto"  # auto = bf16 on CUDA, fp32 on CPU
    compile: bool = False
    save_every_epochs: int = 20
    save_every_iters: int = 0  # 0: checkpoint-last only at the end of each epoch
    log_every_iters: int = 20
    dist_url: str = "env://"

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


FLAG_HELP = {
    "model": "registered MAE model name (see `python -m pretrain --list-models`)",
    "input_size": "image size: one int or two (H W)",
    "mask_ratio": "fraction of patches removed",
    "norm_pix_loss": "normalise each target patch by its mean and std",
    "batch_size": "images per process per iteration",
    "accum_iter": "gradient accumulation steps",
    "blr": "base lr: lr = blr * effective batch / 256",
    "lr": "absolute lr (overrides blr)",
    "data_path": "ImageNet root (with train/) or any folder of images",
    "resume": "checkpoint to resume from",
    "device": "auto, cpu, cuda or cuda:N",
    "amp": f"one of {AMP_MODES}",
}


def _fields() -> Dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(PretrainConfig)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        "python -m pretrain",
        description="MAE pretraining. Precedence: defaults < --config YAML < flags.",
    )
    p.add_argument("--config", default=None, help="YAML file of config values")
    p.add_argument("--list-models", action="store_true", help="list registered models and exit")
    for name, f in _fields().items():
        if name == "model_kwargs":
            continue
        flag = f"--{name}"
        kw = dict(default=None, help=FLAG_HELP.get(name, ""))
        if f.type in ("bool", bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif name == "input_size":
            p.add_argument(flag, type=int, nargs="+", **kw)
        else:
            p.add_argument(flag, type=_flag_type(f), **kw)
    return p


def _flag_type(f: dataclasses.Field):
    t = str(f.type)
    if "float" in t:
        return float
    if "int" in t:
        return int
    return str


def load_config(argv: Optional[Sequence[str]] = None) -> tuple:
    """Parses flags, merges defaults < YAML < flags. Returns (config, parsed args)."""
    args = build_parser().parse_args(argv)
    values: Dict[str, Any] = {}
    if args.config:
        values.update(read_yaml(args.config))
    values.update({k: v for k, v in vars(args).items() if k in _fields() and v is not None})
    return make_config(values), args


def read_yaml(path: str) -> Dict[str, Any]:
    """A YAML mapping of config values; ``_base_: other.yaml`` (relative) is read first."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys, got {type(data).__name__}")
    base = data.pop("_base_", None)
    if base:
        merged = read_yaml(os.path.join(os.path.dirname(os.path.abspath(path)), base))
        merged.update(data)
        data = merged
    return data


def make_config(values: Dict[str, Any]) -> PretrainConfig:
    unknown = sorted(set(values) - set(_fields()))
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {unknown}; valid keys: {', '.join(sorted(_fields()))}"
        )
    values = dict(values)
    if isinstance(values.get("input_size"), (list, tuple)) and len(values["input_size"]) == 1:
        values["input_size"] = values["input_size"][0]
    for name, f in _fields().items():
        if isinstance(values.get(name), str) and name != "input_size":
            values[name] = _parse_number(values[name], _flag_type(f))
    return PretrainConfig(**values)


def _parse_number(text: str, kind: type) -> Any:
    """'1e-3' as a float (YAML reads exponents without a dot as strings); else the text as is."""
    if kind is str:
        return text
    try:
        value = float(text)
    except ValueError:
        return text  # validate() names it
    return int(value) if kind is int and value.is_integer() else value


def save_config(cfg: PretrainConfig, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)


def validate(cfg: PretrainConfig) -> None:
    """Raises ConfigError listing every invalid value; checks nothing that needs the model."""
    errors: List[str] = []

    def need(ok: bool, msg: str) -> None:
        if not ok:
            errors.append(msg)

    # numbers first: a wrong type is named once and its default stands in for the range checks
    fixes = {}
    for name, f in _fields().items():
        kind, value = _flag_type(f), getattr(cfg, name)
        if name == "input_size" or kind is str or value is None:
            continue
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not is_number or (kind is int and not isinstance(value, int)):
            what = "an integer" if kind is int else "a number"
            errors.append(f"{name} must be {what}, got {value!r}")
            fixes[name] = f.default
    cfg = dataclasses.replace(cfg, **fixes)

    from mae_transfer.registry import resolve_name

    try:
        resolve_name(cfg.model)
    except KeyError as e:
        errors.append(str(e))
    need(
        isinstance(cfg.model_kwargs, dict),
        f"model_kwargs must be a mapping, got {cfg.model_kwargs!r}",
    )
    sizes = cfg.input_size if isinstance(cfg.input_size, (list, tuple)) else [cfg.input_size]
    need(
        len(sizes) in (1, 2) and all(isinstance(s, int) and s > 0 for s in sizes),
        f"input_size must be a positive int or [H, W], got {cfg.input_size!r}",
    )
    need(
        0.0 < cfg.mask_ratio < 1.0,
        f"mask_ratio must be in (0, 1): the loss is taken on masked patches; got {cfg.mask_ratio}",
    )
    need(cfg.mask_noise in MASK_NOISE_MODES, f"mask_noise must be one of {MASK_NOISE_MODES}")
    for name in ("batch_size", "accum_iter", "epochs", "dataset_repeats", "save_every_epochs"):
        value = getattr(cfg, name)
        need(isinstance(value, int) and value >= 1, f"{name} must be an int >= 1, got {value!r}")
    for name in ("num_workers", "save_every_iters"):
        value = getattr(cfg, name)
        need(isinstance(value, int) and value >= 0, f"{name} must be an int >= 0, got {value!r}")
    need(cfg.log_every_iters >= 1, f"log_every_iters must be >= 1, got {cfg.log_every_iters}")
    need(
        0 <= cfg.warmup_epochs <= cfg.epochs,
        f"warmup_epochs must be in [0, epochs={cfg.epochs}], got {cfg.warmup_epochs}",
    )
    need(cfg.blr > 0, f"blr must be > 0, got {cfg.blr}")
    need(cfg.lr is None or cfg.lr > 0, f"lr must be > 0 (or unset to use blr), got {cfg.lr}")
    need(cfg.min_lr >= 0, f"min_lr must be >= 0, got {cfg.min_lr}")
    need(cfg.weight_decay >= 0, f"weight_decay must be >= 0, got {cfg.weight_decay}")
    need(cfg.clip_grad is None or cfg.clip_grad > 0, f"clip_grad must be > 0, got {cfg.clip_grad}")
    need(cfg.amp in AMP_MODES, f"amp must be one of {AMP_MODES}, got {cfg.amp!r}")
    need(
        cfg.device == "auto" or cfg.device == "cpu" or cfg.device.startswith("cuda"),
        f"device must be auto, cpu, cuda or cuda:N, got {cfg.device!r}",
    )
    if not cfg.data_path:
        errors.append("data_path is required: an ImageNet root (with train/) or a folder of images")
    elif not os.path.isdir(cfg.data_path):
        errors.append(f"data_path {cfg.data_path!r} is not a directory")
    else:
        from .data import first_image

        if first_image(cfg.data_path) is None:
            errors.append(
                f"data_path {cfg.data_path!r} holds no images: expected an ImageNet root with "
                "train/<class>/*.JPEG or a folder of images"
            )
    if cfg.resume and not os.path.isfile(cfg.resume):
        errors.append(f"resume checkpoint {cfg.resume!r} does not exist")
    if errors:
        raise ConfigError("invalid pretraining config:\n  - " + "\n  - ".join(errors))
