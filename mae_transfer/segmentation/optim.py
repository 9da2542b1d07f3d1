"""Layer-wise lr decay for mmengine, on the MAE/timm parameter names (``blocks.N``), and a
loss-scaler-free autocast wrapper for bf16 training on GPUs and CPUs."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, List, Union

import torch
import torch.nn as nn
from mmengine.logging import print_log
from mmengine.optim import DefaultOptimWrapperConstructor, OptimWrapper
from mmseg.registry import OPTIM_WRAPPER_CONSTRUCTORS, OPTIM_WRAPPERS

from mae_transfer.optim import param_groups
from mae_transfer.pyramid import ViTPyramid


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class MAELayerDecayOptimizerConstructor(DefaultOptimWrapperConstructor):
    """Per-group lr = base lr x ``layer_decay_rate ** (depth + 1 - layer_id)``; no weight decay
    on norms, biases, position embeddings and relative position tables.

    ``paramwise_cfg=dict(layer_decay_rate=0.65)``; ``num_layers`` (the ViT depth) is read from
    the model when not given.
    """

    def add_params(self, params: List[dict], module: nn.Module, **kwargs) -> None:
        cfg = self.paramwise_cfg
        depth = cfg.get("num_layers") or _vit_depth(module)
        groups = param_groups(
            module.named_parameters(),
            weight_decay=self.base_wd or 0.0,
            layer_decay=cfg.get("layer_decay_rate", 1.0),
            depth=depth,
        )
        for g in groups:
            params.append(
                {
                    "params": g["params"],
                    "lr": self.base_lr * g["lr_scale"],
                    "weight_decay": g["weight_decay"],
                    "lr_scale": g["lr_scale"],
                }
            )
        print_log(
            f"layer decay {cfg.get('layer_decay_rate', 1.0)} over {depth} blocks: "
            f"{len(groups)} parameter groups, lr scales {min(g['lr_scale'] for g in groups):.3g}"
            f"-{max(g['lr_scale'] for g in groups):.3g}",
            logger="current",
        )


def _vit_depth(model: nn.Module) -> int:
    for m in model.modules():
        if isinstance(m, ViTPyramid):
            return m.vit.depth
    raise ValueError("no MAEViT backbone in the model; give paramwise_cfg num_layers")


@OPTIM_WRAPPERS.register_module()
class AutocastOptimWrapper(OptimWrapper):
    """OptimWrapper whose forward runs under ``torch.autocast(dtype)`` on the model's device, with
    no loss scaling: bf16 training on GPUs and on CPUs with native bf16.

    mmengine's ``AmpOptimWrapper`` runs on CUDA only and always holds a GradScaler, which bf16
    (fp32's exponent range) does not need. ``dtype``: 'bfloat16' (or 'float16', unscaled).
    """

    def __init__(self, dtype: Union[str, torch.dtype] = "bfloat16", **kwargs):
        super().__init__(**kwargs)
        self.cast_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype

    @contextmanager
    def optim_context(self, model: nn.Module) -> Iterator[None]:
        device_type = next(model.parameters()).device.type
        with super().optim_context(model), torch.autocast(device_type, dtype=self.cast_dtype):
            yield
