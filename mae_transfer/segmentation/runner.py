"""Config preparation and the mmengine Runner for tools/train_seg.py and tools/test_seg.py.

Bad values, files and folders raise :class:`ConfigError` (a ValueError) naming the key, before
the Runner builds anything; the tools turn it into exit code 2.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from mmengine.config import Config
from mmengine.logging import print_log
from mmengine.runner import Runner

from mae_transfer.checkpoint import is_url
from mae_transfer.data.decode import more_than_8_bits
from mae_transfer.device import resolve_amp
from mae_transfer.engine.config import ConfigError

from .checkpoint import check_fits, read_segmentor
from .hooks import TorchRNGStateHook
from .loading import (
    IGNORE_ORIENTATION,
    image_loader,
    loaded_size,
    stretches_deep_images,
    type_name,
)


def _replace_sync_bn(node: Any) -> Any:
    """SyncBN -> BN everywhere in a config (CPU runs: torch's SyncBatchNorm raises in training
    on any device but a GPU as soon as a process group exists, gloo included)."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "type" and v == "SyncBN" or k == "norm" and v == "SyncBN":
                node[k] = "BN"
            else:
                _replace_sync_bn(v)
    elif isinstance(node, (list, tuple)):
        for v in node:
            _replace_sync_bn(v)
    return node


AMP_MODES = ("auto", "fp32", "bf16", "fp16")


def build_cfg(
    config: str,
    options: Optional[Dict] = None,
    work_dir: Optional[str] = None,
    launcher: str = "none",
    amp: Optional[str] = None,
    for_training: bool = True,
    auto_scale_lr: Optional[bool] = None,
) -> Config:
    """Reads ``config``, applies overrides and the device rules; checks values before running.

    Args:
        amp: precision, overriding the config's ``amp`` key: 'auto' (bf16 where this process's
            GPU or the CPU has native bf16, else fp32; as pretraining), 'fp32', 'bf16' or
            'fp16' (CUDA, dynamic loss scaling). None and no ``amp`` key: the config's
            optim_wrapper as written (fp32 on a machine without CUDA).
        for_training: False (testing a trained checkpoint) drops the backbone's pretraining
            file: the checkpoint under test holds every weight, so that file need not exist.
        auto_scale_lr: overrides ``auto_scale_lr.enable`` (lr x real batch / base batch).
    """
    if not os.path.isfile(config):
        raise ConfigError(f"config file {config!r} does not exist")
    cfg = Config.fromfile(config)
    file_iters = _config_value(cfg, "train_cfg.max_iters")
    if options:
        check_option_types(cfg, options)
        cfg.merge_from_dict(options)
        if for_training and "param_scheduler" not in options:  # (not a schedule of one's own)
            fit_schedule(cfg, file_iters, options)
    backbone = cfg.model.get("backbone", {})
    if not for_training and backbone.get("type") == "MAEViT":
        backbone["pretrained"] = None
        backbone["init_cfg"] = None
    cfg.launcher = launcher
    launcher_env(launcher)  # run under srun / mpirun (named now, not after the data checks)
    cfg.work_dir = (
        work_dir
        or cfg.get("work_dir")
        or os.path.join("work_dirs", os.path.splitext(os.path.basename(config))[0])
    )
    if auto_scale_lr is not None:
        cfg.auto_scale_lr = {**cfg.get("auto_scale_lr", {}), "enable": auto_scale_lr}
    if amp is not None:
        cfg.amp = amp
    cuda = torch.cuda.is_available()
    if cfg.get("amp"):
        set_precision(cfg, cfg.amp, local_device(launcher))
    elif cfg.optim_wrapper.get("type") == "AmpOptimWrapper" and not cuda:
        print_log("AmpOptimWrapper -> OptimWrapper: no CUDA, training in fp32", logger="current")
        cfg.optim_wrapper.type = "OptimWrapper"
        cfg.optim_wrapper.pop("loss_scale", None)
    if not cuda:  # torch's SyncBatchNorm trains only on GPUs, even with gloo peers
        _replace_sync_bn(cfg._cfg_dict)
        cfg.setdefault("env_cfg", {}).setdefault("dist_cfg", {})["backend"] = "gloo"
        if launcher != "none":
            _cpu_model_wrapper(cfg)
    load_images_as_pretraining(cfg)
    add_label_checks(cfg)
    validate(cfg)
    return cfg


# keys whose number may also be given as a word (AmpOptimWrapper's loss_scale='dynamic')
NUMBER_OR_WORD = ("loss_scale",)


