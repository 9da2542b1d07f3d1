"""Synthetic scenes: a two-region background (sky / ground) and non-overlapping shapes.

Every scene is a pure function of (seed, index), so the data sets are the same on any machine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Tuple

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")


@dataclass
class Shape:
    kind: int  # index into SHAPES
    polygon: np.ndarray  # (K, 2) x, y vertices


@dataclass
class Scene:
    image: np.ndarray  # (H, W, 3) uint8
    horizon: np.ndarray  # (W,) row of the sky/ground boundary per column
    shapes: List[Shape]


def _smooth_noise(rng: np.random.Generator, h: int, w: int, amp: float) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    out = np.zeros((h, w))
    for _ in range(4):
        fx, fy, ph = rng.uniform(0.02, 0.25), rng.uniform(0.02, 0.25), rng.uniform(0, 2 * np.pi)
        out += np.sin(fx * xx + fy * yy + ph)
    return amp * out / 4


def _background(rng: np.random.Generator, h: int, w: int) -> Tuple[np.ndarray, np.ndarray]:
    """Sky (smooth, blue-grey) above a wavy horizon, ground (textured, brown-green) below."""
    xs = np.arange(w)
    horizon = h * rng.uniform(0.3, 0.6) + 6 * np.sin(xs / rng.uniform(6, 20) + rng.uniform(0, 6))
    sky_top = np.array([rng.uniform(60, 140), rng.uniform(110, 190), rng.uniform(170, 250)])
    sky_low = sky_top + rng.uniform(-40, 40, 3)
    ground = np.array([rng.uniform(70, 150), rng.uniform(70, 140), rng.uniform(20, 80)])
    yy = np.arange(h)[:, None, None] / h
    img = sky_top * (1 - yy) + sky_low * yy + np.zeros((h, w, 3))
    below = np.arange(h)[:, None] >= horizon[None, :]
    texture = _smooth_noise(rng, h, w, 25)[..., None] + rng.normal(0, 12, (h, w, 1))
    img = np.where(below[..., None], ground + texture, img + rng.normal(0, 3, (h, w, 3)))
    return img, horizon


def _polygon(kind: int, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    if kind == 0:
        n, start = 24, 0.0
    elif kind == 1:
        n, start = 4, math.pi / 4
    else:
        n, start = 3, -math.pi / 2
    t = start + angle + np.arange(n) * 2 * math.pi / n
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)


def render_scene(seed: int, index: int, size: int = 128, max_shapes: int = 4) -> Scene:
    """One scene: background + 1..max_shapes shapes with a colour that stands out."""
    rng = np.random.default_rng([seed, index])
    img, horizon = _background(rng, size, size)
    shapes: List[Shape] = []
    for _ in range(50):  # rejection sampling of non-overlapping discs
        if len(shapes) >= rng.integers(1, max_shapes + 1):
            break
        r = rng.uniform(0.1, 0.22) * size
        cx, cy = rng.uniform(r, size - r, 2)
        if any(
            np.hypot(cx - s.polygon[:, 0].mean(), cy - s.polygon[:, 1].mean()) < r + _radius(s) + 2
            for s in shapes
        ):
            continue
        kind = int(rng.integers(0, len(SHAPES)))
        shapes.append(Shape(kind, _polygon(kind, cx, cy, r, rng.uniform(0, 2 * math.pi))))
    pil = Image.fromarray(img.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for s in shapes:
        # a typical colour per class (red, yellow, magenta), jittered: away from sky and ground
        base = np.array([(230, 60, 50), (240, 210, 40), (225, 50, 215)][s.kind], dtype=float)
        color = tuple(int(c) for c in (base + rng.uniform(-40, 40, 3)).clip(0, 255))
        draw.polygon([tuple(p) for p in s.polygon], fill=color)
    out = np.asarray(pil).astype(np.float64) + rng.normal(0, 4, (size, size, 3))
    return Scene(out.clip(0, 255).astype(np.uint8), horizon, shapes)


def _radius(s: Shape) -> float:
    c = s.polygon.mean(axis=0)
    return float(np.hypot(*(s.polygon - c).T).max())


def polygon_area(poly: np.ndarray) -> float:
    x, y = poly[:, 0], poly[:, 1]
    return float(0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def rasterize(poly: np.ndarray, size: int) -> np.ndarray:
    """(size, size) bool mask of a polygon, drawn as PIL draws the image."""
    m = Image.new("L", (size, size), 0)
    ImageDraw.Draw(m).polygon([tuple(p) for p in poly], fill=1)
    return np.asarray(m).astype(bool)
