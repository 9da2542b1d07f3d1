"""Pretraining data: a folder of images, decoded robustly, augmented from per-sample seeds."""

from __future__ import annotations

import logging
from typing import Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset

from mae_transfer.data import find_images, pretrain_transform, read_good, sample_seed

logger = logging.getLogger(__name__)


class PretrainDataset(Dataset):
    """Images from a folder; each item is (image, mask noise, number of bad files skipped).

    Keys are ``(epoch, index)`` (see :class:`mae_transfer.data.ResumableDistributedSampler`):
    crop, flip and mask noise are drawn from a seed of (seed, epoch, index). A file that fails
    to decode is replaced by the next good one (deterministically), logged once and counted;
    the count travels with the batch so the trainer can report it.
    """

    def __init__(
        self,
        root: str,
        input_size,
        num_patches: int,
        seed: int = 0,
        repeats: int = 1,
        files: Optional[Sequence[str]] = None,
    ):
        self.files = list(files) if files is not None else find_images(root)
        self.transform = pretrain_transform(input_size)
        self.num_patches = num_patches
        self.seed = seed
        self.repeats = repeats
        self._bad: set = set()

    def __len__(self) -> int:
        return len(self.files) * self.repeats

    def __getitem__(self, key: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor, int]:
        epoch, index = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, epoch, index))
            _, img, skipped = read_good(self.files, index % len(self.files), self._bad)
            x = self.transform(img)
            noise = torch.rand(self.num_patches)
        return x, noise, skipped
