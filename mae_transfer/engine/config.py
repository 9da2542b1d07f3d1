"""Run configurations: defaults in a dataclass, a YAML file over them, flags over both.

Every protocol (pretraining, fine-tuning, linear probing) is a subclass of :class:`TrainConfig`
that adds its own fields and changes defaults. The same functions parse, merge, check and save
all of them; ``validate`` functions report every bad value at once, before anything is built.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Type, TypeVar

import yaml

logger = logging.getLogger(__name__)

AMP_MODES = ("auto", "fp32", "bf16", "fp16")
C = TypeVar("C", bound="TrainConfig")


class ConfigError(ValueError):
    """One or more configuration values are invalid; the message lists them all."""


@dataclass
class TrainConfig:
    """What every training protocol has: optimisation, data loading, the run itself."""

    # optimisation; lr = blr * batch_size * accum_iter * world_size / 256 unless lr is given
    batch_size: int = 64  # per process
    accum_iter: int = 1
    epochs: int = 100
    warmup_epochs: int = 5
    blr: float = 1e-3
    lr: Optional[float] = None
    min_lr: float = 0.0
    weight_decay: float = 0.05
    clip_grad: Optional[float] = None
    # data
    data_path: str = ""
    num_workers: int = 8
    pin_mem: bool = True
    # run
    output_dir: str = "./output_dir"
    log_dir: Optional[str] = None  # TensorBoard; defaults to output_dir
    resume: str = ""
    auto_resume: bool = True  # continue from output_dir/checkpoint-last.pth when it is newer
    seed: int = 0
    device: str = "auto"  # auto = cuda when available, else cpu
    amp: str = "auto"  # see mae_transfer.device.resolve_amp
    tf32: bool = False  # TF32 matrix multiplies in fp32 training on Ampere+ GPUs
    compile: bool = False
    save_every_epochs: int = 20
    save_every_iters: int = 0  # 0: checkpoint-last only at the end of each epoch
    log_every_iters: int = 20
    dist_url: str = "env://"

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


COMMON_HELP = {
    "batch_size": "images per process per iteration",
    "accum_iter": "gradient accumulation steps (effective batch = batch x accum x processes)",
    "blr": "base lr: lr = blr * effective batch / 256",
    "lr": "absolute lr (overrides blr)",
    "resume": "checkpoint to resume from (the newer of it and output_dir/checkpoint-last.pth)",
    "device": "auto, cpu, cuda or cuda:N",
    "amp": f"one of {AMP_MODES}; auto: bf16 where the device has native bf16, else fp32",
    "tf32": "TF32 matrix multiplies for fp32 training on Ampere+ GPUs",
}


def fields_of(cls: Type[C]) -> Dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def flag_type(f: dataclasses.Field):
    """int, float or str, from the field's annotation (a string under postponed evaluation)."""
    t = str(f.type)
    if "float" in t:
        return float
    if "int" in t:
        return int
    return str


def _is_bool(f: dataclasses.Field) -> bool:
    return f.type in ("bool", bool)


def build_parser(
    cls: Type[C], prog: str, description: str, helps: Mapping[str, str] = ()
) -> argparse.ArgumentParser:
    """One ``--flag`` per field (``--x/--no-x`` for booleans, ``--no_x`` too: the official
    scripts' spelling, e.g. ``--no_pin_mem``); mappings are YAML-only."""
    p = argparse.ArgumentParser(
        prog, description=description + " Precedence: defaults < --config YAML < flags."
    )
    p.add_argument("--config", default=None, help="YAML file of config values")
    helps = {**COMMON_HELP, **dict(helps)}
    for name, f in fields_of(cls).items():
        if "Dict" in str(f.type):
            continue
        kw = dict(default=None, help=helps.get(name, ""))
        if _is_bool(f):
            p.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, **kw)
            p.add_argument(
                f"--no_{name}",
                dest=name,
                action="store_false",
                default=None,
                help=argparse.SUPPRESS,
            )
        elif "List" in str(f.type):
            kind = float if "List[float]" in str(f.type) else int
            p.add_argument(f"--{name}", type=kind, nargs="+", **kw)
        else:
            p.add_argument(f"--{name}", type=flag_type(f), **kw)
    return p


