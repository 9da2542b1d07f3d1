"""JPEG decoding on the GPU (nvJPEG through torchvision), the standard way.

The loader workers only read files and draw each sample's crop and flip; the batch reaches
the training step still encoded, and :func:`decode_on_device` decodes it in one batched
``torchvision.io.decode_jpeg(..., device="cuda")`` call, then crops, resizes and flips each
image on the GPU. Files that are not baseline JPEGs in RGB / grey (PNG, CMYK JPEG, ...) are
decoded and cropped by the worker as in the CPU pipeline and travel as uint8; so do JPEGs
without an end-of-image marker (truncated files, whose error is then the worker's: skipped,
counted and replaced as in the CPU pipeline). A JPEG that still fails on the device is decoded
on the CPU (PIL), then and from then on; one that fails there too is replaced by another image
of its batch and counted as skipped (one bad file no longer ends a run, or leaves the other
processes waiting).

On a CPU device the same code runs with torchvision's CPU decoder (how the tests check it).
"""

from __future__ import annotations

import logging
from typing import Dict, List, Optional, Tuple

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
    trainer's ``.to(device)`` leaves it as it is.

    The loader's pinning (``pin_memory=True``) pins the crops the workers decoded: each is
    copied to the device on its own (:func:`decode_on_device`), without blocking the host only
    from pinned memory. The JPEG bytes stay pageable: nvJPEG parses them on the host and stages
    what the GPU needs through pinned buffers of its own, so pinning them too would be one more
    copy of every file for nothing.
    """

    def to(self, *args, **kwargs) -> PendingBatch:
        return self

    def pin_memory(self, *args, **kwargs) -> PendingBatch:
        """The batch with its decoded crops in pinned memory (called by the loader's
        pin-memory thread)."""
        return PendingBatch(
            item
            if item.image is None
            else PendingCrop(item.data, item.crop, item.flip, item.image.pin_memory(), item.path)
            for item in self
        )


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
    fails on a file (nvJPEG returns nothing for the whole batch then), see
    :func:`_decode_each`; files it failed on are decoded on the CPU from then on.

    Returns:
        ((N, 3, H, W) uint8, the number of images no decoder could read: each replaced by
        another image of the batch, or by zeros if none could be read).
    """
    out = torch.empty(len(batch), 3, *size, dtype=torch.uint8, device=device)
    jpegs = [i for i, item in enumerate(batch) if item.data is not None]
    decoded: Dict[int, Optional[torch.Tensor]] = {
        i: _decode_on_cpu(batch[i], device) for i in jpegs if batch[i].path in _CPU_ONLY
    }
    rest = [i for i in jpegs if i not in decoded]
    if rest:
        try:
            decoded.update(zip(rest, decode_jpegs([batch[i].data for i in rest], device)))
        except RuntimeError as e:
            _raise_if_not_the_file(e)
            decoded.update(zip(rest, _decode_each([batch[i] for i in rest], device)))
    bad = [i for i in jpegs if decoded[i] is None]
    for i in jpegs:
        if decoded[i] is not None:
            x = resized_crop_uint8(decoded[i], batch[i].crop, size)
            out[i] = x.flip(-1) if batch[i].flip else x
    for i, item in enumerate(batch):
        if item.data is None:
            out[i] = item.image.to(device, non_blocking=True)  # (pinned: the host goes on)
    good = sorted(set(range(len(batch))) - set(bad))
    for k, i in enumerate(bad):  # as the dataset replaces an unreadable file: another image
        if good:
            out[i] = out[good[k % len(good)]]
        else:  # (raising would leave the other processes waiting in the all-reduce)
            out[i] = 0
    return out, len(bad)


_CPU_ONLY: set = set()  # files the device decoder failed on: decoded on the CPU from then on


def _raise_if_not_the_file(e: RuntimeError) -> None:
    """Re-raises decoder errors that are not about a file (torchvision reports every error of
    the CUDA decoder, out-of-memory included, as a RuntimeError)."""
    message = str(e).lower()
    if "out of memory" in message or "cuda error" in message:
        raise e


def _decode_each(items: List[PendingCrop], device: torch.device) -> List[Optional[torch.Tensor]]:
    """Each JPEG on its own on ``device``; one that fails there is remembered and decoded on
    the CPU (:func:`_decode_on_cpu`)."""
    out: List[Optional[torch.Tensor]] = []
    for item in items:
        try:
            out.append(decode_jpegs([item.data], device)[0])
        except RuntimeError as e:
            _raise_if_not_the_file(e)
            logger.warning(
                "%s: the device decoder failed (%s): decoded on the CPU from now on", item.path, e
            )
            _CPU_ONLY.add(item.path)
            out.append(_decode_on_cpu(item, device))
    return out


def _decode_on_cpu(item: PendingCrop, device: torch.device) -> Optional[torch.Tensor]:
    """The JPEG decoded by PIL (the official pipeline's decoder), on ``device``; None, with a
    warning naming the file, if PIL cannot read it either."""
    try:
        enc = EncodedImage(bytearray(item.data.numpy().tobytes()), item.path)
        img = decode_uint8(enc, use_torchvision=False)
    except (OSError, ValueError, SyntaxError) as e:
        logger.warning(
            "%s: cannot decode (%s): replaced by another image of the batch", item.path, e
        )
        return None
    return img.to(device)


def decode_jpegs(data: List[torch.Tensor], device: torch.device) -> List[torch.Tensor]:
    """One batched ``torchvision.io.decode_jpeg`` on ``device``, as RGB uint8 (3, H, W).

    torchvision allocates the outputs on the current CUDA stream, but nvJPEG writes them from
    its own stream without waiting for the work queued on the current one (pytorch/vision#9606,
    meta-pytorch/torchcodec#1634): allocated on the training stream, they could land in memory
    that the previous step's backward still reads. They are therefore allocated under a side
    stream, from a memory pool of their own that nothing else allocates from; each output is
    marked as used by the training stream (``record_stream``), so the pool hands its memory
    out again only after the training stream's work on it has run, and the training stream
    waits for the side stream. The host never waits for the training stream, so a batch's
    decoding overlaps the previous step's work on the GPU. Without PyTorch's native caching
    allocator (``PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync``, which can hand memory freed
    on one stream to another), or without ``torch.cuda.MemPool``, the training stream is
    drained on the host before each decode instead.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    if device.type != "cuda":
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    caller = torch.cuda.current_stream(device)
    side = _decode_side(device)
    if side is None:
        caller.synchronize()
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    stream, pool = side
    with torch.cuda.stream(stream), torch.cuda.use_mem_pool(pool, stream.device):
        out = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    caller.wait_stream(stream)
    for img in out:
        img.record_stream(caller)
    return out


_DECODE_SIDE: dict = {}  # CUDA device index -> (side stream, memory pool), or None


def _decode_side(device: torch.device):
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _DECODE_SIDE:
        native = torch.cuda.get_allocator_backend() == "native"
        if native and hasattr(torch.cuda, "MemPool"):
            _DECODE_SIDE[index] = (torch.cuda.Stream(device=index), torch.cuda.MemPool())
        else:
            logger.info(
                "decode_on_device: allocator %s%s: the training stream is drained before each "
                "decode (no overlap with the previous step)",
                torch.cuda.get_allocator_backend(),
                "" if hasattr(torch.cuda, "MemPool") else " without torch.cuda.MemPool",
            )
            _DECODE_SIDE[index] = None
    return _DECODE_SIDE[index]