def check_option_types(cfg: Config, options: Dict) -> None:
    """Refuses text given for a number or a flag of the config (``train_cfg.max_iters=abc``):
    mmengine keeps it as a string, which failed once the Runner was built ('invalid literal for
    int()'), naming no key."""
    import difflib

    errors = []
    for key, value in options.items():
        parent, _, leaf = key.rpartition(".")
        section = _config_value(cfg, parent) if parent else None
        known = isinstance(section, dict) and (leaf in section or leaf in _arguments_of(section))
        if isinstance(section, dict) and not known and not leaf.isdigit():
            close = difflib.get_close_matches(leaf, [str(k) for k in section])
            print_log(  # (a new key may be meant: said, not refused)
                f"--cfg-options {key}: {parent} has no {leaf!r} in the config"
                + (f" (did you mean {parent}.{close[0]}?)" if close else "")
                + "; it is added, and read only if the code asks for it",
                logger="current",
                level=logging.WARNING,
            )
        old = _config_value(cfg, key)
        if not isinstance(value, str) or old is None or isinstance(old, str):
            continue
        if key.split(".")[-1] in NUMBER_OR_WORD:
            continue
        if isinstance(old, bool):
            errors.append(f"{key} takes True or False, got {value!r}")
        elif isinstance(old, (int, float)):
            errors.append(f"{key} takes a number (the config has {old}), got {value!r}")
    if errors:
        raise ConfigError("invalid --cfg-options:\n  - " + "\n  - ".join(errors))


def _arguments_of(section: Dict) -> set:
    """The argument names a config section's ``type`` takes (a class of mmseg's registries),
    with, for our backbone, those of the ViT it builds (``embed_dim``, ``depth`` ...: overrides
    that shrink it were warned about as unknown keys); empty when the type is not found."""
    import inspect

    from mmseg.registry import DATASETS, MODELS, TRANSFORMS

    kind = section.get("type")
    cls = kind if isinstance(kind, type) else None
    for registry in (MODELS, DATASETS, TRANSFORMS) if isinstance(kind, str) else ():
        cls = cls or registry.get(kind)
    if cls is None:
        return set()
    names = set(inspect.signature(cls.__init__).parameters)
    if cls.__name__ == "MAEViT":
        from mae_transfer.vit import VisionTransformer

        names |= set(inspect.signature(VisionTransformer.__init__).parameters)
    return names - {"self", "args", "kwargs"}


def _config_value(cfg: Config, key: str) -> Any:
    """The config's value at a dotted ``key`` (list items by index, as merge_from_dict takes
    them), None where there is none."""
    node: Any = cfg._cfg_dict
    for part in key.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, (list, tuple)) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def fit_schedule(cfg: Config, file_iters: Any, options: Dict) -> None:
    """Fits the iteration-based schedulers of ``cfg.param_scheduler`` to a ``train_cfg.max_iters``
    changed from the file's ``file_iters`` (``--cfg-options train_cfg.max_iters=100``): one that
    ended there (PolyLR) ends at the new value, logged, unless ``options`` set its end; one that
    ends beyond the new value (a warmup longer than the run) is warned about. The decay kept the
    full run's end, so a shortened run stopped before its lr had come down."""
    iters = _config_value(cfg, "train_cfg.max_iters")
    if not all(type(n) is int for n in (iters, file_iters)) or iters == file_iters:
        return
    schedulers = cfg.get("param_scheduler") or []
    single = isinstance(schedulers, dict)
    for i, sched in enumerate([schedulers] if single else schedulers):
        if not isinstance(sched, dict) or sched.get("by_epoch", True):  # mmengine's default
            continue
        key = "param_scheduler" if single else f"param_scheduler.{i}"
        name = f"{key} {sched.get('type')}"
        begin, end = sched.get("begin", 0), sched.get("end")
        if end == file_iters and begin < iters and f"{key}.end" not in options:
            sched["end"] = iters
            print_log(
                f"{name}: end {end} -> {iters}, following train_cfg.max_iters (the config's "
                f"{file_iters} -> {iters})",
                logger="current",
            )
        elif isinstance(end, int) and end > iters:
            if begin >= iters:
                what, fix = "never acts", f"{key}.begin=N {key}.end=M"
            else:
                what, fix = "is cut short, its lr change left unfinished", f"{key}.end=N"
            print_log(
                f"{name} runs over iterations {begin}-{end}, beyond train_cfg.max_iters {iters}: "
                f"it {what}; fit it, e.g. --cfg-options {fix}",
                logger="current",
                level=logging.WARNING,
            )


def add_label_checks(cfg: Config) -> None:
    """:class:`CheckSegLabels` after each ``LoadAnnotations`` of the data sets' pipelines
    (once: a config mmengine saved has them), for the decode head's classes: added here, so
    that configs on mmseg's own pipelines (the ADE20K recipe) and users' configs get it."""
    head = cfg.model.get("decode_head")
    if not isinstance(head, dict) or not head.get("num_classes"):
        return
    check = dict(
        type="CheckSegLabels",
        num_classes=head["num_classes"],
        ignore_index=head.get("ignore_index", 255),
    )
    for pipeline in _dataset_pipelines(cfg):
        names = [type_name(t) for t in pipeline] + [None]
        for i in reversed(range(len(pipeline))):
            if names[i] == "LoadAnnotations" and names[i + 1] != "CheckSegLabels":
                pipeline.insert(i + 1, dict(check))


