"""Parameter groups: no weight decay on norms/biases/tokens/position tables, layer-wise lr decay.

One rule for pretraining, detectron2 and mmseg. A parameter's layer id is 0 for the patch and
position embeddings (and class token), ``i + 1`` for ViT block ``i``, and ``depth + 1`` for
everything after the ViT (final norm, pyramid, FPN, heads); its lr scale is
``decay ** (depth + 1 - layer_id)``, so the heads train at the full lr (as in MAE's
``param_groups_lrd``, ViTDet's ``get_vit_lr_decay_rate`` and BEiT's layer-decay constructor).
"""

from __future__ import annotations

import contextlib
import re
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

# Name fragments of parameters that never get weight decay (besides 1-d params and biases).
NO_DECAY_KEYWORDS = (
    "pos_embed",
    "cls_token",
    "mask_token",
    "rel_pos_h",
    "rel_pos_w",
    "relative_position_bias_table",
)
_BLOCK_RE = re.compile(r"(?:^|\.)blocks\.(\d+)\.")
_EMBED_RE = re.compile(r"(?:^|\.)(?:patch_embed|pos_embed|cls_token)(?:\.|$)")


def no_weight_decay(name: str, param: nn.Parameter, extra: Iterable[str] = ()) -> bool:
    """True for biases, norm weights and other 1-d parameters, tokens and position tables."""
    if param.ndim <= 1 or name.endswith(".bias"):
        return True
    last = name.rsplit(".", 1)[-1]
    return last in NO_DECAY_KEYWORDS or any(k in name for k in extra)


def vit_layer_id(name: str, depth: int) -> int:
    """Layer id of a parameter name for layer-wise lr decay (see module docstring)."""
    if _EMBED_RE.search(name) and "decoder" not in name:
        return 0
    m = _BLOCK_RE.search(name)
    if m and "decoder" not in name:
        return int(m.group(1)) + 1
    return depth + 1


def param_groups(
    named_params: Iterable[Tuple[str, nn.Parameter]],
    weight_decay: float,
    layer_decay: float = 1.0,
    depth: Optional[int] = 0,
    extra_no_decay: Sequence[str] = (),
) -> List[Dict]:
    """Optimizer parameter groups with ``weight_decay`` and an ``lr_scale`` per group.

    Args:
        named_params: (name, parameter) pairs; frozen ones are skipped.
        weight_decay: decay for matrices; 0 for the parameters of :func:`no_weight_decay`.
        layer_decay: per-layer lr decay (1.0 = none); needs ``depth``.
        depth: the ViT's block count (``model.depth``); only read with layer decay.
        extra_no_decay: more name fragments exempt from weight decay.

    Returns:
        groups with keys ``params``, ``param_names``, ``weight_decay``, ``lr_scale``, sorted by
        layer id and then by decay.

    Raises:
        ValueError: layer decay without a depth of at least 1.
    """
    if layer_decay != 1.0 and (depth or 0) < 1:
        raise ValueError(
            f"layer_decay={layer_decay} needs depth, the ViT's block count (e.g. "
            f"depth=model.depth), got depth={depth!r}: without it the lr scales grow with the "
            "block index instead of decaying"
        )
    depth = depth or 0  # None without layer decay: one lr scale, 1
    groups: Dict[Tuple[int, bool], Dict] = {}
    for name, p in named_params:
        if not p.requires_grad:
            continue
        skip = no_weight_decay(name, p, extra_no_decay)
        layer = vit_layer_id(name, depth) if layer_decay != 1.0 else depth + 1
        key = (layer, skip)
        if key not in groups:
            groups[key] = {
                "params": [],
                "param_names": [],
                "weight_decay": 0.0 if skip else weight_decay,
                "lr_scale": layer_decay ** (depth + 1 - layer),
            }
        groups[key]["params"].append(p)
        groups[key]["param_names"].append(name)
    return [groups[k] for k in sorted(groups)]


OPTIMIZER_IMPL_KEYS = ("fused", "foreach", "capturable", "differentiable")


@contextlib.contextmanager
def keep_optimizer_impl(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Keeps this run's optimizer implementation (fused / foreach ...) across a state load.

    ``Optimizer.load_state_dict`` restores every saved group option, so a checkpoint of a fused
    AdamW turns fused back on in a run that chose it off (fp16 with clipping), and a non-fused
    checkpoint turns it off in a fused run, whose GradScaler then hands the step a grad_scale
    that only the fused kernel accepts (fp16: an assertion error at the first step).

    The load also placed each parameter's ``step`` count by the *saved* flags: on the
    parameter's device for a fused (or capturable) optimizer, on the CPU otherwise. It is
    moved to where this run's implementation reads it: a CPU count in a fused CUDA kernel is
    an illegal memory access, a CUDA count in the foreach loop one host sync per parameter.
    """
    chosen = [{k: g[k] for k in OPTIMIZER_IMPL_KEYS if k in g} for g in optimizer.param_groups]
    yield
    for group, keys in zip(optimizer.param_groups, chosen):
        group.update(keys)
        on_device = group.get("fused") or group.get("capturable")
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if torch.is_tensor(state.get("step")):
                where = p.device if on_device else torch.device("cpu")
                state["step"] = state["step"].to(where, torch.float32)
