"""Random-number state and resume bookkeeping of training checkpoints."""

from __future__ import annotations

import logging
import os
from typing import Dict, Optional, Sequence, Tuple

import torch

logger = logging.getLogger(__name__)


def get_rng_state(device: torch.device) -> Dict:
    """The torch CPU generator and the CUDA generator of this process's own device only (a run
    resumed with fewer visible GPUs, or with one GPU per task, can restore it).

    Python's and NumPy's global generators are not part of it: what draws from them (timm's
    transforms, mixup) runs under :func:`mae_transfer.data.seeded`, from per-sample seeds.
    """
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: Dict, device: torch.device) -> None:
    """Inverse of :func:`get_rng_state`; also reads the older per-device list of CUDA states."""
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is None or device.type != "cuda":
        return
    if isinstance(cuda, (list, tuple)):  # checkpoints that saved every device's state
        index = device.index if device.index is not None else torch.cuda.current_device()
        cuda = cuda[index] if index < len(cuda) else None
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


def checkpoint_progress(path: str, fmt: str) -> Tuple[int, int]:
    """(epoch, samples into it) a checkpoint resumes at, read without loading its tensors.

    Ours record both; an official MAE ``checkpoint-N.pth`` (no format key) resumes at N + 1.
    """
    from mae_transfer.checkpoint import load_file

    ckpt = load_file(path, mmap=True)  # no tensor is read; dropped right after
    if not isinstance(ckpt, dict) or "epoch" not in ckpt:
        return (-1, 0)  # weights only: any training checkpoint is newer
    if ckpt.get("format") != fmt:
        return (int(ckpt["epoch"]) + 1, 0)
    samples = ckpt.get("samples_in_epoch", int(ckpt.get("iter", 0)) * ckpt.get("global_batch", 1))
    return (int(ckpt["epoch"]), int(samples))


def newest_checkpoint(paths: Sequence[str], fmt: str) -> Optional[str]:
    """The existing file among ``paths`` that resumes furthest into training (first on ties)."""
    found = [p for p in dict.fromkeys(paths) if p and os.path.isfile(p)]
    if not found:
        return None
    best = max(found, key=lambda p: checkpoint_progress(p, fmt))  # max keeps the first of ties
    if len(found) > 1:
        logger.info(
            "resume: %s is the furthest along of %s",
            best,
            ", ".join(f"{p} (epoch, samples {checkpoint_progress(p, fmt)})" for p in found),
        )
    return best
