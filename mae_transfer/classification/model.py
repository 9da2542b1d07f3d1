"""The ViT classifier of fine-tuning and linear probing, with the official parameter names.

``ViTClassifier`` is our encoder plus a head, laid out as the official fine-tuned checkpoints
(``mae_finetuned_vit_{base,large,huge}.pth``) are: the encoder's names, then

- ``global_pool="avg"`` (the fine-tuning default): the patch tokens are averaged and normalised
  by ``fc_norm``; the encoder's final ``norm`` is not used and has no parameters;
- ``global_pool="cls"`` (the linear-probing default): the class token after ``norm``;
- ``head``: a ``Linear``; for linear probing ``Sequential(BatchNorm1d(affine=False), Linear)``
  (keys ``head.0.running_*``, ``head.1.*``, as the official linear-probe checkpoints).

A pretraining checkpoint (official, ours, any form :func:`load_pretrained` reads) initialises
the encoder; ``fc_norm`` and ``head`` are new, the pretrained ``norm`` is dropped when pooling.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Optional

import torch
import torch.nn as nn
from timm.layers import trunc_normal_

from mae_transfer.checkpoint import CheckpointError, LoadReport, load_pretrained
from mae_transfer.data.transforms import Size, hw
from mae_transfer.matmul import route_linears
from mae_transfer.models import encoder_args
from mae_transfer.vit import VisionTransformer

__all__ = ["GLOBAL_POOLS", "ViTClassifier", "build_classifier", "load_classifier_checkpoint"]

logger = logging.getLogger(__name__)

GLOBAL_POOLS = ("avg", "cls")


class ViTClassifier(VisionTransformer):
    """A :class:`VisionTransformer` with a class token, a pooling and a classification head.

    Args:
        num_classes: outputs of the head.
        global_pool: ``"avg"`` (mean of the patch tokens, then ``fc_norm``) or ``"cls"``.
        probe: a linear probe's head, ``BatchNorm1d(D, affine=False, eps=1e-6)`` then ``Linear``.
        head_init_std: std of the head weights' truncated normal (official: 2e-5 fine-tuning,
            0.01 linear probing); the bias starts at 0.
        **kwargs: :class:`VisionTransformer` arguments (sizes, ``drop_path_rate``, ...).
    """

    def __init__(
        self,
        num_classes: int = 1000,
        global_pool: str = "avg",
        probe: bool = False,
        head_init_std: float = 2e-5,
        **kwargs,
    ):
        if global_pool not in GLOBAL_POOLS:
            raise ValueError(f"global_pool must be one of {GLOBAL_POOLS}, got {global_pool!r}")
        kwargs.setdefault("norm_layer", partial(nn.LayerNorm, eps=1e-6))
        super().__init__(class_token=True, **kwargs)
        dim = self.embed_dim
        self.global_pool = global_pool
        if global_pool == "avg":
            self.fc_norm = kwargs["norm_layer"](dim)
            self.norm = nn.Identity()  # as the official model: no final norm before pooling
        linear = nn.Linear(dim, num_classes)
        trunc_normal_(linear.weight, std=head_init_std)
        nn.init.zeros_(linear.bias)
        self.head = (
            nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), linear) if probe else linear
        )
        self.num_classes = num_classes
        route_linears(self.head)  # as the encoder's (VisionTransformer)

    @property
    def linear(self) -> nn.Linear:
        """The head's Linear layer (the head itself, or its last module for a probe)."""
        return self.head[-1] if isinstance(self.head, nn.Sequential) else self.head

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images -> (B, D): the feature the head classifies."""
        tokens = self.forward_features(x)  # normalised by ``norm`` for "cls", raw for "avg"
        if self.global_pool == "avg":
            return self.fc_norm(tokens[:, self.num_prefix_tokens :].mean(dim=1))
        return tokens[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) of images (B, C, H, W), or of pooled features (B, D) (the
        linear probe on cached features)."""
        return self.head(x if x.ndim == 2 else self.pooled(x))


def build_classifier(
    model: str,
    num_classes: int,
    input_size: Size = 224,
    global_pool: str = "avg",
    probe: bool = False,
    head_init_std: float = 2e-5,
    **kwargs,
) -> ViTClassifier:
    """A :class:`ViTClassifier` of the registered size ``model`` (``vit_base_patch16``; the MAE
    name ``mae_vit_base_patch16`` means the same encoder)."""
    args = dict(encoder_args(model), img_size=hw(input_size))
    args.update(kwargs)
    net = ViTClassifier(num_classes, global_pool, probe, head_init_std, **args)
    note_padding(net, input_size)
    return net


_PADDING_NOTED: set = set()


def note_padding(net: VisionTransformer, input_size: Size) -> None:
    """Warns when ``input_size`` is not a multiple of the patch size: the ViT then zero-pads
    every image at the bottom and right (the official code refuses such sizes). Once per size
    and patch in a process (the config check builds the model too)."""
    (h, w), p = hw(input_size), net.patch_size
    if (h % p or w % p) and (h, w, p) not in _PADDING_NOTED:
        _PADDING_NOTED.add((h, w, p))
        up, down = (-(-h // p) * p, -(-w // p) * p), (h // p * p, w // p * p)
        sizes = [down, up] if min(down) > 0 else [up]  # (below one patch: no smaller size)
        logger.warning(
            "input_size %dx%d is not a multiple of the patch size %d: every image is zero-padded "
            "to %dx%d (bottom and right); %s would not be",
            h, w, p, *up, " or ".join(f"{a}x{b}" for a, b in sizes),
        )  # fmt: skip


def load_classifier_checkpoint(
    model: ViTClassifier, path, need_head: bool = False, source: str = ""
) -> LoadReport:
    """Loads ``path`` (or a state dict read from ``source``) into ``model``, with the report.

    Args:
        need_head: the file must hold this model's trained head (``--eval`` of a fine-tuned or
            linear-probe checkpoint); otherwise the head and ``fc_norm`` may be new (a
            pretraining checkpoint initialising the encoder).
    """
    report = load_pretrained(model, path, source=source)
    path = source or path
    if need_head:
        head = [k for k in model.state_dict() if k.startswith(("head.", "fc_norm."))]
        absent = [k for k in head if k not in report.loaded]
        if absent:
            raise CheckpointError(
                f"{path} has no trained head for this model (missing: {', '.join(absent)}): "
                "evaluation needs a fine-tuned (or linear-probe) checkpoint of the same "
                "global_pool and number of classes; a pretraining checkpoint is for --finetune"
            )
    elif report.mismatched or report.missing or report.unexpected:
        logger.warning("the checkpoint did not fit cleanly, see the report above")
    return report


def head_dim_of(state_dict: dict) -> Optional[int]:
    """Number of classes of a classifier state dict's head (None without a head)."""
    for key in ("head.weight", "head.1.weight"):
        if key in state_dict:
            return int(state_dict[key].shape[0])
    return None