def load_images_as_pretraining(cfg: Config) -> None:
    """:class:`LoadImageAnyDepth` in place of each ``LoadImageFromFile`` (the same arguments)
    of the data sets' pipelines and of ``train_pipeline`` / ``test_pipeline`` (inference reads
    the latter): images of more than 8 bits per value then train and predict stretched to
    0..255 as pretraining saw them, not cut to their high byte; other images load as before."""
    pipelines = list(_dataset_pipelines(cfg))
    pipelines += [cfg.get(key) or [] for key in ("train_pipeline", "test_pipeline")]
    for t in (t for pipeline in pipelines for t in pipeline):
        if type_name(t) == "LoadImageFromFile":
            t["type"] = "LoadImageAnyDepth"


def _dataset_pipelines(cfg: Config):
    """The pipeline (a list, changed in place) of every data set of the three data loaders."""
    for loader in ("train_dataloader", "val_dataloader", "test_dataloader"):
        for node, _ in dataset_configs((cfg.get(loader) or {}).get("dataset") or {}, loader):
            if isinstance(node.get("pipeline"), list):
                yield node["pipeline"]


def dataset_configs(ds: Dict, key: str):
    """(config, key) of each data set in ``ds``, through ConcatDataset's ``datasets`` and
    wrappers' ``dataset``: the inner ones first, then ``ds`` itself."""
    for i, inner in enumerate(ds.get("datasets") or []):
        yield from dataset_configs(inner, f"{key}.datasets.{i}")
    if ds.get("dataset"):
        yield from dataset_configs(ds["dataset"], f"{key}.dataset")
    yield ds, key


def _is_wrapper(ds: Dict) -> bool:
    return "datasets" in ds or "dataset" in ds


def _cpu_model_wrapper(cfg: Config) -> None:
    """mmengine's DDP wrapper as it builds it by default, but with no ``device_ids``: mmengine
    passes ``[LOCAL_RANK]``, which torch refuses for a model on the CPU."""
    wrapper = cfg.get("model_wrapper_cfg") or dict(
        type="MMDistributedDataParallel",
        broadcast_buffers=False,
        find_unused_parameters=cfg.get("find_unused_parameters", False),
    )
    wrapper.setdefault("device_ids", None)
    cfg.model_wrapper_cfg = wrapper


LAUNCHERS = ("none", "pytorch", "slurm", "mpi")


def add_launcher_args(p: argparse.ArgumentParser) -> None:
    """``--launcher`` (mmengine's) and ``--local-rank`` (passed by the deprecated
    ``torch.distributed.launch``; torchrun sets LOCAL_RANK instead)."""
    p.add_argument("--launcher", choices=LAUNCHERS, default="none")
    p.add_argument("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)


def export_local_rank(args: argparse.Namespace) -> None:
    """Sets LOCAL_RANK, which mmengine's DDP wrapper reads for ``device_ids``: under
    ``--launcher mpi`` from Open MPI's local rank (mmengine's MPI set-up selects that GPU but
    exports nothing: every rank built DDP for GPU 0, or failed on a missing LOCAL_RANK), else
    from ``--local-rank`` when the launcher gave only the flag."""
    if args.launcher == "mpi" and "OMPI_COMM_WORLD_LOCAL_RANK" in os.environ:
        os.environ["LOCAL_RANK"] = os.environ["OMPI_COMM_WORLD_LOCAL_RANK"]
    else:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))


