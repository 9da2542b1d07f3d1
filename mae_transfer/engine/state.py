"""Random-number state and resume bookkeeping of training checkpoints."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
import uuid
from typing import Dict, List, Optional, Sequence, Tuple

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


def newest_checkpoint(
    paths: Sequence[str], fmt: str, damaged_ok: str = ""
) -> Tuple[Optional[str], bool]:
    """The existing file among ``paths`` that resumes furthest into training (first on ties),
    and whether ``damaged_ok`` was passed over.

    ``damaged_ok``: the one of them (output_dir's checkpoint-last.pth, found by auto-resume)
    that may be unreadable: cut short or damaged by the storage (our writes are atomic, the
    storage is not always sound). The readable ``checkpoint-*.pth`` beside it (epoch and best
    copies) then compete with the other paths, and the choice is named in a warning. Any other
    unreadable file is an error, as is a damaged one with nothing readable to stand in.
    """
    from mae_transfer.checkpoint import CheckpointError

    progress, damage = {}, None
    for path in dict.fromkeys(paths):
        if not path or not os.path.isfile(path):
            continue
        try:
            progress[path] = checkpoint_progress(path, fmt)
        except CheckpointError as e:
            if path != damaged_ok:
                raise
            damage = e
    if damage is not None:
        progress.update(_readable_copies(damaged_ok, fmt))
        if not progress:
            raise CheckpointError(
                f"{damage}; no checkpoint-*.pth beside it can be read to resume from. Move "
                f"{damaged_ok} aside to start afresh, or resume a readable copy kept "
                "elsewhere with --resume PATH --no-auto_resume"
            )
    if not progress:
        return None, False
    best = max(progress, key=progress.get)  # max keeps the first of ties
    if len(progress) > 1:
        found = ", ".join(f"{p} (epoch, samples {v})" for p, v in progress.items())
        logger.info("resume: %s is the furthest along of %s", best, found)
    if damage is not None:
        logger.warning(
            "%s cannot be read (%s): resuming from %s instead (the training since then is "
            "done again); the unreadable file is kept as %s",
            damaged_ok,
            damage,
            best,
            damaged_ok + UNREADABLE,
        )
    return best, damage is not None


UNREADABLE = ".unreadable"  # suffix of a checkpoint-last.pth passed over by auto-resume


def _readable_copies(damaged: str, fmt: str) -> Dict[str, Tuple[int, int]]:
    """{path: progress} of the readable checkpoint-*.pth beside ``damaged``."""
    from mae_transfer.checkpoint import CheckpointError

    progress = {}
    for path in checkpoint_files(os.path.dirname(damaged) or "."):
        if path != damaged:
            try:
                progress[path] = checkpoint_progress(path, fmt)
            except CheckpointError:
                logger.warning("%s cannot be read either: passed over", path)
    return progress


def checkpoint_files(folder: str) -> List[str]:
    """The paths of the ``checkpoint-*.pth`` in ``folder`` (last, epoch and best copies),
    sorted; none if it does not exist."""
    if not os.path.isdir(folder):
        return []
    names = sorted(n for n in os.listdir(folder) if n.startswith("checkpoint-"))
    return [os.path.join(folder, n) for n in names if n.endswith(".pth")]


def move_aside(path: str) -> str:
    """Renames ``path`` to ``path.old`` (``.old.1``, ``.old.2``, ... when taken); the new name."""
    aside, n = path + ".old", 1
    while os.path.exists(aside):
        aside, n = f"{path}.old.{n}", n + 1
    os.replace(path, aside)
    return aside


OWNER_FILE = ".run-owner"  # in output_dir: the run writing there (host, pid, start, id)


def _read_owner(output_dir: str) -> Optional[Dict]:
    try:
        with open(os.path.join(output_dir, OWNER_FILE)) as f:
            owner = json.load(f)
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def _process_start(pid: int) -> Optional[str]:
    """The start time of process ``pid`` (field 22 of /proc/<pid>/stat) if it runs and is not
    a zombie; None otherwise (or where /proc cannot tell)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _same_process_alive(owner: Dict) -> bool:
    """Whether the process ``owner`` records still runs: same host, same pid namespace, and
    its pid started at the recorded time (a reused pid, a zombie, another container's pid 1
    do not count)."""
    pid = owner.get("pid")
    if owner.get("host") != socket.gethostname() or not isinstance(pid, int):
        return False
    if pid == os.getpid() or owner.get("pidns") != _pid_namespace():
        return False
    start = _process_start(pid)
    return start is not None and start == owner.get("start")


def refuse_if_in_use(output_dir: str) -> None:
    """A :class:`ConfigError` when a run still alive on this host (another process) writes to
    ``output_dir``; one elsewhere cannot be checked: it stops at its next save
    (:func:`check_owner`)."""
    from .config import ConfigError

    other = _read_owner(output_dir)
    if other and _same_process_alive(other):
        raise ConfigError(
            f"{output_dir} is in use by another run on this host (pid {other['pid']}, started "
            f"{other.get('started')}): give this run another --output_dir, or stop that one (if "
            f"it is not running any more, delete {os.path.join(output_dir, OWNER_FILE)})"
        )


def claim_output_dir(output_dir: str) -> Dict:
    """Makes this process the run writing to ``output_dir`` (rank 0, at the start) and returns
    its record; refused as by :func:`refuse_if_in_use`. A requeued or restarted run takes over
    from its dead predecessor."""
    from mae_transfer.checkpoint import write_text_atomic

    refuse_if_in_use(output_dir)
    owner = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pidns": _pid_namespace(),
        "start": _process_start(os.getpid()),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "id": uuid.uuid4().hex,
    }
    os.makedirs(output_dir, exist_ok=True)
    write_text_atomic(json.dumps(owner) + "\n", os.path.join(output_dir, OWNER_FILE))
    return owner


def owns_output_dir(output_dir: str, owner: Dict) -> bool:
    """False when another run has claimed ``output_dir`` since this one did (two runs given
    one output_dir); True without a claim of its own (not rank 0)."""
    if not owner:
        return True
    current = _read_owner(output_dir)
    return current is None or current.get("id") == owner.get("id")


def takeover_message(output_dir: str) -> str:
    """Why a run stops when another has claimed its ``output_dir``, naming that run."""
    current = _read_owner(output_dir)
    who = (
        f" (host {current.get('host')}, pid {current.get('pid')}, started {current.get('started')})"
        if current
        else ""
    )
    return (
        f"another run took over {output_dir}{who}: this run stops so as not to write into its "
        "files; give each run its own --output_dir"
    )


def check_owner(output_dir: str, owner: Dict) -> None:
    """Raises RuntimeError when another run has claimed ``output_dir`` since this one did:
    this one stops instead of overwriting its files."""
    if not owns_output_dir(output_dir, owner):
        raise RuntimeError(takeover_message(output_dir))


def release_output_dir(output_dir: str, owner: Dict) -> None:
    """Removes this run's claim on ``output_dir`` (at its end, also after an error), unless
    another run holds it now."""
    current = _read_owner(output_dir)
    if owner and current is not None and current.get("id") == owner.get("id"):
        with contextlib.suppress(OSError):
            os.remove(os.path.join(output_dir, OWNER_FILE))