def parse_config(
    cls: Type[C], argv: Optional[Sequence[str]], parser: argparse.ArgumentParser
) -> Tuple[C, argparse.Namespace]:
    """Parses flags and merges defaults < YAML < flags. Returns (config, parsed args)."""
    args = parser.parse_args(argv)
    values: Dict[str, Any] = {}
    if args.config:
        values.update(read_yaml(args.config))
    known = fields_of(cls)
    flags = {k: v for k, v in vars(args).items() if k in known and v is not None}
    if "blr" in flags and "lr" not in flags and values.get("lr") is not None:
        # an absolute lr in the YAML would silently win over the base lr asked for here
        logger.info("--blr %s given: the YAML's lr %s is dropped", flags["blr"], values["lr"])
        values["lr"] = None
    values.update(flags)
    return make_config(cls, values), args


def read_yaml(path: str) -> Dict[str, Any]:
    """A YAML mapping of config values; ``_base_: other.yaml`` (relative) is read first."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path) as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            detail = " ".join(str(e).split())
            raise ConfigError(f"{path} is not valid YAML: {detail}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys, got {type(data).__name__}")
    base = data.pop("_base_", None)
    if base:
        merged = read_yaml(os.path.join(os.path.dirname(os.path.abspath(path)), base))
        merged.update(data)
        data = merged
    return data


def make_config(cls: Type[C], values: Mapping[str, Any]) -> C:
    """``cls(**values)`` with unknown keys rejected and numbers written as text converted."""
    known = fields_of(cls)
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {unknown}; valid keys: {', '.join(sorted(known))}"
        )
    values = dict(values)
    for name, f in known.items():
        v = values.get(name)
        if isinstance(v, (list, tuple)) and len(v) == 1 and "List" in str(f.type):
            values[name] = v[0]  # input_size [224] -> 224
        elif isinstance(v, str) and "List" not in str(f.type):
            values[name] = _parse_number(v, flag_type(f))
    return cls(**values)


def _parse_number(text: str, kind: type) -> Any:
    """'1e-3' as a float (YAML reads exponents without a dot as strings); else the text as is."""
    if kind is str:
        return text
    try:
        value = float(text)
    except ValueError:
        return text  # the checks name it
    return int(value) if kind is int and value.is_integer() else value


def save_config(cfg: TrainConfig, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)


class Checks:
    """Collects every problem of a config, then raises them together."""

    def __init__(self, what: str):
        self.what = what
        self.errors: List[str] = []

    def need(self, ok: bool, message: str) -> None:
        if not ok:
            self.errors.append(message)

    def raise_if_any(self) -> None:
        if self.errors:
            raise ConfigError(f"invalid {self.what} config:\n  - " + "\n  - ".join(self.errors))


def check_types(cfg: C, checks: Checks) -> C:
    """Names each number of the wrong type; returns ``cfg`` with defaults in their place, so that
    the range checks that follow see numbers."""
    fixes = {}
    for name, f in fields_of(type(cfg)).items():
        kind, value = flag_type(f), getattr(cfg, name)
        if "List" in str(f.type) or "Dict" in str(f.type) or value is None:
            continue
        if _is_bool(f):
            checks.need(isinstance(value, bool), f"{name} must be true or false, got {value!r}")
            continue
        if kind is str:  # YAML reads `[a, b]` as a list, `1.10` as 1.1, `2026-12-06` as a date
            if not isinstance(value, str):
                checks.errors.append(
                    f"{name} must be a string, got {value!r} (in YAML, quote it: '...')"
                )
                fixes[name] = f.default
            continue
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not is_number or (kind is int and not isinstance(value, int)):
            checks.errors.append(
                f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}"
            )
            fixes[name] = f.default
    return dataclasses.replace(cfg, **fixes)


def _resume_readable(cfg: TrainConfig) -> Tuple[bool, str]:
    """(whether ``cfg.resume`` can be read, the error if not): a local file, or an http(s) URL
    for an ``eval`` (a training resumes its own state from a file of its run)."""
    from mae_transfer.checkpoint import is_url

    if is_url(cfg.resume):
        return bool(getattr(cfg, "eval", False)), (
            f"resume checkpoint {cfg.resume!r}: a training resumes from a local file (download "
            "it; --finetune, and --eval with --resume, take a URL)"
        )
    return os.path.isfile(cfg.resume), f"resume checkpoint {cfg.resume!r} does not exist"


def check_train_config(cfg: TrainConfig, checks: Checks, check_paths: bool = True) -> None:
    """Range checks of the :class:`TrainConfig` fields (after :func:`check_types`).

    ``check_paths=False`` skips whether files exist (``resume``): a Slurm submission is checked
    on a host that may not mount the cluster's storage; each task checks them when it starts.
    """
    need = checks.need
    for name in ("batch_size", "accum_iter", "epochs", "save_every_epochs", "log_every_iters"):
        value = getattr(cfg, name)
        need(isinstance(value, int) and value >= 1, f"{name} must be an int >= 1, got {value!r}")
    for name in ("num_workers", "save_every_iters"):
        value = getattr(cfg, name)
        need(isinstance(value, int) and value >= 0, f"{name} must be an int >= 0, got {value!r}")
    need(
        0 <= cfg.warmup_epochs <= cfg.epochs,
        f"warmup_epochs must be in [0, epochs={cfg.epochs}], got {cfg.warmup_epochs}",
    )
    need(cfg.blr > 0, f"blr must be > 0, got {cfg.blr}")
    need(cfg.lr is None or cfg.lr > 0, f"lr must be > 0 (or unset to use blr), got {cfg.lr}")
    need(cfg.min_lr >= 0, f"min_lr must be >= 0, got {cfg.min_lr}")
    need(
        cfg.lr is None or not cfg.lr >= 0 or cfg.min_lr <= cfg.lr,
        f"min_lr {cfg.min_lr} is above lr {cfg.lr}: the cosine schedule would rise",
    )
    need(cfg.weight_decay >= 0, f"weight_decay must be >= 0, got {cfg.weight_decay}")
    need(cfg.clip_grad is None or cfg.clip_grad > 0, f"clip_grad must be > 0, got {cfg.clip_grad}")
    need(cfg.amp in AMP_MODES, f"amp must be one of {AMP_MODES}, got {cfg.amp!r}")
    need(
        cfg.device in ("auto", "cpu") or cfg.device.startswith("cuda"),
        f"device must be auto, cpu, cuda or cuda:N, got {cfg.device!r}",
    )
    if check_paths and cfg.resume:
        need(*_resume_readable(cfg))
    need(
        bool(cfg.output_dir) and isinstance(cfg.output_dir, str),
        f"output_dir must name a folder, got {cfg.output_dir!r}",
    )
    for key in ("output_dir", "log_dir"):
        folder = getattr(cfg, key)
        blocked = file_in_the_way(folder) if isinstance(folder, str) and folder else None
        need(
            blocked is None,
            f"{key} {folder!r} is a file, not a directory"
            if blocked == os.path.abspath(folder or ".")
            else f"{key} {folder!r} cannot be made: {blocked} is a file",
        )
    if check_paths and isinstance(cfg.device, str) and cfg.device.startswith("cuda"):
        import torch  # on the host that trains (a Slurm submission host may have no GPU)

        need(
            torch.cuda.is_available(),
            f"device {cfg.device!r}: CUDA is not available here (use --device cpu or auto)",
        )


def file_in_the_way(folder: str) -> Optional[str]:
    """The file that keeps ``folder`` from being a folder (``folder`` itself, or the first
    existing part of its path when that is a file); None when it is or can be made one."""
    path = os.path.abspath(folder)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent
    return None if os.path.isdir(path) else path


def check_model_fields(
    cfg: TrainConfig, checks: Checks, build: Optional[Callable[[Tuple[int, int]], Any]] = None
) -> Any:
    """The ``model`` (a registered name), ``model_kwargs`` and ``input_size`` fields that every
    protocol's config has. The model is built on the meta device (no memory, no weights) as the
    trainer will build it, ``build((H, W))`` (default: the registered model with
    ``model_kwargs``), so that a misspelt argument or a width that the heads do not divide is
    named now, not once training has started. Returns that model (None if it could not be
    built), for the protocol's own checks."""
    import torch

    from mae_transfer.registry import create_model, resolve_name

    errors = len(checks.errors)
    try:
        resolve_name(cfg.model)
    except KeyError as e:
        checks.errors.append(str(e))
    checks.need(
        isinstance(cfg.model_kwargs, dict),
        f"model_kwargs must be a mapping, got {cfg.model_kwargs!r}",
    )
    sizes = cfg.input_size if isinstance(cfg.input_size, (list, tuple)) else [cfg.input_size]
    checks.need(
        len(sizes) in (1, 2) and all(isinstance(s, int) and s > 0 for s in sizes),
        f"input_size must be a positive int or [H, W], got {cfg.input_size!r}",
    )
    if len(checks.errors) > errors:
        return
    if build is None:

        def build(img_size):
            return create_model(cfg.model, img_size=img_size, **cfg.model_kwargs)

    try:
        with torch.device("meta"):
            return build((sizes[0], sizes[-1]))
    except Exception as e:  # noqa: BLE001 - the model's own complaint, named
        checks.errors.append(
            f"model {cfg.model} cannot be built with model_kwargs {cfg.model_kwargs}: "
            f"{type(e).__name__}: {e}"
        )
    return None
