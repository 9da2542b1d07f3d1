"""Text on the tiled pictures (titles, row labels, class legends), readable at their size.

PIL's built-in bitmap font is ~11 px whatever the picture: on a grid of photos 2,000 px wide
the titles were nearly invisible and words ran together. Pillow 10.1+ scales its embedded
font with FreeType; older Pillow or one without FreeType keeps the bitmap font.
"""

from __future__ import annotations

import functools
from typing import Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

WHITE = (255, 255, 255)


@functools.cache
def font(size: int):
    """PIL's default font at ``size`` pixels (the bitmap one where it cannot scale)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow < 10.1, or no FreeType
        return ImageFont.load_default()


def text_size(width: int) -> int:
    """A text height that reads on a picture ``width`` pixels wide (12-28 px)."""
    return int(min(28, max(12, width / 90)))


def title_bar(width: int, titles: Sequence[Tuple[int, str]], size: int) -> np.ndarray:
    """A white bar ``width`` wide with each (x, text) of ``titles`` written at x."""
    bar = Image.new("RGB", (width, size + size // 2 + 4), WHITE)
    draw = ImageDraw.Draw(bar)
    for x, text in titles:
        draw.text((x, size // 4 + 2), text, fill=(0, 0, 0), font=font(size))
    return np.asarray(bar)


def legend(width: int, entries: Sequence[Tuple[str, Sequence[int]]], size: int) -> np.ndarray:
    """Colour swatches with their names, left to right and wrapped to ``width``."""
    swatch, gap, line = size, size, size + size // 2 + 4
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    x, y, placed = gap, 0, []
    for name, colour in entries:
        w = swatch + size // 3 + int(draw.textlength(name, font=font(size)))
        if x + w > width and placed:
            x, y = gap, y + line
        placed.append((x, y, name, tuple(int(c) for c in colour)))
        x += w + gap
    bar = Image.new("RGB", (width, y + line + 2), WHITE)
    draw = ImageDraw.Draw(bar)
    for x, y, name, colour in placed:
        top = y + size // 4 + 2
        draw.rectangle([x, top, x + swatch, top + swatch], fill=colour, outline=(0, 0, 0))
        draw.text((x + swatch + size // 3, top), name, fill=(0, 0, 0), font=font(size))
    return np.asarray(bar)
