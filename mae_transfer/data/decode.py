"""Decoding to uint8 tensors: libjpeg-turbo through torchvision, reduced-size JPEG decoding,
and PIL as the fallback for every other format.

The pretraining pipeline decodes and augments in uint8 and normalises on the device (see
:class:`mae_transfer.data.transforms.RandomResizedCropFlip`); these are its decoding steps.
Measured on one core, 500x375 q90 JPEGs: torchvision's ``decode_jpeg`` and PIL decode in the
same time (both libjpeg-turbo), but ``decode_jpeg`` hands back a tensor without the copies PIL
needs (``convert`` and ``np.asarray``); decoding at 1/4 or 1/8 size (JPEG DCT scaling, PIL
``draft``) costs a fraction of a full decode when the crop is that much larger than the output
anyway.
"""

from __future__ import annotations

import functools
import io
import logging
import os
from typing import Tuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

__all__ = [
    "EncodedImage",
    "dct_reduction",
    "decode_pil",
    "decode_reduced",
    "decode_uint8",
    "decode_upright",
    "more_than_8_bits",
    "open_encoded",
    "open_image",
    "pil_to_uint8",
    "to_rgb",
]

logger = logging.getLogger(__name__)

ORIENTATION = 0x0112  # the EXIF orientation tag
SWAPS_SIDES = (5, 6, 7, 8)  # transposed, 90 degrees clockwise, transversed, 90 anticlockwise
# EXIF orientation -> the transpose that shows the image upright (as PIL's exif_transpose)
UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

# libjpeg decodes at 1/8, 1/4, 1/2 (and 1/1) of the size. Not at 1/2: PIL's resize of the
# exact crop (from the reduced image) is slower than torch's uint8 one (from the full-size
# image), which ate the decoding saved. Per crop, one core, 2026-12-06, 224 output: 1/2 of
# 1024x768 4.42 vs 4.24 ms full-size, of 2048x1536 8.72 vs 9.57; 1/4 of 2048x1536 7.65 vs
# 11.83; 1/8 of 4000x3000 15.1 vs 59.4.
DCT_SCALES = (8, 4)


class EncodedImage:
    """A file's bytes and its parsed header (format, mode, size): nothing decoded yet.

    Args:
        data: the file's content (writable, so that torch can view it without a copy).
        path: where it came from (for error messages).
    """

    def __init__(self, data: bytearray, path: str = "<bytes>"):
        self.data, self.path = data, path
        self.pil = open_image(data, path)  # the header only
        self.format, self.mode = self.pil.format, self.pil.mode
        self.width, self.height = self.pil.size

    @property
    def is_jpeg(self) -> bool:
        """Baseline/progressive JPEG in a mode libjpeg turns into RGB exactly as PIL does."""
        return self.format == "JPEG" and self.mode in ("RGB", "L")

    def tensor(self) -> torch.Tensor:
        """The encoded bytes as a 1-D uint8 tensor (a view, no copy)."""
        return torch.frombuffer(self.data, dtype=torch.uint8)


def open_image(data, path: str) -> Image.Image:
    """``Image.open`` of a file's bytes (the header only), whose error names the file.

    Raises:
        UnidentifiedImageError: not an image (e.g. a macOS ``._`` file, an HTML page).
    """
    try:
        return Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise UnidentifiedImageError(f"cannot identify image file {path!r}") from None


def open_encoded(path: str) -> EncodedImage:
    """Reads a file into memory and parses its header; raises on a non-image file."""
    with open(path, "rb") as f:
        data = bytearray(os.fstat(f.fileno()).st_size)
        n = f.readinto(data)
    return EncodedImage(data[:n] if n != len(data) else data, path)


def dct_reduction(crop_hw: Tuple[int, int], out_hw: Tuple[int, int]) -> int:
    """The largest JPEG DCT scale we use (1, 4 or 8; :data:`DCT_SCALES`) at which the crop
    still has at least as many pixels as the output along both axes: decoding at 1/s then
    never upsamples."""
    ratio = min(crop_hw[0] / out_hw[0], crop_hw[1] / out_hw[1])
    return next((s for s in DCT_SCALES if ratio >= s), 1)


