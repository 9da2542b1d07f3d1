"""JPEG decoding on the GPU (nvJPEG through torchvision), the standard way.

The loader workers only read files and draw each sample's crop and flip; the batch reaches
the training step still encoded, and :func:`decode_on_device` decodes it in one batched
``torchvision.io.decode_jpeg(..., device="cuda")`` call, then crops, resizes and flips each
image on the GPU. Files that are not baseline JPEGs in RGB / grey (PNG, CMYK JPEG, ...) are
decoded and cropped by the worker as in the CPU pipeline and travel as uint8; so do JPEGs
without an end-of-image marker (truncated files, whose error is then the worker's: skipped,
counted and replaced as in the CPU pipeline). A JPEG that still fails on the device is decoded
on the CPU (PIL); one that fails there too is replaced by another image of its batch and
counted as skipped (one bad file no longer ends a run, or leaves the other processes waiting).

On a CPU device the same code runs with torchvision's CPU decoder (how the tests check it).
"""

from __future__ import annotations

import logging
from typing import List, Optional, Tuple

import torch

from .decode import EncodedImage, decode_uint8
from .transforms import CropParams, RandomResizedCropFlip, resized_crop_uint8

__all__ = ["PendingCrop", "PendingBatch", "pending_crop", "decode_on_device", "decode_jpegs"]

logger = logging.getLogger(__name__)
JPEG_EOI = b"\xff\xd9"  # never inside entropy-coded data (an 0xff there is followed by 0 or RSTn)


class PendingCrop:
    """One sample on its way to the device: JPEG bytes + (crop, flip), or a finished uint8
    crop (``image``) for formats the device decoder does not take."""

    __slots__ = ("data", "crop", "flip", "image", "path")

    def __init__(
        self, data=None, crop: Optional[CropParams] = None, flip=False, image=None, path=""
    ):
        self.data, self.crop, self.flip, self.image, self.path = data, crop, flip, image, path


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
    """Draws the crop and flip (the CPU pipeline's draws); decodes here only non-JPEGs and
    JPEGs that do not end (up to 30 bytes of padding) with the end-of-image marker: truncated
    ones, which then raise here, where the dataset replaces and counts them."""
    crop, flip = transform.params(enc.height, enc.width, generator)
    if enc.is_jpeg and JPEG_EOI in enc.data[-32:]:
        return PendingCrop(data=enc.tensor().clone(), crop=crop, flip=flip, path=enc.path)
    return PendingCrop(image=transform.apply(enc, crop, flip))


def decode_on_device(
    batch: List[PendingCrop], size: Tuple[int, int], device: torch.device
) -> Tuple[torch.Tensor, int]:
    """Decodes, crops, resizes and flips a batch on ``device``.

    All JPEGs go through one batched ``decode_jpeg`` call (nvJPEG on CUDA); resizing on a GPU
    runs in float and is rounded back to uint8 (:func:`resized_crop_uint8`). If that call
    fails (nvJPEG returns nothing for a batch with one bad file), see :func:`_decode_each`.

    Returns:
        ((N, 3, H, W) uint8, the number of images that could not be decoded anywhere and were
        replaced by another image of the batch).
    """
    out = torch.empty(len(batch), 3, *size, dtype=torch.uint8, device=device)
    jpegs = [i for i, item in enumerate(batch) if item.data is not None]
    bad = []
    if jpegs:
        try:
            decoded: List[Optional[torch.Tensor]] = decode_jpegs(
                [batch[i].data for i in jpegs], device
            )
        except RuntimeError:
            decoded = _decode_each([batch[i] for i in jpegs], device)
        for i, img in zip(jpegs, decoded):
            if img is None:
                bad.append(i)
                continue
            x = resized_crop_uint8(img, batch[i].crop, size)
            out[i] = x.flip(-1) if batch[i].flip else x
    for i, item in enumerate(batch):
        if item.data is None:
            out[i] = item.image.to(device, non_blocking=True)
    good = [i for i in range(len(batch)) if i not in set(bad)]
    if bad and not good:
        raise RuntimeError(
            f"no image of this batch could be decoded: {', '.join(batch[i].path for i in bad)}"
        )
    for k, i in enumerate(bad):  # as the dataset replaces an unreadable file: another image
        out[i] = out[good[k % len(good)]]
    return out, len(bad)


def _decode_each(items: List[PendingCrop], device: torch.device) -> List[Optional[torch.Tensor]]:
    """Each JPEG on its own on ``device``; one that fails there on the CPU (PIL, the official
    pipeline's decoder), moved to ``device``; None (with a warning naming the file) if that
    fails too."""
    out: List[Optional[torch.Tensor]] = []
    for item in items:
        try:
            out.append(decode_jpegs([item.data], device)[0])
            continue
        except RuntimeError as e:
            device_error = e
        try:
            enc = EncodedImage(bytearray(item.data.numpy().tobytes()), item.path)
            img, _ = decode_uint8(enc, use_torchvision=False)
        except (OSError, ValueError, SyntaxError) as e:
            logger.warning(
                "%s: cannot decode (%s; on the CPU: %s), skipped", item.path, device_error, e
            )
            out.append(None)
            continue
        logger.warning(
            "%s: decoded on the CPU (the device decoder failed: %s)", item.path, device_error
        )
        out.append(img.to(device))
    return out


def decode_jpegs(data: List[torch.Tensor], device: torch.device) -> List[torch.Tensor]:
    """One batched ``torchvision.io.decode_jpeg`` on ``device``, as RGB uint8 (3, H, W).

    On CUDA the decode is issued with a side stream current: torchvision allocates the outputs
    on the current stream but nvJPEG writes them from its own, without waiting for work queued
    on the current stream (pytorch/vision#9606, meta-pytorch/torchcodec#1634). Allocated on the
    caller's stream they could land in memory the previous step's backward still reads. The
    side stream's memory is used by nothing else: each output is marked as used by the
    caller's stream (``record_stream``), so the allocator hands it out again only after the
    caller's work on it has run, and the caller's stream waits for the side stream. The host
    never waits for the caller's stream, so the decode overlaps the previous step on the GPU
    (the first version drained that stream before every batch).
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    if device.type != "cuda":
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    side = _decode_stream(device)
    caller = torch.cuda.current_stream(device)
    with torch.cuda.stream(side):
        out = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    caller.wait_stream(side)
    for img in out:
        img.record_stream(caller)
    return out


_DECODE_STREAMS: dict = {}  # CUDA device index -> the side stream JPEGs are decoded under


def _decode_stream(device: torch.device):
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _DECODE_STREAMS:
        _DECODE_STREAMS[index] = torch.cuda.Stream(device=index)
    return _DECODE_STREAMS[index]
