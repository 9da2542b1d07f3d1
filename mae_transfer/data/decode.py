"""Decoding to uint8 tensors: libjpeg-turbo through torchvision, reduced-size JPEG decoding,
and PIL as the fallback for every other format.

The pretraining pipeline decodes and augments in uint8 and normalises on the device (see
:class:`mae_transfer.data.transforms.RandomResizedCropFlip`); these are its decoding steps.
Measured on one core, 500x375 q90 JPEGs: torchvision's ``decode_jpeg`` and PIL decode in the
same time (both libjpeg-turbo), but ``decode_jpeg`` hands back a tensor without the copies PIL
needs (``convert`` and ``np.asarray``); decoding at 1/2, 1/4 or 1/8 size (JPEG DCT scaling,
PIL ``draft``) costs a fraction of a full decode when the crop is that much larger than the
output anyway.
"""

from __future__ import annotations

import functools
import io
import logging
import os
from typing import Tuple

import numpy as np
import torch
from PIL import Image

__all__ = [
    "EncodedImage",
    "dct_reduction",
    "decode_uint8",
    "open_encoded",
    "pil_to_uint8",
    "to_rgb",
]

logger = logging.getLogger(__name__)

DCT_SCALES = (8, 4, 2)  # libjpeg decodes at 1/8, 1/4, 1/2 (and 1/1) of the size


class EncodedImage:
    """A file's bytes and its parsed header (format, mode, size): nothing decoded yet.

    Args:
        data: the file's content (writable, so that torch can view it without a copy).
        path: where it came from (for error messages).
    """

    def __init__(self, data: bytearray, path: str = "<bytes>"):
        self.data, self.path = data, path
        # header only: raises UnidentifiedImageError for what is not an image
        self.pil = Image.open(io.BytesIO(data))
        self.format, self.mode = self.pil.format, self.pil.mode
        self.width, self.height = self.pil.size

    @property
    def is_jpeg(self) -> bool:
        """Baseline/progressive JPEG in a mode libjpeg turns into RGB exactly as PIL does."""
        return self.format == "JPEG" and self.mode in ("RGB", "L")

    def tensor(self) -> torch.Tensor:
        """The encoded bytes as a 1-D uint8 tensor (a view, no copy)."""
        return torch.frombuffer(self.data, dtype=torch.uint8)


def open_encoded(path: str) -> EncodedImage:
    """Reads a file into memory and parses its header; raises on a non-image file."""
    with open(path, "rb") as f:
        data = bytearray(os.fstat(f.fileno()).st_size)
        n = f.readinto(data)
    return EncodedImage(data[:n] if n != len(data) else data, path)


def dct_reduction(crop_hw: Tuple[int, int], out_hw: Tuple[int, int]) -> int:
    """The largest JPEG DCT scale (1, 2, 4 or 8) at which the crop still has at least as many
    pixels as the output along both axes: decoding at 1/s then never upsamples."""
    ratio = min(crop_hw[0] / out_hw[0], crop_hw[1] / out_hw[1])
    return next((s for s in DCT_SCALES if ratio >= s), 1)


def _is_high_depth(mode: str) -> bool:
    """One channel of more than 8 bits: 16-bit PNG / TIFF (``I;16*``), 32-bit int or float."""
    return mode in ("I", "F") or mode.startswith("I;16")


@functools.cache
def _note_high_depth(mode: str) -> None:
    """Says once per process (and mode) what happens to such images."""
    logger.warning(
        "images of mode %s (one channel, more than 8 bits: e.g. 16-bit PNG, float TIFF) are "
        "stretched from each image's own min..max to 0..255 (as MONAI's ScaleIntensity); "
        "a plain convert('RGB') would clip them (16-bit: almost all white)",
        mode,
    )


def stretch_to_uint8(values: np.ndarray) -> np.ndarray:
    """Any real array -> uint8, its finite min..max mapped linearly onto 0..255 (NaN -> 0;
    +-inf -> the ends; a constant array -> 0)."""
    a = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(a)
    if not finite.any():
        return np.zeros(a.shape, np.uint8)
    lo, hi = a[finite].min(), a[finite].max()
    a = np.nan_to_num(a, nan=lo, posinf=hi, neginf=lo)
    if hi <= lo:
        return np.zeros(a.shape, np.uint8)
    return np.rint((a - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def to_rgb(img: Image.Image) -> Image.Image:
    """``img.convert("RGB")``, except for one channel of more than 8 bits (16-bit PNG / TIFF,
    32-bit int or float images), which PIL would clip to 0..255: such an image is stretched
    from its own min..max to 0..255 first (logged once per process)."""
    if img.mode == "RGB":
        return img
    if _is_high_depth(img.mode):
        _note_high_depth(img.mode)
        img = Image.fromarray(stretch_to_uint8(np.asarray(img)), "L")
    return img.convert("RGB")


def pil_to_uint8(img: Image.Image) -> torch.Tensor:
    """A PIL image -> (3, H, W) uint8 RGB (a view of one copy of the pixels)."""
    return torch.from_numpy(np.array(to_rgb(img))).permute(2, 0, 1)  # np.array: writable


@functools.cache
def _torchvision_decoder():
    """torchvision's (ImageReadMode, decode_jpeg), or None where torchvision has dropped
    them (deprecated since 0.29 in favour of TorchCodec): PIL decodes then."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:
        return None
    return ImageReadMode, decode_jpeg


def decode_uint8(enc: EncodedImage, reduce: int = 1, use_torchvision: bool = True):
    """Decodes ``enc`` as (3, H', W') uint8 RGB; also returns the scale actually used.

    Args:
        enc: the file's bytes and header.
        reduce: decode a JPEG at 1/``reduce`` of its size (DCT scaling, PIL ``draft``); the
            result is ``ceil(H / s) x ceil(W / s)`` for the scale ``s`` libjpeg could use.
        use_torchvision: full-size JPEGs through ``torchvision.io.decode_jpeg`` (else PIL).

    Returns:
        (image, scale): pixel (y, x) of the result is pixel (y * scale, x * scale) of the
        full-size image; ``scale`` is 1 unless reduced decoding happened.

    Raises:
        OSError: corrupt or truncated data (whichever decoder ran).
    """
    if enc.is_jpeg and reduce > 1:
        img = enc.pil
        img.draft("RGB", (enc.width // reduce, enc.height // reduce))
        img.load()
        return pil_to_uint8(img), float(round(enc.width / img.size[0]))  # ceil(W / s) wide
    if enc.is_jpeg and use_torchvision and _torchvision_decoder() is not None:
        ImageReadMode, decode_jpeg = _torchvision_decoder()
        try:
            return decode_jpeg(enc.tensor(), mode=ImageReadMode.RGB), 1.0
        except RuntimeError as e:  # torchvision reports corrupt JPEGs as RuntimeError
            raise OSError(f"cannot decode {enc.path}: {e}") from e
    enc.pil.load()
    return pil_to_uint8(enc.pil), 1.0