def _is_high_depth(mode: str) -> bool:
    """One channel of more than 8 bits: 16-bit PNG / TIFF (``I;16*``), 32-bit int or float."""
    return mode in ("I", "F") or mode.startswith("I;16")


@functools.cache
def _note_high_depth(mode: str) -> None:
    """Says once per process (and mode) what happens to such images."""
    logger.warning(
        "images of mode %s (more than 8 bits per value: 16-bit PNG / TIFF, 32-bit int or "
        "float) are stretched from each image's own min..max to 0..255 (as MONAI's "
        "ScaleIntensity); PIL alone would clip them to 0..255 or keep only each value's high "
        "byte (a 12- or 16-bit scan comes out almost all white or almost black)",
        mode,
    )


def stretch_to_uint8(values: np.ndarray) -> np.ndarray:
    """Any real array -> uint8, its finite min..max mapped linearly onto 0..255 (NaN -> 0,
    +-inf -> the ends). A constant array has no range to stretch: 16-bit values are scaled
    from 0..65535, floats from 0..1, others clipped. Integers of up to 16 bits of range go
    through a lookup table (no float copy of a large scan)."""
    a = np.asarray(values)
    if a.dtype.kind in "ui":
        lo, hi = int(a.min()), int(a.max())
        if hi == lo:
            v = lo * 255 / 65535 if a.dtype.itemsize == 2 else lo
            return np.full(a.shape, min(max(round(v), 0), 255), np.uint8)
        if hi - lo < 1 << 16:
            lut = np.rint(np.arange(hi - lo + 1) * (255.0 / (hi - lo))).astype(np.uint8)
            return lut[a - np.asarray(lo, a.dtype) if lo >= 0 else a.astype(np.int64) - lo]
    a = a.astype(np.float32)  # a copy: changed in place below
    finite = np.isfinite(a)
    if not finite.any():
        return np.zeros(a.shape, np.uint8)
    lo, hi = (a.min(), a.max()) if finite.all() else (a[finite].min(), a[finite].max())
    if hi == lo:
        return np.full(a.shape, round(min(max(float(lo), 0.0), 1.0) * 255), np.uint8)
    np.nan_to_num(a, copy=False, nan=lo, posinf=hi, neginf=lo)
    a -= lo
    a *= 255.0 / (hi - lo)
    return np.rint(a, out=a).astype(np.uint8)


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


def _deep_colour(img: Image.Image) -> bool:
    """A PNG or TIFF of 16 bits per channel that PIL opens as 8-bit RGB(A) (keeping each
    value's high byte; planar TIFFs it reads garbled). Before ``img.load()``: a PNG's depth
    is in its tile list, gone after it."""
    if img.mode not in ("RGB", "RGBA"):
        return False
    if img.format == "TIFF":
        bits = img.tag_v2.get(258, 8)  # BitsPerSample
        return max(bits if isinstance(bits, tuple) else (bits,)) > 8
    return img.format == "PNG" and any(";16" in str(t.args) for t in img.tile or ())


def more_than_8_bits(img: Image.Image) -> bool:
    """Whether an opened, not yet loaded image has more than 8 bits per value (16-bit PNG /
    TIFF, grey or colour; 32-bit int or float), which :func:`decode_pil` stretches."""
    return _is_high_depth(img.mode) or _deep_colour(img)


def _read_deep(img: Image.Image, data) -> np.ndarray:
    """All the bits of a :func:`_deep_colour` file, (H, W, C) with C 1-4 (a grey + alpha PNG
    opens as RGBA). Raises OSError (corrupt data) or ImportError (no TIFF reader)."""
    if img.format == "PNG":
        from torchvision.io import ImageReadMode, decode_png

        raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        try:
            arr = decode_png(raw, mode=ImageReadMode.UNCHANGED)
        except RuntimeError as e:
            raise OSError(f"cannot decode the 16-bit PNG: {e}") from e
        return arr.permute(1, 2, 0).to(torch.int32).numpy()
    import tifffile  # scikit-image's dependency; optional here

    arr = tifffile.imread(io.BytesIO(data))  # compressed ones may need imagecodecs
    if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[-1] not in (3, 4):
        arr = arr.transpose(1, 2, 0)  # planar
    return arr if arr.ndim == 3 else arr[..., None]