def local_device(launcher: str = "none") -> torch.device:
    """This process's device before mmengine sets it (as mmengine's launchers will choose it:
    LOCAL_RANK, SLURM_LOCALID, the Open MPI local rank), so that every rank looks at its own GPU
    instead of GPU 0."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    env = os.environ
    if launcher == "slurm":
        local = env.get("SLURM_LOCALID", env.get("SLURM_PROCID", "0"))
    elif launcher == "mpi":
        local = env.get("OMPI_COMM_WORLD_LOCAL_RANK", "0")
    else:
        local = env.get("LOCAL_RANK", "0")
    return torch.device("cuda", int(local) % torch.cuda.device_count())


def set_precision(cfg: Config, mode: str, device: torch.device) -> None:
    """The optim_wrapper for precision ``mode`` on ``device`` (see :func:`build_cfg`):
    fp32 -> OptimWrapper; bf16 -> AutocastOptimWrapper (no loss scaling, GPU or CPU);
    fp16 -> AmpOptimWrapper with dynamic loss scaling (CUDA only, as in mmengine)."""
    if mode not in AMP_MODES:
        raise ConfigError(f"amp (--amp or the config's amp) must be one of {AMP_MODES}: {mode!r}")
    dtype, _ = resolve_amp(mode, device)
    wrapper = cfg.optim_wrapper
    for key in ("loss_scale", "dtype"):
        wrapper.pop(key, None)
    if dtype is None:
        wrapper.type = "OptimWrapper"
    elif dtype == torch.bfloat16:
        wrapper.update(type="AutocastOptimWrapper", dtype="bfloat16")
    elif device.type != "cuda":
        raise ConfigError(
            f"amp fp16 needs CUDA (mmengine's AmpOptimWrapper), not {device.type}; "
            "use --amp bf16 or fp32"
        )
    else:
        wrapper.update(type="AmpOptimWrapper", dtype="float16", loss_scale="dynamic")
    print_log(f"precision {mode}: {wrapper.type} {wrapper.get('dtype', 'fp32')}", logger="current")


def validate(cfg: Config) -> None:
    """Rejects bad values with the key that holds them, before the Runner builds anything."""
    errors = []
    bb = cfg.model.get("backbone", {})
    if bb.get("type") == "MAEViT":
        from mae_transfer.pyramid import NORMS
        from mae_transfer.registry import resolve_name
        from mae_transfer.vit import REL_POS_TYPES

        try:
            resolve_name(bb.get("model", "vit_base_patch16"))
        except KeyError as e:
            errors.append(f"model.backbone.model: {e}")
        if bb.get("norm", "SyncBN") not in NORMS:
            errors.append(f"model.backbone.norm must be one of {NORMS}, got {bb.get('norm')!r}")
        if bb.get("rel_pos") not in REL_POS_TYPES:
            errors.append(f"model.backbone.rel_pos must be one of {REL_POS_TYPES}")
        rate = bb.get("drop_path_rate", 0.0)
        if not 0 <= rate < 1:
            errors.append(f"model.backbone.drop_path_rate must be in [0, 1), got {rate}")
        pre = bb.get("pretrained")
        if pre and not (os.path.isfile(pre) or is_url(pre)):
            errors.append(f"model.backbone.pretrained: file not found: {pre}")
        neck = (cfg.model.get("neck") or {}).get("type")
        if neck is not None and type_name({"type": neck}) == "Feature2Pyramid":
            errors.append(  # it built and trained, on maps at strides 1, 4, 16 and 64
                "model.neck Feature2Pyramid rescales the maps MAEViT already made at strides "
                "4-32 (to 1-64): drop the neck (--cfg-options model.neck=None)"
            )
    decay = cfg.optim_wrapper.get("paramwise_cfg", {}).get("layer_decay_rate", 1.0)
    if not 0 < decay <= 1:
        errors.append(
            f"optim_wrapper.paramwise_cfg.layer_decay_rate must be in (0, 1], got {decay}"
        )
    lr = cfg.optim_wrapper.get("optimizer", {}).get("lr", 1.0)
    if lr <= 0:
        errors.append(f"optim_wrapper.optimizer.lr must be > 0, got {lr}")
    scale = cfg.get("auto_scale_lr") or {}
    if scale.get("enable") and not scale.get("base_batch_size", 0) > 0:
        errors.append(
            "auto_scale_lr.base_batch_size (the total batch the lr is set for, e.g. 16) is "
            f"needed with auto_scale_lr.enable, got {scale.get('base_batch_size')!r}"
        )
    for key in ("train_cfg.val_interval", "train_cfg.max_iters", "train_dataloader.batch_size"):
        value = _config_value(cfg, key)
        if isinstance(value, int) and value <= 0:
            errors.append(f"{key} must be > 0, got {value}")
    for loader in ("train_dataloader", "val_dataloader", "test_dataloader"):
        dataset = (cfg.get(loader) or {}).get("dataset") or {}
        errors += _reduce_zero_label_mismatch(dataset, f"{loader}.dataset")
    if errors:
        raise ConfigError("invalid mmseg config:\n  - " + "\n  - ".join(errors))
    check_model_builds(cfg)


def _reduce_zero_label_mismatch(ds: Dict, key: str) -> List[str]:
    """A data set's reduce_zero_label against its pipeline's LoadAnnotations (mmseg asserts
    they agree when the first sample loads, after the Runner is built): setting the data set's
    alone, as for labels counted from 0, left the pipeline's True from the base config."""
    out = []
    for node, where in dataset_configs(ds, key):
        want = node.get("reduce_zero_label")
        for j, step in enumerate(node.get("pipeline") or []):
            got = step.get("reduce_zero_label") if isinstance(step, dict) else None
            if type_name(step) == "LoadAnnotations" and None not in (want, got) and got != want:
                out.append(
                    f"{where}.reduce_zero_label is {want} but {where}.pipeline.{j} "
                    f"(LoadAnnotations) has reduce_zero_label={got}: set both (or leave the "
                    "pipeline's unset)"
                )
    return out


def check_model_builds(cfg: Config) -> None:
    """Builds ``cfg.model`` on the meta device (no memory, no weights read): what only the
    model knows (a misspelt keyword such as ``model.backbone.embeddim``, out_indices beyond
    the depth) is named now, with the key's section; it was a traceback once the Runner had
    built the data."""
    import difflib
    import re

    try:
        model_state_shapes(cfg)
    except (TypeError, ValueError, KeyError, AssertionError) as e:
        reason = str(e) or type(e).__name__
        hint = ""
        unknown = re.search(r"unexpected keyword argument '(\w+)'", reason)
        if unknown:
            names = set()
            for part in ("backbone", "decode_head", "auxiliary_head", "neck"):
                section = cfg.model.get(part)
                names |= set(section) if isinstance(section, dict) else set()
            names.discard(unknown.group(1))  # (the misspelt key is in the config now)
            close = difflib.get_close_matches(unknown.group(1), sorted(names) + KNOWN_KWARGS)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"model ({cfg.model.get('type')}): {reason}{hint}") from e


