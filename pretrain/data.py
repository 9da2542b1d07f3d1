"""Pretraining data: image folders, robust decoding, per-sample deterministic randomness.

Every random choice for a sample (crop, flip, mask noise) is drawn from a seed made of
(run seed, epoch, image index). The stream of training batches is therefore the same whatever
the number of processes or loader workers, and a resumed run sees exactly the batches the
uninterrupted one would have.
"""

from __future__ import annotations

import logging
import os
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
from PIL import Image, UnidentifiedImageError
from PIL.Image import DecompressionBombError
from torch.utils.data import Dataset, Sampler
from torchvision import transforms

logger = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_CONSECUTIVE_BAD = 50


def _image_root(root: str) -> str:
    train = os.path.join(root, "train")
    return train if os.path.isdir(train) else root


def first_image(root: str) -> Optional[str]:
    """The first image file found under ``root`` (stops there: cheap on ImageNet), or None."""
    for dirpath, _, filenames in os.walk(_image_root(root), followlinks=True):
        for f in filenames:
            if f.lower().endswith(IMG_EXTENSIONS):
                return os.path.join(dirpath, f)
    return None


def find_images(root: str) -> List[str]:
    """Image files under ``root`` (``root/train`` when it exists, the ImageNet layout), sorted."""
    base = _image_root(root)
    files = []
    for dirpath, dirnames, filenames in os.walk(base, followlinks=True):
        dirnames.sort()
        files.extend(
            os.path.join(dirpath, f)
            for f in sorted(filenames)
            if f.lower().endswith(IMG_EXTENSIONS)
        )
    if not files:
        raise FileNotFoundError(
            f"no images ({', '.join(IMG_EXTENSIONS)}) found under {base}; "
            "expected an ImageNet root with train/<class>/*.JPEG or a folder of images"
        )
    return files


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed unique to (run seed, epoch, image index)."""
    return ((seed * 1_000_003 + epoch) * 10_000_019 + index) % (2**63 - 1)


def pretrain_transform(input_size) -> transforms.Compose:
    """RandomResizedCrop(scale 0.2-1, bicubic) + horizontal flip + ImageNet normalisation."""
    size = tuple(input_size) if isinstance(input_size, (list, tuple)) else (input_size, input_size)
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(
                size, scale=(0.2, 1.0), interpolation=transforms.InterpolationMode.BICUBIC
            ),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def load_rgb(path: str) -> Image.Image:
    """Opens and fully decodes an image as RGB; raises on corrupt or truncated files."""
    with open(path, "rb") as f:
        img = Image.open(f)
        img.load()
        return img.convert("RGB")


class PretrainDataset(Dataset):
    """Images from a folder; each item is (image, mask noise, number of bad files skipped).

    A file that fails to decode is replaced by the next good one (deterministically), logged
    once and counted; the count travels with the batch so the trainer can report it.
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
        """key: (epoch, index), as the sampler yields (workers never need to be told the epoch)."""
        epoch, index = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, epoch, index))
            img, skipped = self._load_good(index % len(self.files))
            x = self.transform(img)
            noise = torch.rand(self.num_patches)
        return x, noise, skipped

    def _load_good(self, i: int) -> Tuple[Image.Image, int]:
        skipped = 0
        for step in range(min(len(self.files), MAX_CONSECUTIVE_BAD)):
            path = self.files[(i + step) % len(self.files)]
            try:
                return load_rgb(path), skipped
            except (
                OSError,
                UnidentifiedImageError,
                ValueError,
                SyntaxError,
                DecompressionBombError,
            ) as e:
                skipped += 1
                if path not in self._bad:
                    self._bad.add(path)
                    logger.warning("skipping unreadable image %s: %s", path, e)
        raise RuntimeError(
            f"{MAX_CONSECUTIVE_BAD} consecutive unreadable images from {self.files[i]}: "
            "is data_path a folder of images?"
        )


def collate(batch) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Stacks images and noise; sums the skipped-file counts."""
    images, noise, skipped = zip(*batch)
    return torch.stack(images), torch.stack(noise), int(sum(skipped))


class ResumableDistributedSampler(Sampler):
    """Shuffled indices split across processes, resumable in the middle of an epoch.

    The epoch's permutation depends only on (seed, epoch). Process ``rank`` takes positions
    ``rank, rank + world, ...``, so the union of the processes' i-th batches is the i-th batch a
    single process with the global batch size would see. Only whole batches are produced.
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
        """Yields (epoch, image index) keys for :class:`PretrainDataset`."""
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=g)[: self.batches_per_epoch * self.global_batch]
        mine = order[self.rank :: self.world_size][self.start_batch * self.batch_size :]
        return iter([(self.epoch, i) for i in mine.tolist()])

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size