@functools.cache
def _note_deep_fallback(reason: str) -> None:
    logger.warning(
        "16-bit colour TIFFs are read through PIL, which keeps each value's high byte "
        "(12-bit data comes out dark): %s",
        reason,
    )


def decode_pil(img: Image.Image, data) -> Image.Image:
    """An opened, not yet loaded image (and its file's bytes) -> decoded RGB: as
    :func:`to_rgb`, and 16-bit colour PNG / TIFF read with all their bits, then stretched from
    their own min..max to 0..255 like one-channel deep images. Raises on corrupt data."""
    deep = None
    if _deep_colour(img):
        try:
            deep = _read_deep(img, data)
        except ImportError:
            _note_deep_fallback("install tifffile to read all 16 bits")
        except Exception as e:  # noqa: BLE001 - tifffile's own errors (e.g. a missing codec)
            if img.format != "TIFF":
                raise
            _note_deep_fallback(f"tifffile could not read one: {str(e)[:100]}")
    if deep is None:
        img.load()
        return to_rgb(img)
    _note_high_depth(img.mode + " (16 bits per channel)")
    rgb = deep[..., :3] if deep.shape[-1] >= 3 else np.repeat(deep[..., :1], 3, axis=-1)
    return Image.fromarray(stretch_to_uint8(rgb), "RGB")


def decode_upright(img: Image.Image, data, turn: bool = True) -> Image.Image:
    """:func:`decode_pil`, then (``turn``) turned upright by the file's EXIF orientation, as
    PIL's ``exif_transpose``. The tag is read after decoding: PIL's ``getexif`` of a PNG loads
    the image, after which a 16-bit colour PNG no longer shows its depth."""
    rgb = decode_pil(img, data)
    # (a PNG without EXIF: getexif would decode a 16-bit one again, to find none)
    tagged = img.format != "PNG" or b"eXIf" in data or b"exif" in data
    transpose = UPRIGHT.get(img.getexif().get(ORIENTATION)) if turn and tagged else None
    return rgb if transpose is None else rgb.transpose(transpose)


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


def decode_reduced(enc: EncodedImage, reduce: int) -> Tuple[Image.Image, float]:
    """Decodes a JPEG (``enc.is_jpeg``) at 1/``reduce`` of its size or the nearest larger
    scale libjpeg offers (DCT scaling, PIL ``draft``), as a loaded PIL image (RGB or L).

    Returns:
        (image, scale): the image is ``ceil(H / scale) x ceil(W / scale)``; its pixel (y, x)
        covers full-size pixels [y * scale, (y + 1) * scale) x [x * scale, (x + 1) * scale),
        i.e. full-size coordinate x is x / scale in it (pixel edges, as PIL's resize ``box``).
        Measured, not assumed: on smooth q95 JPEGs (4:4:4 and 4:2:0, 800x600) the reduced
        pixel y matches the full-size image best at full-size position (y + 0.5) * scale -
        0.5, to within 0.04 px at 1/2, 1/4 and 1/8 (0.4-2.6 grey levels off on average);
        at y * scale, the other candidate, it is 1.2-21 off.
    """
    img = enc.pil
    img.draft("RGB", (enc.width // reduce, enc.height // reduce))
    img.load()
    return img, float(round(enc.width / img.size[0]))  # ceil(W / s) wide


def decode_uint8(enc: EncodedImage, use_torchvision: bool = True) -> torch.Tensor:
    """Decodes ``enc`` at full size as (3, H, W) uint8 RGB (reduced: :func:`decode_reduced`).

    Args:
        enc: the file's bytes and header.
        use_torchvision: JPEGs through ``torchvision.io.decode_jpeg`` (else PIL).

    Raises:
        OSError: corrupt or truncated data (whichever decoder ran).
    """
    if enc.is_jpeg and use_torchvision and _torchvision_decoder() is not None:
        ImageReadMode, decode_jpeg = _torchvision_decoder()
        try:
            return decode_jpeg(enc.tensor(), mode=ImageReadMode.RGB)
        except RuntimeError as e:  # torchvision reports corrupt JPEGs as RuntimeError
            raise OSError(f"cannot decode {enc.path}: {e}") from e
    return pil_to_uint8(decode_pil(enc.pil, enc.data))