# keyword arguments the backbone takes besides those in the configs (for the did-you-mean hint)
KNOWN_KWARGS = ["embed_dim", "depth", "num_heads", "mlp_ratio", "patch_size", "qkv_bias"]


def parse_cfg_options(pairs: Sequence[str]) -> Dict:
    """``--cfg-options key=value ...`` (mmengine's syntax: lists, tuples, nesting) as a dict."""
    from mmengine.config import DictAction

    bad = [p for p in pairs if "=" not in p]
    if bad:
        raise ConfigError(f"--cfg-options takes key=value pairs, got {bad}")
    ns = argparse.Namespace()
    DictAction(["--cfg-options"], "options")(None, ns, list(pairs))
    return ns.options


def check_data(cfg: Config, for_training: bool = True) -> None:
    """The folders and files the run's data sets read exist, and pair up (on a sample, from
    the headers: sizes, single-channel labels): training reads the train (and, with a val
    loop, the val) data set, testing the test one. mmengine would find out only after building
    the model, with a traceback. Label values are checked as they load (CheckSegLabels)."""
    loaders = ["test_dataloader"]
    if for_training:
        loaders = ["train_dataloader"]
        if cfg.get("val_cfg") and cfg.get("val_evaluator"):
            loaders.append("val_dataloader")
    errors = []
    for loader in loaders:
        if not cfg.get(loader):
            errors.append(f"{loader} is not set")
        else:
            errors += _missing_data(cfg[loader].get("dataset", {}), f"{loader}.dataset")
    if errors:
        raise ConfigError("bad data:\n  - " + "\n  - ".join(errors))


def _missing_data(ds: Dict, key: str) -> List[str]:
    """What of a dataset config's root, image / label folders and annotation file does not
    exist, through ConcatDataset's ``datasets`` and wrappers' ``dataset``."""
    if _is_wrapper(ds):  # the data sets it holds, at any depth
        parts = dataset_configs(ds, key)
        return [e for d, k in parts if not _is_wrapper(d) for e in _missing_data(d, k)]
    root = ds.get("data_root") or ""
    if root and not _exists(root):
        return [f"{key}.data_root: {root} does not exist"]
    paths = [
        (f"data_prefix.{name}", os.path.join(root, sub))
        for name, sub in (ds.get("data_prefix") or {}).items()
        if sub and name in ("img_path", "seg_map_path")
    ]
    if ds.get("ann_file"):
        paths.append(("ann_file", os.path.join(root, ds["ann_file"])))
    missing = [f"{key}.{name}: {path} does not exist" for name, path in paths if not _exists(path)]
    return missing or _unpaired_data(ds, key, dict(paths))


PAIR_SAMPLE = 32  # image / label pairs whose sizes are compared (headers only)


def _suffix(ds: Dict, name: str) -> str:
    """The dataset config's ``img_suffix`` / ``seg_map_suffix``, or its class's default."""
    if ds.get(name):
        return ds[name]
    try:
        import inspect

        from mmseg.registry import DATASETS

        cls = DATASETS.get(ds.get("type", "BaseSegDataset"))
        default = inspect.signature(cls.__init__).parameters[name].default
        return default if isinstance(default, str) else ""
    except (KeyError, TypeError, ValueError, AttributeError, ImportError):
        return ""


