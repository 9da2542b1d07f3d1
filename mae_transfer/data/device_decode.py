"""JPEG decoding on the GPU (nvJPEG through torchvision), the standard way.

The loader workers only read files and draw each sample's crop and flip; the batch reaches
the training step still encoded, and :func:`decode_on_device` decodes it in one batched
``torchvision.io.decode_jpeg(..., device="cuda")`` call, then crops, resizes and flips each
image on the GPU. Files that are not baseline JPEGs in RGB / grey (PNG, CMYK JPEG, ...) are
decoded and cropped by the worker as in the CPU pipeline and travel as uint8.

On a CPU device the same code runs with torchvision's CPU decoder (how the tests check it).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from .decode import EncodedImage
from .transforms import CropParams, RandomResizedCropFlip, resized_crop_uint8

__all__ = ["PendingCrop", "PendingBatch", "pending_crop", "decode_on_device", "decode_jpegs"]


class PendingCrop:
    """One sample on its way to the device: JPEG bytes + (crop, flip), or a finished uint8
    crop (``image``) for formats the device decoder does not take."""

    __slots__ = ("data", "crop", "flip", "image")

    def __init__(self, data=None, crop: Optional[CropParams] = None, flip=False, image=None):
        self.data, self.crop, self.flip, self.image = data, crop, flip, image


class PendingBatch(list):
    """A batch of :class:`PendingCrop`: stays on the host (nvJPEG reads host memory), so the
    trainer's ``.to(device)`` and the loader's pinning leave it as it is."""

    def to(self, *args, **kwargs) -> PendingBatch:
        return self

    def pin_memory(self, *args, **kwargs) -> PendingBatch:
        return self


def pending_crop(
    enc: EncodedImage, transform: RandomResizedCropFlip, generator: torch.Generator
) -> PendingCrop:
    """Draws the crop and flip (the CPU pipeline's draws); decodes here only non-JPEGs."""
    crop, flip = transform.params(enc.height, enc.width, generator)
    if enc.is_jpeg:
        return PendingCrop(data=enc.tensor().clone(), crop=crop, flip=flip)
    return PendingCrop(image=transform.apply(enc, crop, flip))


def decode_on_device(
    batch: List[PendingCrop], size: Tuple[int, int], device: torch.device
) -> torch.Tensor:
    """Decodes, crops, resizes and flips a batch on ``device``: (N, 3, H, W) uint8.

    All JPEGs go through one batched ``decode_jpeg`` call (nvJPEG on CUDA); resizing on a GPU
    runs in float and is rounded back to uint8 (:func:`resized_crop_uint8`).
    """
    out = torch.empty(len(batch), 3, *size, dtype=torch.uint8, device=device)
    jpegs = [i for i, item in enumerate(batch) if item.data is not None]
    if jpegs:
        decoded = decode_jpegs([batch[i].data for i in jpegs], device)
        for i, img in zip(jpegs, decoded):
            x = resized_crop_uint8(img, batch[i].crop, size)
            out[i] = x.flip(-1) if batch[i].flip else x
    for i, item in enumerate(batch):
        if item.data is None:
            out[i] = item.image.to(device, non_blocking=True)
    return out


def decode_jpegs(data: List[torch.Tensor], device: torch.device) -> List[torch.Tensor]:
    """One batched ``torchvision.io.decode_jpeg`` on ``device``, as RGB uint8 (3, H, W).

    On CUDA the caller's stream is drained first. The decoder's outputs come from the caching
    allocator of the caller's stream, but nvJPEG writes them without waiting for the work
    queued there, so memory that the previous step's backward still reads could be
    overwritten (pytorch/vision#9606, meta-pytorch/torchcodec#1634). The price is one host
    wait per batch, on a path that already hands the host the decoding.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()
    return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
