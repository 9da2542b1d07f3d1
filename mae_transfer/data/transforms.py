"""Image transforms of the protocols: MAE pretraining crops, evaluation resize + centre crop.

Two forms of the pretraining augmentation (RandomResizedCrop, scale 0.2-1, bicubic, then a
horizontal flip):

- :func:`pretrain_transform`: the official one, PIL in, normalised float32 out;
- :class:`RandomResizedCropFlip`: the fast one. It decodes and augments in uint8 and leaves
  the normalisation to the device (:func:`normalize`), so batches travel as uint8 (a quarter
  of the bytes through the loader's queues and the pinned copy). It draws the same crop and
  flip from the same generator state as the official transform, crops and resizes in one pass,
  and decodes a JPEG at 1/4 or 1/8 of its size when the crop is that much larger than the
  output (then resizing the crop's exact, fractional region of the reduced image). On the same
  crop its output, normalised, equals the official one within decoding tolerance
  (tests/test_data_pipeline.py).
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms

from .decode import EncodedImage, dct_reduction, decode_reduced, decode_uint8, pil_to_uint8

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
Size = Union[int, Sequence[int]]
CropParams = Tuple[int, int, int, int]  # top, left, height, width


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


class ResizeToCover:
    """Bicubic resize of a PIL image, aspect kept, to the smallest size that covers
    ``(H, W) / crop_pct``: a centre crop of (H, W) then takes ``crop_pct`` of the image along
    its tighter side and never pads (for square sizes, the short side to size / crop_pct)."""

    def __init__(self, size: Tuple[int, int], crop_pct: float):
        self.size, self.crop_pct = size, crop_pct

    def __call__(self, img: Image.Image) -> Image.Image:
        (h, w), (ih, iw) = self.size, (img.height, img.width)
        scale = max(h / ih, w / iw) / self.crop_pct
        out = (max(h, round(ih * scale)), max(w, round(iw * scale)))
        return transforms.functional.resize(
            img, list(out), interpolation=transforms.InterpolationMode.BICUBIC
        )


def eval_transform(input_size: Size, crop_pct: float = 224 / 256) -> transforms.Compose:
    """Resize the short side to int(size / crop_pct) (256 for 224), centre crop, normalise: the
    ImageNet evaluation of MAE's fine-tuning, for any input size (deterministic). A non-square
    (H, W) resizes so that the crop fits inside (:class:`ResizeToCover`): resizing the short
    side to min(H, W) / crop_pct would leave the crop wider than the image, padded black."""
    h, w = hw(input_size)
    if h == w:  # torchvision's Resize(int), as the official code: the same pixels
        resize = transforms.Resize(
            int(h / crop_pct), interpolation=transforms.InterpolationMode.BICUBIC
        )
    else:
        resize = ResizeToCover((h, w), crop_pct)
    return transforms.Compose(
        [
            resize,
            transforms.CenterCrop((h, w)),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


# -- the uint8 pipeline -------------------------------------------------------------------------
@functools.lru_cache(maxsize=16)
def _log_ratio(ratio: Tuple[float, float]) -> Tuple[float, float]:
    """log of the aspect range, in float32 as torchvision computes it (same draws)."""
    lo, hi = torch.log(torch.tensor(ratio)).tolist()
    return lo, hi


def crop_params(
    height: int,
    width: int,
    scale: Tuple[float, float] = (0.2, 1.0),
    ratio: Tuple[float, float] = (3 / 4, 4 / 3),
    generator: Optional[torch.Generator] = None,
) -> CropParams:
    """RandomResizedCrop's (top, left, height, width), drawn from ``generator``.

    The algorithm and the sequence of draws of torchvision's ``RandomResizedCrop.get_params``
    (10 tries of area and log-aspect, then a centre crop), so that a generator seeded with s
    gives the crop that the official transform gives after ``torch.manual_seed(s)``.
    """
    area = height * width
    lo, hi = _log_ratio(tuple(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(*scale, generator=generator).item()
        aspect = torch.exp(torch.empty(1).uniform_(lo, hi, generator=generator)).item()
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=generator))
            return top, left, h, w
    in_ratio = width / height  # fall back to a centre crop of the nearest allowed aspect
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resized_crop_uint8(
    img: torch.Tensor,
    crop: CropParams,
    out_hw: Tuple[int, int],
    via_float: Optional[bool] = None,
) -> torch.Tensor:
    """Crop and bicubic resize in one pass, in uint8 (PIL's antialiased bicubic kernel).

    Args:
        img: (3, H, W) uint8, any strides (the decoder's HWC memory is fine).
        crop: (top, left, height, width) in pixels of ``img``.
        out_hw: output (H, W).
        via_float: resize in float32 and round back (default: on GPUs, whose antialiased
            kernels take no uint8); the CPU resizes uint8 directly (its fast path).

    Returns:
        (3, out_h, out_w) uint8.
    """
    top, left, h, w = crop
    region = img[None, :, top : top + h, left : left + w]
    if via_float is None:
        via_float = img.device.type != "cpu"
    if via_float:
        region = region.float()
    out = F.interpolate(region, size=out_hw, mode="bicubic", antialias=True, align_corners=False)
    if via_float:
        out = out.round_().clamp_(0, 255).to(torch.uint8)
    return out[0]


def resized_crop_reduced(
    img: Image.Image, crop: CropParams, out_hw: Tuple[int, int], scale: float
) -> torch.Tensor:
    """The full-size crop, resized from an image decoded at 1/``scale`` (PIL's antialiased
    bicubic, crop and resize in one pass): the exact, fractional region, no edge moved.

    Args:
        img: the reduced image (:func:`~mae_transfer.data.decode.decode_reduced`, RGB or L).
        crop: (top, left, height, width) in full-size pixels.
        out_hw: output (H, W).
        scale: ``img`` is 1/scale of the full size; its pixel x covers full-size pixels
            [x * scale, (x + 1) * scale), so full-size x is x / scale in it (libjpeg's DCT
            scaling places them there, measured in ``decode_reduced``).

    Returns:
        (3, out_h, out_w) uint8, contiguous.
    """
    top, left, h, w = crop
    box = (  # within the reduced image (ceil(W / s) x ceil(H / s)); clamped all the same
        left / scale,
        top / scale,
        min((left + w) / scale, img.width),
        min((top + h) / scale, img.height),
    )
    out = img.resize((out_hw[1], out_hw[0]), Image.BICUBIC, box=box)
    return pil_to_uint8(out).contiguous()  # (3, H, W) memory, as the full-size path's


class RandomResizedCropFlip:
    """The pretraining augmentation in uint8: encoded image + generator -> (3, H, W) uint8.

    Args:
        size: output size, int or (H, W).
        scale, ratio: RandomResizedCrop's area fraction and aspect range.
        flip_p: probability of a horizontal flip.
        reduced_decode: decode JPEGs at 1/4 or 1/8 size when the crop is at least that many
            times the output (libjpeg's DCT scaling; never upsamples more than before) and
            resize the crop's exact region of that image (:func:`resized_crop_reduced`). Not
            the same pixels: the low-pass differs, ~0.6 grey levels on average (README); not
            at 1/2, where it saved no time (``decode.DCT_SCALES``).
        use_torchvision: full-size JPEGs through torchvision's ``decode_jpeg`` (else PIL).
    """

    def __init__(
        self,
        size: Size,
        scale: Tuple[float, float] = (0.2, 1.0),
        ratio: Tuple[float, float] = (3 / 4, 4 / 3),
        flip_p: float = 0.5,
        reduced_decode: bool = True,
        use_torchvision: bool = True,
    ):
        self.size, self.scale, self.ratio, self.flip_p = hw(size), scale, ratio, flip_p
        self.reduced_decode, self.use_torchvision = reduced_decode, use_torchvision

    def params(self, height: int, width: int, generator: torch.Generator) -> Tuple:
        """(crop, flip) drawn as the official transform draws them: crop, then the flip."""
        crop = crop_params(height, width, self.scale, self.ratio, generator)
        return crop, bool(torch.rand(1, generator=generator) < self.flip_p)

    def __call__(self, enc: EncodedImage, generator: torch.Generator) -> torch.Tensor:
        crop, flip = self.params(enc.height, enc.width, generator)
        return self.apply(enc, crop, flip)

    def apply(self, enc: EncodedImage, crop: CropParams, flip: bool) -> torch.Tensor:
        """Decodes ``enc`` (reduced when the crop allows) and crops, resizes, flips it."""
        reduce = dct_reduction(crop[2:], self.size) if self.reduced_decode and enc.is_jpeg else 1
        if reduce > 1:
            img, scale = decode_reduced(enc, reduce)
            out = resized_crop_reduced(img, crop, self.size, scale)
        else:
            out = resized_crop_uint8(decode_uint8(enc, self.use_torchvision), crop, self.size)
        return out.flip(-1) if flip else out


def normalize(
    x: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> torch.Tensor:
    """uint8 images (..., 3, H, W) -> float32 normalised, on whatever device ``x`` is.

    The same operations as ``ToTensor`` + ``Normalize`` (divide by 255, subtract, divide), so
    that equal uint8 pixels give bitwise equal inputs in both pipelines.
    """
    m, s = _channel_stats(tuple(mean), x.device), _channel_stats(tuple(std), x.device)
    return x.float().div_(255).sub_(m).div_(s)


@functools.lru_cache(maxsize=32)
def _channel_stats(values: Tuple[float, ...], device: torch.device) -> torch.Tensor:
    """(C, 1, 1) float32 constants, made once per device: on a GPU, building them from Python
    numbers is a blocking copy that would stall every training step on the host."""
    return torch.tensor(values, dtype=torch.float32, device=device).view(-1, 1, 1)
