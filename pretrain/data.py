"""Pretraining data: a folder of images, decoded robustly, augmented from per-sample seeds."""

from __future__ import annotations

import logging
from typing import Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset

from mae_transfer.data import PathList, find_images, pretrain_transform, read_good, sample_seed
from mae_transfer.data.decode import open_encoded
from mae_transfer.data.device_decode import pending_crop
from mae_transfer.data.folder import load_rgb
from mae_transfer.data.transforms import RandomResizedCropFlip

logger = logging.getLogger(__name__)

PIPELINES = ("uint8", "device", "official")


class PretrainDataset(Dataset):
    """Images from a folder; each item is (image, mask noise, number of bad files skipped).

    Keys are ``(epoch, index)`` (see :class:`mae_transfer.data.ResumableDistributedSampler`):
    crop, flip and mask noise are drawn, in that order, from a generator seeded with (seed,
    epoch, index), whatever the process or worker. A file that fails to decode is replaced by
    the next good one (deterministically: its draws start again from the same seed), logged
    once and counted; the count travels with the batch so the trainer can report it.

    Args:
        pipeline: ``uint8``: decode and augment in uint8 on the CPU (the image is (3, H, W)
            uint8; the step normalises it on the device, :func:`mae_transfer.data.normalize`);
            ``device``: JPEGs travel encoded with their crop and are decoded on the device
            (nvJPEG; :mod:`mae_transfer.data.device_decode`); ``official``: PIL + the
            official float32 transform (a reference: same crops, normalised float32).
        reduced_decode: ``uint8``: JPEGs whose crop is >= 4x / 8x the output are decoded at
            1/4 / 1/8 size; not at 1/2, where it saved no time (:class:`RandomResizedCropFlip`,
            ``decode.DCT_SCALES``).
    """

    def __init__(
        self,
        root: str,
        input_size,
        num_patches: int,
        seed: int = 0,
        repeats: int = 1,
        files: Optional[Sequence[str]] = None,
        pipeline: str = "uint8",
        reduced_decode: bool = True,
    ):
        if pipeline not in PIPELINES:
            raise ValueError(f"pipeline {pipeline!r}: expected one of {PIPELINES}")
        # no list of per-image Python objects in the loader workers: see PathList
        self.files = PathList(files if files is not None else find_images(root))
        self.pipeline = pipeline
        self.crop = RandomResizedCropFlip(input_size, reduced_decode=reduced_decode)
        self.transform = pretrain_transform(input_size)  # the official pipeline
        self.num_patches = num_patches
        self.seed = seed
        self.repeats = repeats
        self._bad: set = set()

    def __len__(self) -> int:
        return len(self.files) * self.repeats

    def __getitem__(self, key: Tuple[int, int]) -> Tuple[object, torch.Tensor, int]:
        epoch, index = key
        seed = sample_seed(self.seed, epoch, index)
        _, (x, noise), skipped = read_good(
            self.files,
            index % len(self.files),
            self._bad,
            loader=lambda p: self._load(p, seed),
            seed=seed,
        )
        return x, noise, skipped

    def _load(self, path: str, seed: int) -> Tuple[object, torch.Tensor]:
        """Decodes and augments one file (raises on an unreadable one), then draws the noise."""
        if self.pipeline == "official":
            img = load_rgb(path)
            with torch.random.fork_rng(devices=[]):  # the CPU's generator only (not the GPUs')
                torch.default_generator.manual_seed(seed)
                return self.transform(img), torch.rand(self.num_patches)
        g = torch.Generator().manual_seed(seed)
        enc = open_encoded(path)
        x = pending_crop(enc, self.crop, g) if self.pipeline == "device" else self.crop(enc, g)
        return x, torch.rand(self.num_patches, generator=g)
