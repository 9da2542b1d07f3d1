"""Image transforms of the protocols: MAE pretraining crops, evaluation resize + centre crop."""

from __future__ import annotations

from typing import Sequence, Tuple, Union

from torchvision import transforms

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
Size = Union[int, Sequence[int]]


def hw(size: Size) -> Tuple[int, int]:
    """(H, W) of an int or a pair."""
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[-1]))


def pretrain_transform(input_size: Size) -> transforms.Compose:
    """RandomResizedCrop(scale 0.2-1, bicubic) + horizontal flip + ImageNet normalisation."""
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(
                hw(input_size), scale=(0.2, 1.0), interpolation=transforms.InterpolationMode.BICUBIC
            ),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def eval_transform(input_size: Size, crop_pct: float = 224 / 256) -> transforms.Compose:
    """Resize the short side to size / crop_pct (256 for 224), centre crop, normalise: the
    ImageNet evaluation of MAE's fine-tuning, for any input size (deterministic)."""
    h, w = hw(input_size)
    short = int(round(min(h, w) / crop_pct))
    return transforms.Compose(
        [
            transforms.Resize(short, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop((h, w)),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
