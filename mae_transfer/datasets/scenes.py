"""Synthetic scenes: a two-region background (sky / ground) and overlapping shapes.

Six shape classes (circle, square, triangle, star, cross, ring) that differ only by their
outline: every object gets a colour drawn from one palette shared by all classes, so colour
says nothing about the class. Objects vary in size, may be cut by the image border and may
occlude each other (each keeps at least half of its pixels visible). Thin scribbles on the
ground add clutter that is not an object.

Every scene is a pure function of (seed, index, size), so the data sets are the same on any
machine (numpy's PCG64 stream and PIL's rasteriser are both platform-independent).
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass
from typing import List, Tuple

import numpy as np
from PIL import Image, ImageDraw

# Bumped whenever render_scene changes: files written by an older generator are made again.
GENERATOR_VERSION = 3
SHAPES = ("circle", "square", "triangle", "star", "cross", "ring")
R_MIN, R_MAX = 0.09, 0.22  # object radius as a fraction of the image side
MIN_VISIBLE = 0.5  # an object keeps at least this fraction of its pixels after occlusion
MIN_PIXELS = 12  # objects smaller than this (after the border cut) are not placed
# object colours, shared by every class: red, yellow, white, magenta, cyan, orange
PALETTE = np.array(
    [
        (220, 50, 45),
        (240, 215, 50),
        (235, 235, 230),
        (215, 60, 210),
        (60, 215, 225),
        (245, 140, 40),
    ],
    dtype=np.float64,
)


@dataclass
class SceneObject:
    kind: int  # index into SHAPES
    mask: np.ndarray  # (H, W) bool, the visible pixels


@dataclass
class Scene:
    image: np.ndarray  # (H, W, 3) uint8
    horizon: np.ndarray  # (W,) row of the sky/ground boundary per column
    objects: List[SceneObject]


# -- geometry ---------------------------------------------------------------------------------
def _regular(n: int, cx: float, cy: float, r: float, angle: float) -> List[Tuple[float, float]]:
    t = angle + np.arange(n) * 2 * math.pi / n
    return list(zip(cx + r * np.cos(t), cy + r * np.sin(t)))


def _star(cx: float, cy: float, r: float, angle: float) -> List[Tuple[float, float]]:
    t = angle + np.arange(10) * math.pi / 5
    radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
    return list(zip(cx + radii * np.cos(t), cy + radii * np.sin(t)))


def _cross(cx: float, cy: float, r: float, angle: float) -> List[Tuple[float, float]]:
    a, b = r, 0.34 * r  # arm length, half width
    pts = np.array(
        [(b, b), (b, a), (-b, a), (-b, b), (-a, b), (-a, -b)]
        + [(-b, -b), (-b, -a), (b, -a), (b, -b), (a, -b), (a, b)]
    )
    c, s = math.cos(angle), math.sin(angle)
    rot = pts @ np.array([[c, s], [-s, c]])
    return [(cx + x, cy + y) for x, y in rot]


def shape_mask(kind: int, cx: float, cy: float, r: float, angle: float, size: int) -> np.ndarray:
    """(size, size) bool mask of one shape of class ``kind`` (see :data:`SHAPES`)."""
    img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(img)
    name = SHAPES[kind]
    if name in ("circle", "ring"):
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
        if name == "ring":
            ri = 0.55 * r
            draw.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=0)
    elif name == "square":
        draw.polygon(_regular(4, cx, cy, r * 0.92, angle), fill=1)
    elif name == "triangle":
        draw.polygon(_regular(3, cx, cy, r, angle), fill=1)
    elif name == "star":
        draw.polygon(_star(cx, cy, r, angle), fill=1)
    else:
        draw.polygon(_cross(cx, cy, r, angle), fill=1)
    return np.asarray(img).astype(bool)


# -- appearance -------------------------------------------------------------------------------
def _smooth_noise(rng: np.random.Generator, h: int, w: int, amp: float) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    out = np.zeros((h, w))
    for _ in range(4):
        fx, fy, ph = rng.uniform(0.02, 0.25), rng.uniform(0.02, 0.25), rng.uniform(0, 2 * np.pi)
        out += np.sin(fx * xx + fy * yy + ph)
    return amp * out / 4


def _background(rng: np.random.Generator, size: int) -> Tuple[np.ndarray, np.ndarray]:
    """Sky (smooth gradient) above a wavy horizon, textured ground below: (H, W, 3), (W,)."""
    xs = np.arange(size)
    horizon = size * rng.uniform(0.25, 0.6) + 0.05 * size * np.sin(
        xs / rng.uniform(0.05, 0.15) / size + rng.uniform(0, 6)
    )
    sky_top = np.array([rng.uniform(60, 160), rng.uniform(110, 200), rng.uniform(160, 250)])
    sky_low = sky_top + rng.uniform(-40, 40, 3)
    ground = np.array([rng.uniform(60, 160), rng.uniform(60, 150), rng.uniform(20, 90)])
    yy = np.arange(size)[:, None, None] / size
    img = sky_top * (1 - yy) + sky_low * yy + np.zeros((size, size, 3))
    below = np.arange(size)[:, None] >= horizon[None, :]
    texture = _smooth_noise(rng, size, size, 25)[..., None] + rng.normal(0, 5, (size, size, 1))
    img = np.where(below[..., None], ground + texture, img + rng.normal(0, 3, (size, size, 3)))
    return img, horizon


def _scribbles(rng: np.random.Generator, img: np.ndarray, horizon: np.ndarray) -> np.ndarray:
    """0-3 thin random polylines on the ground: clutter that is not an object."""
    size = img.shape[0]
    pil = Image.fromarray(img.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for _ in range(int(rng.integers(0, 4))):
        x, y = rng.uniform(0, size), rng.uniform(horizon.max(), size)
        pts = [(x, y)]
        for _ in range(int(rng.integers(2, 5))):
            x, y = x + rng.normal(0, size / 6), y + rng.normal(0, size / 10)
            pts.append((x, y))
        draw.line(pts, fill=_random_colour(rng), width=int(rng.integers(1, 3)))
    return np.asarray(pil).astype(np.float64)


def _random_colour(rng: np.random.Generator) -> Tuple[int, int, int]:
    h, s, v = rng.uniform(0, 1), rng.uniform(0.35, 1.0), rng.uniform(0.35, 1.0)
    return tuple(int(255 * c) for c in colorsys.hsv_to_rgb(h, s, v))


def _pattern(rng: np.random.Generator, mask: np.ndarray) -> np.ndarray:
    """(n, 3) colours of a mask's n pixels: a palette colour, jittered."""
    c = PALETTE[int(rng.integers(0, len(PALETTE)))] + rng.uniform(-20, 20, 3)
    return c + rng.normal(0, 4, (int(mask.sum()), 3))