def _unpaired_data(ds: Dict, key: str, paths: Dict[str, str]) -> List[str]:
    """Local image / label folders listed the way mmseg lists them (by suffix): no image of
    ``img_suffix`` (mmseg fails with 'need at least one array to concatenate'), images
    without a label, and, on a sample, an image whose label has another size (training runs
    on misaligned labels; evaluation dies with a shape error naming no file)."""
    img_dir, seg_dir = paths.get("data_prefix.img_path"), paths.get("data_prefix.seg_map_path")
    ann_file = paths.get("ann_file")
    if not img_dir or "://" in img_dir or not os.path.isdir(img_dir) or "://" in (ann_file or ""):
        return []
    img_suffix, seg_suffix = _suffix(ds, "img_suffix"), _suffix(ds, "seg_map_suffix")
    if not img_suffix or not seg_suffix:  # a dataset class we cannot read the defaults of
        return []
    if ann_file:
        images = _listed_images(ann_file, img_suffix)
        absent = [i for i in images if not os.path.isfile(os.path.join(img_dir, i))]
        if absent:  # (mmseg: a FileNotFoundError when training drew it)
            return [
                f"{key}: {len(absent)} of the {len(images)} images {ann_file} lists are not in "
                f"{img_dir} (e.g. {absent[0]}): each line is an image's name without "
                f"{key}.img_suffix '{img_suffix}'"
            ]
    else:
        images = sorted(
            os.path.relpath(os.path.join(d, f), img_dir)
            for d, _, files in os.walk(img_dir)
            for f in files
            if f.endswith(img_suffix) and not f.startswith(".")
        )
    if not images and ann_file:
        return [f"{key}: {ann_file} lists no images"]
    if not images:
        kinds = sorted({os.path.splitext(f)[1] for _, _, fs in os.walk(img_dir) for f in fs})
        return [
            f"{key}: no '{img_suffix}' images in {img_dir} (found: {', '.join(kinds) or 'none'});"
            f" set {key}.img_suffix"
        ]
    if not seg_dir or "://" in seg_dir or not os.path.isdir(seg_dir):
        return []
    labels = [os.path.join(seg_dir, i[: len(i) - len(img_suffix)] + seg_suffix) for i in images]
    unpaired = [i for i, lab in zip(images, labels) if not os.path.isfile(lab)]
    if unpaired:
        return [
            f"{key}: {len(unpaired)} of {len(images)} images have no label "
            f"'<name>{seg_suffix}' in {seg_dir} (e.g. {unpaired[0]}); set "
            f"{key}.seg_map_suffix if the labels end otherwise"
        ]
    step = max(1, len(images) // PAIR_SAMPLE)
    pairs = [(images[i], labels[i]) for i in range(0, len(images), step)]
    return _misfit_pairs(pairs, img_dir, image_loader(ds.get("pipeline")), key)


def _listed_images(ann_file: str, img_suffix: str) -> List[str]:
    """The image files an ``ann_file`` names as mmseg's BaseSegDataset reads it: each line,
    stripped, plus ``img_suffix``."""
    with open(ann_file) as f:
        return [line.strip() + img_suffix for line in f.read().splitlines()]


def _misfit_pairs(pairs: List[tuple], img_dir: str, loader: Dict, key: str) -> List[str]:
    """A sample of (image, label) pairs as the pipelines will load them: a label of another
    size than its image as ``loader`` (the pipeline's image loader) loads it, EXIF orientation
    applied as mmcv applies it, is refused naming the pair; the sample's other findings go to
    :func:`_sample_errors`."""
    from PIL import Image

    found: Dict[str, List[str]] = {"turned": [], "coloured": [], "wide": [], "deep": []}
    for image, label in pairs:
        try:
            with Image.open(os.path.join(img_dir, image)) as a, Image.open(label) as b:
                if more_than_8_bits(a):  # (before getexif, which loads a PNG: depth unknown)
                    bits = ", 16 bits" if a.mode[0] == "R" else ""  # (RGB: 16 per channel)
                    found["deep"].append(f"{image} ({a.mode}{bits})")
                (size, was_turned), raw, label_size = loaded_size(a, loader), a.size, b.size
                if len(b.getbands()) > 1:
                    found["coloured"].append(f"{label} ({b.mode})")
                    continue
                top = int(np.asarray(b).max()) if b.mode.startswith("I") else 0  # 16/32-bit
                if top > 255:
                    found["wide"].append(f"{label} ({b.mode}, values up to {top})")
        except OSError:
            continue  # unreadable: mmseg's own loading says so
        if size == label_size:
            continue
        if was_turned and raw == label_size:
            found["turned"].append(image)
            continue
        return [
            f"{key}: image {image} is {size[0]}x{size[1]}"
            + (f" (turned by its EXIF orientation from {raw[0]}x{raw[1]})" if was_turned else "")
            + f" but its label {label} is {label_size[0]}x{label_size[1]}: labels must have "
            "their image's size (checked on a sample)"
        ]
    return _sample_errors(found, len(pairs), loader, key)


def _sample_errors(found: Dict[str, List[str]], n: int, loader: Dict, key: str) -> List[str]:
    """Refuses labels with values above 255 (mmseg keeps their low byte), labels of several
    channels (an RGB rendering: mmseg trains on it until a shape error naming no file) and
    images turned against their labels by their EXIF tag; warns about images of more than 8
    bits that ``loader`` does not stretch as pretraining did."""
    color_type = loader.get("color_type", "color")
    if found["deep"] and not stretches_deep_images(loader):
        print_log(
            f"{key}: {len(found['deep'])} of {n} sampled images have more than 8 bits per "
            f"value (e.g. {', '.join(found['deep'][:3])}), which {type_name(loader)}(color_type="
            f"{color_type!r}) does not stretch to 0..255 as pretraining did: mmcv's "
            "LoadImageFromFile keeps each value's high byte (cv2: a 12-bit scan loads almost "
            "black) or clips them (pillow: almost white), color_type 'unchanged' and the "
            "tifffile backend pass the raw values, which the data preprocessor normalises as "
            "if 0..255. LoadImageAnyDepth with another color_type and backend stretches them",
            logger="current",
            level=logging.WARNING,
        )
    if found["wide"]:
        return [
            f"{key}: {len(found['wide'])} of {n} sampled labels hold values above 255 (e.g. "
            f"{', '.join(found['wide'][:3])}): mmseg's LoadAnnotations keeps the low byte of "
            "each value (class 300 would train as class 44); labels are class indices below "
            "256 (255 the ignore index), in 8-bit PNGs (mode L or P)"
        ]
    if found["coloured"]:
        return [
            f"{key}: {len(found['coloured'])} of {n} sampled labels have several channels "
            f"(e.g. {', '.join(found['coloured'][:3])}): a label is one class index per pixel, "
            "a single-channel PNG (mode L or P); convert colour-coded labels to indices"
        ]
    if found["turned"]:
        return [
            f"{key}: {len(found['turned'])} of {n} sampled images (e.g. "
            f"{', '.join(found['turned'][:3])}) carry an EXIF orientation tag that "
            f"{type_name(loader)} (color_type {color_type!r}) applies, turning them against "
            "their labels, which have the stored size: strip the tag from the images (e.g. "
            "exiftool -Orientation= FILE), or load ignoring it with "
            "color_type='color_ignore_orientation' in LoadImageFromFile of every pipeline: "
            f"--cfg-options {IGNORE_ORIENTATION}"
        ]
    return []


def _exists(path: str) -> bool:
    return "://" in path or os.path.exists(path)  # remote storage (mmengine's backends): unchecked


def model_state_shapes(cfg: Config) -> Dict[str, torch.Tensor]:
    """The state dict of ``cfg.model`` built on the meta device: names and shapes, no memory
    (to check a checkpoint before the Runner builds the model and its data)."""
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS

    init_default_scope(cfg.get("default_scope", "mmseg"))
    with torch.device("meta"):
        return MODELS.build(cfg.model).state_dict()


def init_cpu_dist(cfg: Config) -> None:
    """Under a launcher on a machine without CUDA: the process group on the config's backend
    (gloo, :func:`build_cfg`) from the launcher's environment (:func:`launcher_env`).
    mmengine's ``init_dist`` calls ``torch.cuda.set_device`` whatever the backend ('Found no
    NVIDIA driver'); its ``Runner.setup_env`` skips ``init_dist`` when a process group exists."""
    from mmengine.device import get_device

    if cfg.launcher == "none" or get_device() != "cpu" or torch.distributed.is_initialized():
        return
    os.environ.update(launcher_env(cfg.launcher))
    kwargs = dict(cfg.get("env_cfg", {}).get("dist_cfg", {}))
    backend = kwargs.pop("backend", "gloo")
    if kwargs.get("timeout") is not None:  # seconds, as mmengine's init_dist takes it
        kwargs["timeout"] = datetime.timedelta(seconds=kwargs["timeout"])
    torch.distributed.init_process_group(backend=backend, **kwargs)


# launcher -> (what starts its processes, {torch.distributed's variable: the one it sets},
# its local rank's variable, the other variables it must have set)
LAUNCHER_VARIABLES = {
    "slurm": ("srun", {"RANK": "SLURM_PROCID", "WORLD_SIZE": "SLURM_NTASKS"}, "SLURM_LOCALID",
              ["SLURM_NODELIST"]),
    "mpi": ("mpirun", {"RANK": "OMPI_COMM_WORLD_RANK", "WORLD_SIZE": "OMPI_COMM_WORLD_SIZE"},
            "OMPI_COMM_WORLD_LOCAL_RANK", []),
}  # fmt: skip
# what torchrun sets and torch.distributed's env:// set-up reads (LOCAL_RANK: export_local_rank)
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launcher_env(launcher: str, env=os.environ) -> Dict[str, str]:
    """RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT for ``--launcher slurm`` or
    ``mpi`` from the job's environment, as mmengine's ``init_dist`` sets them: MASTER_PORT
    29500 unless set; the Slurm job's first node as MASTER_ADDR unless set (``scontrol``); an
    Open MPI job must set MASTER_ADDR. Empty for ``pytorch`` (torchrun sets them).

    Raises:
        ConfigError: a variable the launcher sets is missing (not run under srun / mpirun /
            torchrun: ``--launcher pytorch`` without torchrun was a traceback, 'environment
            variable RANK expected, but not set', once the data had been checked).
    """
    if launcher == "pytorch":
        missing = [v for v in TORCHRUN_VARIABLES if v not in env]
        if missing:
            raise ConfigError(
                f"--launcher pytorch needs {', '.join(missing)} in the environment, which "
                "torchrun sets: start the tool with torchrun --nproc_per_node N ..., or leave "
                "--launcher out to run one process"
            )
    if launcher not in LAUNCHER_VARIABLES:
        return {}
    runner, names, local, others = LAUNCHER_VARIABLES[launcher]
    missing = [v for v in [*names.values(), *others] if v not in env]
    if missing:
        raise ConfigError(
            f"--launcher {launcher} needs {', '.join(missing)} in the environment, which "
            f"{runner} sets: run the tool under {runner}, or use torchrun with --launcher pytorch"
        )
    if launcher == "mpi" and "MASTER_ADDR" not in env:
        raise ConfigError(
            "--launcher mpi needs MASTER_ADDR (the address of rank 0's host; mpirun does not "
            "set it): e.g. mpirun -x MASTER_ADDR=$(hostname) ..."
        )
    out = {k: env[v] for k, v in names.items()}
    out["LOCAL_RANK"] = env.get(local, "0")
    out["MASTER_PORT"] = env.get("MASTER_PORT", "29500")
    out["MASTER_ADDR"] = env.get("MASTER_ADDR") or _first_host(env.get("SLURM_NODELIST", ""))
    return out


def _first_host(nodes: str) -> str:
    """The first host of a Slurm node list ('gpu[03-05],cpu1' -> 'gpu03'), by ``scontrol``."""
    import subprocess

    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, check=True
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError) as e:
        if not any(c in nodes for c in "[],"):
            return nodes  # one node: its name
        raise ConfigError(
            f"cannot expand the Slurm node list {nodes!r} with scontrol ({e}): set MASTER_ADDR "
            "to the first node's address"
        ) from e
    return out[0]


