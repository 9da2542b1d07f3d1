"""Random-number state and resume bookkeeping of training checkpoints."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
import uuid
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


OWNER_FILE = ".run-owner"  # in output_dir: the run writing there (host, pid, start, id)


def _read_owner(output_dir: str) -> Optional[Dict]:
    try:
        with open(os.path.join(output_dir, OWNER_FILE)) as f:
            owner = json.load(f)
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by another user
        return True
    return True


def claim_output_dir(output_dir: str) -> Dict:
    """Makes this process the run writing to ``output_dir`` (rank 0, at the start) and returns
    its record. A run still alive on this host (another process) is a :class:`ConfigError`;
    one elsewhere cannot be checked: it stops at its next save (:func:`check_owner`). A
    requeued or restarted run takes over from its dead predecessor."""
    from mae_transfer.checkpoint import write_text_atomic

    from .config import ConfigError

    other = _read_owner(output_dir)
    host = socket.gethostname()
    if (
        other
        and other.get("host") == host
        and other.get("pid") != os.getpid()
        and isinstance(other.get("pid"), int)
        and _alive(other["pid"])
    ):
        raise ConfigError(
            f"{output_dir} is in use by another run on this host (pid {other['pid']}, started "
            f"{other.get('started')}): give this run another --output_dir, or stop that one (if "
            f"it is not running any more, delete {os.path.join(output_dir, OWNER_FILE)})"
        )
    owner = {
        "host": host,
        "pid": os.getpid(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "id": uuid.uuid4().hex,
    }
    os.makedirs(output_dir, exist_ok=True)
    write_text_atomic(json.dumps(owner) + "\n", os.path.join(output_dir, OWNER_FILE))
    return owner


def check_owner(output_dir: str, owner: Dict) -> None:
    """Raises RuntimeError when another run has claimed ``output_dir`` since this one did
    (two runs given one output_dir): this one stops instead of overwriting its files."""
    current = _read_owner(output_dir)
    if current is not None and current.get("id") != owner.get("id"):
        raise RuntimeError(
            f"another run took over {output_dir} (host {current.get('host')}, pid "
            f"{current.get('pid')}, started {current.get('started')}): this run stops so as not "
            "to overwrite its files; give each run its own --output_dir"
        )


def release_output_dir(output_dir: str, owner: Dict) -> None:
    """Removes this run's claim on ``output_dir`` (at its end, also after an error), unless
    another run holds it now."""
    current = _read_owner(output_dir)
    if owner and current is not None and current.get("id") == owner.get("id"):
        with contextlib.suppress(OSError):
            os.remove(os.path.join(output_dir, OWNER_FILE))
