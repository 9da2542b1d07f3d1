"""Shared fixtures: tiny model sizes and small image folders made on the fly."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# A MAE small enough for CPU tests: 32-d encoder of 2 blocks, 32-d decoder of 1 block.
TINY_MAE = dict(
    embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2
)
TINY_VIT = dict(embed_dim=32, depth=4, num_heads=2)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


def write_images(directory: str, n: int, size=(40, 56), seed: int = 0) -> list:
    """n random-texture RGB images (smooth blobs + noise) as PNG and JPEG files."""
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        h, w = size
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([np.sin(xx / (3 + c + i % 5) + yy / (4 + c)) for c in range(3)], axis=-1)
        img = (127 * (base + 1) + rng.normal(0, 10, (h, w, 3))).clip(0, 255).astype(np.uint8)
        ext = ".png" if i % 2 else ".jpg"
        path = os.path.join(directory, f"img_{i:03d}{ext}")
        Image.fromarray(img).save(path)
        paths.append(path)
    return paths


def save_mae_checkpoints(directory, img_size=32, patch_size=16, depth=4) -> tuple:
    """A tiny MAE saved in the official encoder-only form and as our training checkpoint.

    Returns:
        (encoder state dict, {"official": path, "ours": path}).
    """
    from mae_transfer import create_model

    mae = create_model(
        "mae_vit_base_patch16",
        img_size=img_size,
        patch_size=patch_size,
        **{**TINY_MAE, "depth": depth},
    )
    enc = {k: v for k, v in mae.state_dict().items() if not k.startswith(("decoder", "mask"))}
    official = os.path.join(str(directory), "mae_pretrain_vit_tiny.pth")
    torch.save({"model": enc}, official)
    ours = os.path.join(str(directory), "checkpoint-last.pth")
    torch.save({"model": mae.state_dict(), "optimizer": {}, "epoch": 5, "args": {}}, ours)
    return enc, {"official": official, "ours": ours}


@pytest.fixture
def image_dir(tmp_path):
    d = tmp_path / "images"
    write_images(str(d), 12)
    return str(d)