class SegRunner(Runner):
    """mmengine's Runner, saying so when ``resume`` finds nothing to resume."""

    def load_or_resume(self) -> None:
        """``resume`` without ``load_from`` in a work dir without mmengine's ``last_checkpoint``
        file: training starts from scratch, as in mmengine (a requeued job's first run also
        passes --resume), but with a warning naming the work dir; mmengine logged 'Auto resumed
        from the latest checkpoint None.' and a mistyped --work-dir went unnoticed."""
        marker = os.path.join(self.work_dir, "last_checkpoint")  # where mmengine looks
        if self._resume and self._load_from is None and not os.path.isfile(marker):
            self.logger.warning(
                f"--resume: no checkpoint to resume in the work dir {self.work_dir} (no "
                "last_checkpoint file): training starts from scratch. Give the --work-dir of "
                "the run to continue if this is not the first run of this job"
            )
            self._resume = False
        super().load_or_resume()

    def resume(self, filename: str, *args, **kwargs) -> None:
        """mmengine's resume, which restores each scheduler from the checkpoint, its ``end``
        included: a config's other end (``train_cfg.max_iters`` raised to train longer) does
        not apply, and a finished schedule trains the added iterations at its last lr (0 for
        PolyLR). Said, naming the scheduler; and so is a checkpoint at or past the config's
        ``train_cfg.max_iters`` (mmengine then trains nothing without a word)."""
        super().resume(filename, *args, **kwargs)
        max_iters = (self.cfg.get("train_cfg") or {}).get("max_iters")
        if max_iters is not None and self.iter >= max_iters:
            self.logger.warning(
                f"--resume: the checkpoint {filename} ends at iteration {self.iter}, "
                f"train_cfg.max_iters is {max_iters}: nothing left to train (raise "
                "train_cfg.max_iters to train on)"
            )
        wanted = self.cfg.get("param_scheduler") or []
        wanted = [wanted] if isinstance(wanted, dict) else wanted
        restored = self.param_schedulers if isinstance(self.param_schedulers, list) else []
        for i, (sched, cfg) in enumerate(zip(restored, wanted)):
            end = cfg.get("end") if isinstance(cfg, dict) else None
            if end is None or getattr(sched, "end", end) == end:
                continue
            self.logger.warning(
                f"param_scheduler.{i} {type(sched).__name__}: resumed with the checkpoint's end "
                f"{sched.end}, not the config's {end} (mmengine restores schedulers): "
                f"iterations past {sched.end} train at the lr it ended at. To train longer "
                "with a schedule of its own, start a new run from the weights (load_from=CKPT, "
                "without --resume)"
            )


def check_resume_fits(cfg: Config) -> None:
    """``cfg.resume``: the work dir's last checkpoint (mmengine's ``last_checkpoint``) must fill
    the config's segmentor, checked on the meta device before the Runner is built. Resumed
    under other --cfg-options (a head's width, num_classes, the backbone's size), mmengine
    warned about each tensor of another shape, then the first step failed in the optimizer
    ('The size of tensor a (64) must match the size of tensor b (32)'), naming no option.

    Raises:
        CheckpointError: what did not fit, and the likely cause.
    """
    marker = os.path.join(cfg.work_dir, "last_checkpoint")
    if not cfg.get("resume") or cfg.get("load_from") or not os.path.isfile(marker):
        return
    with open(marker) as f:
        path = f.read().strip()
    state, _ = read_segmentor(path, mmap=True)  # (mmengine reads the file next: shapes only)
    check_fits(state, model_state_shapes(cfg), path)


def make_runner(cfg: Config) -> Runner:
    init_cpu_dist(cfg)
    runner = SegRunner.from_cfg(cfg)
    if not any(type_name(h) == "TorchRNGStateHook" for h in cfg.get("custom_hooks") or []):
        runner.register_hook(TorchRNGStateHook())
    return runner
