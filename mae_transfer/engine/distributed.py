"""Process-group set-up for one process, torchrun (multi-node included) and Slurm, and the few
collectives the training loops need."""

from __future__ import annotations

import datetime
import logging
import os
import pickle
from dataclasses import dataclass
from typing import Any, Callable, List, Sequence, Tuple

import torch
import torch.distributed as dist

from .config import ConfigError

logger = logging.getLogger(__name__)


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(*names: str, default: int) -> int:
    for name in names:
        if name in os.environ:
            return int(os.environ[name])
    return default


def local_cuda_index(local_rank: int) -> int:
    """The CUDA device of a process: its local rank modulo the devices it can see.

    With one GPU bound per task (Slurm ``--gpus-per-task=1``, ``CUDA_VISIBLE_DEVICES`` set per
    process) every process sees a single device 0 while its local rank runs 0..7.
    """
    return local_rank % max(torch.cuda.device_count(), 1)


def init_distributed(device_type: str, dist_url: str = "env://") -> DistInfo:
    """Joins the process group when launched by torchrun / srun; a no-op for one process.

    torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT. Under Slurm without torchrun,
    the tasks of an ``srun`` step use SLURM_PROCID / SLURM_LOCALID / SLURM_STEP_NUM_TASKS
    (MASTER_ADDR must be set, as pretrain/submit.py does). SLURM_NTASKS alone is not enough:
    it is also set in an ``sbatch`` script or ``salloc`` shell, where a plain ``python ...``
    is one process and would wait for peers that never start. The backend is nccl for CUDA
    and gloo for CPU.
    """
    world = _env_int("WORLD_SIZE", "SLURM_STEP_NUM_TASKS", default=1)
    if world <= 1:
        return DistInfo()
    info = DistInfo(
        rank=_env_int("RANK", "SLURM_PROCID", default=0),
        local_rank=_env_int("LOCAL_RANK", "SLURM_LOCALID", default=0),
        world_size=world,
    )
    os.environ.setdefault("RANK", str(info.rank))
    os.environ.setdefault("WORLD_SIZE", str(world))
    if device_type == "cuda":  # before NCCL initialises, so that it binds to this device
        torch.cuda.set_device(local_cuda_index(info.local_rank))
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(
        backend,
        init_method=dist_url,
        world_size=world,
        rank=info.rank,
        timeout=datetime.timedelta(minutes=30),
    )
    logger.info("process %d/%d joined (%s)", info.rank, world, backend)
    return info


def own_device(device: torch.device, info: DistInfo) -> torch.device:
    """The device a process runs on: with several processes on CUDA, the GPU that
    :func:`init_distributed` bound it to (an explicit ``cuda:N`` would put them all on GPU N,
    so it is overridden, with a warning); otherwise ``device`` as given. One process on
    ``cuda:N`` makes N the current device: what runs on bare ``"cuda"`` (probes, the
    loader's pin-memory thread, library code) would otherwise open a context and allocate on
    GPU 0, which may be another user's or full."""
    if device.type != "cuda":
        return device
    if not info.enabled:
        if device.index is not None:
            torch.cuda.set_device(device.index)
        return device
    own = torch.device("cuda", torch.cuda.current_device())
    if device.index is not None and device.index != own.index and info.is_main:
        logger.warning(
            "device %s ignored with %d processes: each uses the GPU of its local rank",
            device,
            info.world_size,
        )
    return own


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: Sequence[float], info: DistInfo) -> List[float]:
    """Sums a few numbers (floats or 0-d tensors) over all processes; one host sync."""
    t = torch.stack([torch.as_tensor(v, dtype=torch.float64).detach().cpu() for v in values])
    if info.enabled:
        t = t.to(_collective_device())
        dist.all_reduce(t)
    return t.cpu().tolist()


def all_reduce_min(value: float, info: DistInfo) -> float:
    """The smallest ``value`` over all processes (e.g. "does every rank see this file?")."""
    if not info.enabled:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return float(t.item())


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's ``obj`` on every process (a decision made once, followed by all)."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=_collective_device())
    return box[0]


def all_gather_objects(obj: Any, info: DistInfo) -> List[Any]:
    """Every process's (small) ``obj``, as a list indexed by rank, on every process (one
    all-gather; with NCCL a gather to one rank would open a connection to each)."""
    if not info.enabled:
        return [obj]
    out: List[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def on_rank0(fn: Callable[..., Any], info: DistInfo, *args: Any) -> Any:
    """``fn(*args)`` computed by rank 0 alone, its result on every process; an exception it
    raises is raised on every process (none is left waiting). For listing a data set: 1.28M
    files walked once instead of once per process on a shared filesystem, and every process
    then holds the same list. Every node must see the data under the same path."""
    if not info.enabled:
        return fn(*args)
    result = None
    if info.is_main:
        try:
            result = (True, fn(*args))
        except Exception as e:  # noqa: BLE001 - re-raised on every process below
            result = (False, e)
        try:
            pickle.dumps(result)  # what the broadcast will do: fail here, not on rank 0 alone
        except Exception as e:  # noqa: BLE001
            result = (False, RuntimeError(f"{getattr(fn, '__name__', fn)}: {e!r}"))
    ok, value = broadcast_object(result, info)
    if not ok:
        raise value
    return value


def on_every_rank(fn: Callable[[], Any], info: DistInfo, what: str) -> None:
    """``fn()`` on every process; when it fails on any of them, every process raises a
    :class:`ConfigError` saying so (a collective: none is left waiting for the others)."""
    error = ""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - shared with the other processes, then raised
        error = f"{type(e).__name__}: {e}"
    failed = all_reduce_sum([float(bool(error))], info)[0]
    if failed:
        here = f" (here: {error})" if error else ""
        raise ConfigError(f"{int(failed)} of {info.world_size} processes {what}{here}")


def all_gather_padded(x: torch.Tensor, info: DistInfo) -> Tuple[torch.Tensor, List[int]]:
    """Every process's ``x`` (rows may differ in number) in one tensor, gathered straight into
    it on the collective device (NCCL needs equal sizes: each part is padded with zero rows
    to the longest), and the number of real rows of each part. Rows ``r * longest`` to
    ``r * longest + sizes[r]`` are rank r's."""
    if not info.enabled:
        return x, [x.shape[0]]
    dev = _collective_device()
    n = torch.tensor([x.shape[0]], device=dev)
    counts = [torch.zeros_like(n) for _ in range(info.world_size)]
    dist.all_gather(counts, n)
    sizes = [int(c.item()) for c in counts]
    longest = max(sizes)
    out = x.new_empty((info.world_size * longest, *x.shape[1:]), device=dev)
    if not longest:
        return out, sizes
    padded = x.new_zeros((longest, *x.shape[1:]), device=dev)
    padded[: x.shape[0]] = x
    if dev.type == "cuda":  # NCCL writes into ``out`` (its list form gathers into a copy)
        dist.all_gather_into_tensor(out, padded)
    else:
        dist.all_gather(list(out.split(longest)), padded)
    return out, sizes


def broadcast_buffers(module: torch.nn.Module, info: DistInfo) -> None:
    """Rank 0's buffers (e.g. BatchNorm running statistics) on every process. DDP sends them
    at the start of each training forward, so after a step every rank holds statistics
    updated by its own batch; evaluation and checkpoints must use one set."""
    if info.enabled:
        for b in module.buffers():
            dist.broadcast(b, src=0)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
