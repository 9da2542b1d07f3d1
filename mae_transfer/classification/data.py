"""Data of the classification protocols: class folders, the official augmentations (timm for
fine-tuning, crop + flip for linear probing), mixup / cutmix, and cached features."""

from __future__ import annotations

import os
from typing import Optional, Sequence, Tuple

import torch
from torchvision import transforms

from mae_transfer.data import IMAGENET_MEAN, IMAGENET_STD, ClassFolder, find_classes
from mae_transfer.data.folder import IMG_EXTENSIONS, class_difference
from mae_transfer.data.transforms import Size, hw
from mae_transfer.engine.config import ConfigError
from mae_transfer.engine.distributed import DistInfo, on_rank0

from .config import ClassifyConfig, FinetuneConfig, mixes


def finetune_transform(cfg: FinetuneConfig):
    """timm's training transform as the official fine-tuning builds it: RandomResizedCrop
    (bicubic), flip, RandAugment ``cfg.aa``, normalisation, random erasing ``cfg.reprob``."""
    from timm.data import create_transform

    transform = create_transform(
        input_size=(3, *hw(cfg.input_size)),
        is_training=True,
        color_jitter=cfg.color_jitter,
        auto_augment=cfg.aa or None,
        interpolation="bicubic",
        re_prob=cfg.reprob,
        re_mode=cfg.remode,
        re_count=cfg.recount,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )
    for t in transform.transforms:  # RandAugment / AugMix hold ops, AutoAugment sub-policies
        ops = getattr(t, "ops", None) or [op for ops in getattr(t, "policy", []) for op in ops]
        for op in ops:
            if op.name.startswith("Posterize"):
                op.aug_fn = _posterize
    return transform


def _posterize(img, bits_to_keep: int, **kwargs):
    """timm's posterize, keeping 0 bits as older Pillow did (a black image): the recipe's
    magnitude noise reaches 10 in ~2% of draws, where PosterizeIncreasing keeps 0 bits, and
    Pillow 13 raises there (a ValueError at some image of the first ImageNet epoch)."""
    from PIL import ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep < 1:
        return img.point([0] * 256 * len(img.getbands()))
    return ImageOps.posterize(img, bits_to_keep)


def linprobe_transform(input_size: Size) -> transforms.Compose:
    """The official linear probe's augmentation: RandomResizedCrop (bicubic) and flip only."""
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(
                hw(input_size), interpolation=transforms.InterpolationMode.BICUBIC
            ),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def class_folders(
    cfg: ClassifyConfig, dist: Optional[DistInfo] = None
) -> Tuple[Optional[ClassFolder], ClassFolder]:
    """``data_path/train`` (None when only evaluating) and ``data_path/val``, checked to name
    the same classes; listed by rank 0 for all processes."""
    dist = dist or DistInfo()
    val = class_folder(f"{cfg.data_path}/val", dist)
    if cfg.eval:
        return None, val
    train = class_folder(f"{cfg.data_path}/train", dist)
    diff = class_difference(train, val)
    if diff:
        raise ConfigError(
            f"train/ and val/ under {cfg.data_path} name different classes ({diff}): both need "
            "the same class folders"
        )
    return train, val


def class_folder(root: str, dist: Optional[DistInfo] = None) -> ClassFolder:
    """The class folders of ``root``, listed by rank 0 for all processes; a ConfigError that
    says what to do when the images are not in class folders (ImageNet's val/ as released)."""
    dist = dist or DistInfo()
    try:
        return on_rank0(find_classes, dist, root)
    except FileNotFoundError as e:
        flat = os.path.isdir(root) and any(
            f.name.lower().endswith(IMG_EXTENSIONS) for f in os.scandir(root)
        )
        hint = (  # e.g. ImageNet's val/ as distributed: 50,000 files, no class folders
            f"; images directly in {root} have no class: sort them into one folder per class "
            "(for ImageNet's val/, one per synset, as train/ is)"
            if flat
            else ""
        )
        raise ConfigError(f"{e}{hint}") from e


def build_mixup(cfg: FinetuneConfig, num_classes: int):
    """timm's ``Mixup`` (mixup / cutmix with label smoothing), or None when both are off.
    ``cfg.cutmix_minmax``, when set, turns cutmix on with that box range (timm then ignores the
    cutmix alpha), as the official script passes it."""
    if not mixes(cfg):
        return None
    from timm.data import Mixup

    return Mixup(
        mixup_alpha=cfg.mixup,
        cutmix_alpha=cfg.cutmix,
        cutmix_minmax=None if cfg.cutmix_minmax is None else list(cfg.cutmix_minmax),
        prob=cfg.mixup_prob,
        switch_prob=cfg.mixup_switch_prob,
        mode=cfg.mixup_mode,
        label_smoothing=cfg.smoothing,
        num_classes=num_classes,
    )


class FeatureDataset(torch.utils.data.Dataset):
    """Pre-extracted features: items ``(feature, label, replaced)`` by ``(epoch, index)`` keys,
    ``replaced`` 1 where the image stood in for an unreadable file (as
    :class:`~mae_transfer.data.ClassFolderDataset` counts it: trained on, left out of the
    validation, counted in both).

    Held as the shards the processes extracted (:class:`~mae_transfer.data.ShardSampler`'s
    split: shard ``r`` of ``W`` holds items ``r, r + W, r + 2W, ...``), so that nobody has to
    concatenate or reorder them into a second copy.
    """

    def __init__(
        self,
        features: Sequence[torch.Tensor],
        labels: Sequence[torch.Tensor],
        replaced: Sequence[torch.Tensor],
    ):
        self.features, self.labels, self.replaced = list(features), list(labels), list(replaced)

    def __len__(self) -> int:
        return sum(len(labels) for labels in self.labels)

    def __getitem__(self, key) -> Tuple[torch.Tensor, int, int]:
        _, index = key
        shard, row = index % len(self.labels), index // len(self.labels)
        replaced = int(self.replaced[shard][row])
        return self.features[shard][row], int(self.labels[shard][row]), replaced

    def all_features(self) -> torch.Tensor:
        """Every feature in index order, as one new tensor (for inspection: a copy)."""
        width = max(f.shape[1] for f in self.features if f.numel())
        out = torch.empty(len(self), width)
        for shard, feats in enumerate(self.features):
            if len(feats):
                out[shard :: len(self.features)] = feats
        return out
