"""Resumable, process-count-independent sampling and per-sample seeds.

Every random choice for a sample (crop, flip, RandAugment, erasing, mask noise) is drawn from a
seed made of (run seed, epoch, image index). The stream of batches and augmentations is then
the same whatever the number of processes or loader workers, and a resumed run sees exactly the
batches the uninterrupted one would have.
"""

from __future__ import annotations

import contextlib
import random
from typing import Iterator, List, Tuple

import numpy as np
import torch
from torch.utils.data import Sampler

_INDEX_STRIDE = 10_000_019


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed unique to (run seed, epoch, image index).

    Indices below ~10M (ImageNet-1k, with up to 7 repeats) get a plain arithmetic code, the
    seeds runs have always used. Larger ones (ImageNet-22k, 14.2M images) are hashed: in the
    arithmetic code index 10,000,019 of one epoch would share the seed of index 0 of the next.
    """
    if 0 <= index < _INDEX_STRIDE:
        return ((seed * 1_000_003 + epoch) * _INDEX_STRIDE + index) % (2**63 - 1)
    words = [v % 2**64 for v in (seed, epoch, index)]  # SeedSequence takes non-negative ints
    hi, lo = np.random.SeedSequence(words).generate_state(2, np.uint32)
    return ((int(hi) << 32) | int(lo)) % (2**63 - 1)


@contextlib.contextmanager
def seeded(seed: int):
    """Seeds torch's CPU generator, Python's ``random`` and NumPy's global generator for the
    block, then restores all three: code that draws from global generators (timm's transforms,
    mixup) becomes a pure function of ``seed`` and leaves the caller's streams untouched. The
    GPUs' generators are not touched (``torch.manual_seed`` would reseed them all, and
    dropout / drop path on the GPU would follow this seed)."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class ResumableDistributedSampler(Sampler):
    """Shuffled (epoch, index) keys split across processes, resumable in the middle of an epoch.

    The epoch's permutation depends only on (seed, epoch). Process ``rank`` takes positions
    ``rank, rank + world, ...``, so the union of the processes' first ``i`` batches is the first
    ``i * global batch`` positions of the permutation, whatever the world size: a run can resume
    at a sample count with another number of processes. Only whole global batches are produced.
    """

    def __init__(self, size: int, batch_size: int, rank: int = 0, world_size: int = 1, seed=0):
        self.size, self.batch_size = size, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.global_batch = batch_size * world_size
        self.batches_per_epoch = size // self.global_batch
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{size} images are fewer than one global batch ({self.global_batch} = "
                f"{batch_size} x {world_size} processes); lower batch_size or add images"
            )
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=g)[: self.batches_per_epoch * self.global_batch]
        mine = order[self.rank :: self.world_size][self.start_batch * self.batch_size :]
        return iter([(self.epoch, i) for i in mine.tolist()])

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size


class ShardSampler(Sampler):
    """Evaluation: every index exactly once over all processes, in order, rank-strided."""

    def __init__(self, size: int, rank: int = 0, world_size: int = 1):
        self.indices: List[int] = list(range(rank, size, world_size))

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        return iter([(0, i) for i in self.indices])

    def __len__(self) -> int:
        return len(self.indices)
