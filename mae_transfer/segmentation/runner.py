"""Config preparation and the mmengine Runner for tools/train_seg.py and tools/test_seg.py."""

from __future__ import annotations

import os
from typing import Any, Dict, Optional

import torch
from mmengine.config import Config
from mmengine.logging import print_log
from mmengine.runner import Runner


def _replace_sync_bn(node: Any) -> Any:
    """SyncBN -> BN everywhere in a config (a single CPU process has nothing to sync with)."""
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


def build_cfg(
    config: str,
    options: Optional[Dict] = None,
    work_dir: Optional[str] = None,
    launcher: str = "none",
    amp: bool = False,
    for_training: bool = True,
) -> Config:
    """Reads ``config``, applies overrides and the device rules; checks values before running.

    ``for_training=False`` (testing a trained checkpoint) drops the backbone's pretraining file:
    the checkpoint under test holds every weight, so that file need not exist.
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
    cuda = torch.cuda.is_available()
    wrapper = cfg.optim_wrapper
    if amp and cuda:
        wrapper.type = "AmpOptimWrapper"
        if torch.cuda.is_bf16_supported():  # bf16: fp32's range, no loss scaling needed
            wrapper.setdefault("dtype", "bfloat16")
        else:
            wrapper.setdefault("loss_scale", "dynamic")
    elif wrapper.get("type") == "AmpOptimWrapper" and not cuda:
        print_log("AmpOptimWrapper -> OptimWrapper: no CUDA, training in fp32", logger="current")
        wrapper.type = "OptimWrapper"
        wrapper.pop("loss_scale", None)
    if not cuda:
        if launcher == "none":
            _replace_sync_bn(cfg._cfg_dict)
        cfg.setdefault("env_cfg", {}).setdefault("dist_cfg", {})["backend"] = "gloo"
    validate(cfg)
    return cfg


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
    if errors:
        raise ValueError("invalid mmseg config:\n  - " + "\n  - ".join(errors))


def make_runner(cfg: Config) -> Runner:
    return Runner.from_cfg(cfg)
