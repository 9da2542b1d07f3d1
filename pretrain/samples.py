"""The embedded default data: photographs that scikit-image ships inside its package."""

from __future__ import annotations

import os
from typing import List

import numpy as np
from PIL import Image

# Natural photographs bundled with scikit-image (no download); grey ones are made RGB.
SAMPLE_NAMES = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "motorcycle_left",
    "motorcycle_right",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "camera",
    "coins",
    "moon",
    "brick",
    "grass",
    "gravel",
    "horse",
)


def sample_images() -> List[tuple]:
    """(name, HxWx3 uint8 array) for each bundled photograph that loads."""
    from skimage import data

    out = []
    for name in SAMPLE_NAMES:
        try:
            img = np.asarray(getattr(data, name)())
        except Exception:  # noqa: BLE001 - a missing sample is skipped, not fatal
            continue
        if img.dtype != np.uint8:
            img = (255 * (img.astype(np.float64) / max(img.max(), 1))).astype(np.uint8)
        if img.ndim == 2:
            img = np.stack([img] * 3, axis=-1)
        out.append((name, img[..., :3]))
    if not out:
        raise RuntimeError("scikit-image's sample photographs could not be loaded")
    return out


def write_sample_photos(directory: str, max_side: int = 384) -> List[str]:
    """Writes the sample photographs into ``directory``; returns their paths.

    Images are shrunk to at most ``max_side`` pixels (decoding 1400 px PNGs for 64 px crops
    would make loading, not the model, the cost of a CPU demo).
    """
    os.makedirs(directory, exist_ok=True)
    paths = []
    for name, img in sample_images():
        path = os.path.join(directory, f"{name}.png")
        if not os.path.isfile(path):
            pil = Image.fromarray(img)
            pil.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
            pil.save(path)
        paths.append(path)
    return paths
