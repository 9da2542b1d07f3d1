"""MAE's weight initialisation, shared by the MAE model and the encoder-only ViT."""

from __future__ import annotations

import torch.nn as nn


def init_linear_and_norm(m: nn.Module) -> None:
    """xavier-uniform Linear weights and zero biases; LayerNorm weight 1, bias 0 (for .apply)."""
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def init_patch_embed(proj: nn.Conv2d) -> None:
    """xavier-uniform on the patch-embedding conv seen as a (D, C*p*p) matrix, as MAE does."""
    w = proj.weight.data
    nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
