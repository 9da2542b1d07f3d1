"""Process-group set-up for one process, torchrun (multi-node included) and Slurm."""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import List, Sequence

import torch
import torch.distributed as dist

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


def init_distributed(device_type: str, dist_url: str = "env://") -> DistInfo:
    """Joins the process group when launched by torchrun / srun; a no-op for one process.

    torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT. Under Slurm without torchrun,
    SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS are used (MASTER_ADDR must be set, as
    pretrain/submit.py does). The backend is nccl for CUDA and gloo for CPU.
    """
    world = _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)
    if world <= 1:
        return DistInfo()
    info = DistInfo(
        rank=_env_int("RANK", "SLURM_PROCID", default=0),
        local_rank=_env_int("LOCAL_RANK", "SLURM_LOCALID", default=0),
        world_size=world,
    )
    os.environ.setdefault("RANK", str(info.rank))
    os.environ.setdefault("WORLD_SIZE", str(world))
    if device_type == "cuda":
        torch.cuda.set_device(info.local_rank)
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


def all_reduce_sum(values: Sequence[float], info: DistInfo) -> List[float]:
    """Sums a few Python numbers over all processes (returns them as is for one process)."""
    if not info.enabled:
        return [float(v) for v in values]
    t = torch.tensor(list(values), dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return t.cpu().tolist()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