# -- the scene --------------------------------------------------------------------------------
def _place_objects(rng: np.random.Generator, size: int, max_objects: int) -> List[SceneObject]:
    """Rejection sampling of shapes drawn back to front, each keeping >= MIN_VISIBLE of itself."""
    objects: List[SceneObject] = []
    full: List[int] = []  # each object's pixel count before occlusion
    wanted = int(rng.integers(2, max_objects + 1))
    for _ in range(100):
        if len(objects) >= wanted:
            break
        r = size * rng.uniform(R_MIN, R_MAX)
        cx, cy = rng.uniform(0.3 * r, size - 0.3 * r, 2)
        kind = int(rng.integers(0, len(SHAPES)))
        mask = shape_mask(kind, cx, cy, r, rng.uniform(0, 2 * math.pi), size)
        if mask.sum() < MIN_PIXELS:
            continue
        left = [o.mask & ~mask for o in objects]
        if any(m.sum() < MIN_VISIBLE * n for m, n in zip(left, full)):
            continue
        for o, m in zip(objects, left):
            o.mask = m
        objects.append(SceneObject(kind, mask))
        full.append(int(mask.sum()))
    return objects


def render_scene(seed: int, index: int, size: int = 96, max_objects: int = 6) -> Scene:
    """One scene: background, clutter, then 2..max_objects shapes (later ones on top)."""
    rng = np.random.default_rng([seed, index])
    img, horizon = _background(rng, size)
    img = _scribbles(rng, img, horizon)
    objects = _place_objects(rng, size, max_objects)
    for o in objects:  # visible masks do not overlap
        img[o.mask] = _pattern(rng, o.mask)
    img = img + rng.normal(0, 3, img.shape)
    return Scene(img.clip(0, 255).astype(np.uint8), horizon, objects)


def mask_bbox(mask: np.ndarray) -> Tuple[float, float, float, float]:
    """(x0, y0, x1, y1) of a bool mask's pixels, in pixel-edge coordinates."""
    ys, xs = np.nonzero(mask)
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


def rle_encode(mask: np.ndarray) -> dict:
    """A bool (H, W) mask as COCO's uncompressed RLE: column-major run lengths, zeros first."""
    flat = np.asarray(mask, dtype=np.uint8).flatten(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0] == 1:
        counts = [0] + counts
    return {"counts": [int(c) for c in counts], "size": [int(mask.shape[0]), int(mask.shape[1])]}
