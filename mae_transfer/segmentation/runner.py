"""Config preparation and the mmengine Runner for tools/train_seg.py and tools/test_seg.py."""

from __future__ import annotations

import os
from typing import Any, Dict, Optional

import torch
from mmengine.config import Config
from mmengine.logging import print_log
from mmengine.runner import Runner

from mae_transfer.device import resolve_amp


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
    cfg = Config.fromfile(config)
    if options:
        cfg.merge_from_dict(options)
    backbone = cfg.model.get("backbone", {})
    if not for_training and backbone.get("type") == "MAEViT":
        backbone["pretrained"] = None
        backbone["init_cfg"] = None
    cfg.launcher = launcher
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
    validate(cfg)
    return cfg


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
        raise ValueError(f"amp (--amp or the config's amp) must be one of {AMP_MODES}: {mode!r}")
    dtype, _ = resolve_amp(mode, device)
    wrapper = cfg.optim_wrapper
    for key in ("loss_scale", "dtype"):
        wrapper.pop(key, None)
    if dtype is None:
        wrapper.type = "OptimWrapper"
    elif dtype == torch.bfloat16:
        wrapper.update(type="AutocastOptimWrapper", dtype="bfloat16")
    elif device.type != "cuda":
        raise ValueError(
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
        if pre and not os.path.isfile(pre):
            errors.append(f"model.backbone.pretrained: file not found: {pre}")
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
    if errors:
        raise ValueError("invalid mmseg config:\n  - " + "\n  - ".join(errors))


def make_runner(cfg: Config) -> Runner:
    return Runner.from_cfg(cfg)
