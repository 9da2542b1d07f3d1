"""A trained segmentor's checkpoint, loaded whole (testing, drawing) or refused with the reason."""

from __future__ import annotations

import os
from typing import Any, Dict, List, Mapping, Tuple

import torch
import torch.nn as nn

from mae_transfer.checkpoint import (
    ANCHOR_KEY,
    CheckpointError,
    describe_vit,
    find_state_dict,
    is_url,
    load_file,
    mismatch_phrases,
    strip_to_vit,
)


def load_segmentor(model: nn.Module, path: str) -> Dict[str, Any]:
    """Loads a segmentor checkpoint (mmengine's ``iter_N.pth``, or a bare state dict) into
    ``model``, every tensor: backbone, decode head and auxiliary head.

    Returns:
        the checkpoint's ``meta`` (mmengine's: ``dataset_meta``, ``iter``, ...), {} if none.

    Raises:
        CheckpointError: see :func:`read_segmentor` and :func:`check_fits`.
    """
    state, meta = read_segmentor(path)
    check_fits(state, model.state_dict(), path)
    model.load_state_dict(state, strict=True)
    return meta


def read_segmentor(path: str, mmap: bool = False) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """(state dict, meta) of a segmentor checkpoint, read with ``weights_only=True`` (an
    http(s) URL: downloaded into torch hub's cache by :func:`load_file`; a storage backend's
    ``scheme://`` path: through mmengine's ``CheckpointLoader``). ``mmap``: a local file is
    memory-mapped, read only where its tensors are (a check of their shapes reads none).

    Raises:
        CheckpointError: a missing or unreadable file.
    """
    if "://" in path and not is_url(path):  # a storage backend's path: as mmengine reads it
        from mmengine.runner import CheckpointLoader

        try:
            loaded = CheckpointLoader.load_checkpoint(path, map_location="cpu")
        except Exception as e:  # noqa: BLE001 - a download or storage failure, named
            raise CheckpointError(f"cannot read checkpoint {path}: {e}") from e
    elif not (os.path.isfile(path) or is_url(path)):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    else:
        loaded = load_file(path, mmap=mmap)
    state = {_strip_wrapper(k): v for k, v in find_state_dict(loaded).items()}
    meta = loaded.get("meta") if isinstance(loaded, Mapping) else None
    return state, dict(meta) if isinstance(meta, Mapping) else {}


def check_fits(
    state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor], path: str
) -> None:
    """Raises :class:`CheckpointError` unless ``state`` fills a model whose state dict (or
    meta-device state dict) is ``own``: what did not fit, and the likely cause."""
    problems = mismatches(state, own)
    if problems:
        raise CheckpointError(
            f"{path} does not fit the segmentor of this config: {'; '.join(problems)}. "
            + _hint(state, own, path)
        )


def _strip_wrapper(key: str) -> str:
    return key[len("module.") :] if key.startswith("module.") else key  # a DDP-wrapped save


def mismatches(state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor]) -> List[str]:
    """What keeps ``state`` from filling a model whose state dict is ``own``, one phrase per
    kind (missing, other shapes, unexpected), keys grouped by top-level module; [] if it fits."""
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        (k, state[k].shape, own[k].shape)
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    return mismatch_phrases(missing, shapes, unexpected, _groups, total=len(own))


def _groups(keys: List[str]) -> str:
    """'backbone (54), decode_head (30)': keys counted by their top-level module."""
    counts: Dict[str, int] = {}
    for k in keys:
        top = k.split(".")[0]
        counts[top] = counts.get(top, 0) + 1
    return ", ".join(f"{name} ({n})" for name, n in counts.items())


def _hint(state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor], path: str) -> str:
    """The likely cause: a pretraining checkpoint, or a segmentor of another size."""
    vit, prefix = strip_to_vit(state)
    if ANCHOR_KEY in vit and not prefix.startswith("backbone."):
        return (
            "It is a ViT / MAE checkpoint (a backbone only): train a segmentor from it with "
            f"tools/train_seg.py CONFIG --cfg-options model.backbone.pretrained={path}"
        )
    key = "backbone.vit.cls_token"
    if (key in state) != (key in own):
        flag = "True" if key in state else "False"
        return (
            f"It was trained {'with' if key in state else 'without'} the class token: give "
            f"--cfg-options model.backbone.class_token={flag}"
        )
    theirs, mine = describe_vit(vit), describe_vit(strip_to_vit(own)[0])
    sizes = f" (its backbone: {theirs}; this config's: {mine})" if theirs != mine else ""
    return (
        f"Was it trained with another config or other --cfg-options{sizes}? Give the config and "
        "--cfg-options it was trained with (mmengine saves the config in its work_dir)."
    )
