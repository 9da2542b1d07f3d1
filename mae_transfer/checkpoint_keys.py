"""Other codebases' names for the MAE ViT's tensors, read as ours (the official MAE / timm names).

:data:`KEY_TABLE` is the one place where another codebase's key becomes ours:

- **OpenMMLab**: mmseg's ``MAE`` / ``BEiT`` backbones (files made by mmseg's ``beit2mmseg``
  converter, mmseg's segmentors) and mmpretrain's ``VisionTransformer`` and MAE (backbone under
  ``backbone.``, decoder under ``neck.``, a classifier's head under ``head.``);
- **Hugging Face** transformers: ``ViTMAEModel`` / ``ViTMAEForPreTraining`` (encoder under
  ``vit.``, decoder under ``decoder.``) and ``ViTModel`` / ``ViTForImageClassification``.

Where a codebase keeps apart what timm's ``Attention`` holds as one tensor (Hugging Face's
``query`` / ``key`` / ``value``; BEiT's ``q_bias`` / ``v_bias`` without a k bias), the parts
are concatenated (:data:`FUSED`). Names the table does not know are kept as they are, so a load
report lists them (unexpected, or dropped) under their own names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

OUR_ANCHOR = "patch_embed.proj.weight"

# Their name -> ours. Names ending in "." are prefixes (".weight" / ".bias" follow); "{i}" is a
# block index. "encoder": relative to where their ViT sits ("backbone.", "vit." or nothing);
# "block": inside one of its blocks (the decoder's blocks too); "beside": relative to the model
# that holds the ViT (a pretraining model's decoder, a classifier's head).
KEY_TABLE: Dict[str, Dict[str, Dict[str, str]]] = {
    "OpenMMLab": {
        "encoder": {
            "patch_embed.projection.": "patch_embed.proj.",
            "cls_token": "cls_token",
            "pos_embed": "pos_embed",
            "layers.{i}.": "blocks.{i}.",
            "ln1.": "norm.",  # final_norm=True (beit2mmseg files keep the official "norm.")
            "ln2.": "fc_norm.",  # mmpretrain's norm after average pooling (out_type avg_featmap)
        },
        "block": {
            "ln1.": "norm1.",
            "attn.qkv.": "attn.qkv.",
            "attn.q_bias": "attn.q_bias",  # BEiT: q and v biases only, see FUSED
            "attn.v_bias": "attn.v_bias",
            "attn.relative_position_bias_table": "attn.relative_position_bias_table",
            "attn.proj.": "attn.proj.",
            "gamma_1": "ls1.gamma",  # mmseg's layer scale
            "attn.gamma1.weight": "ls1.gamma",  # mmpretrain's
            "ln2.": "norm2.",
            "ffn.layers.0.0.": "mlp.fc1.",
            "ffn.layers.1.": "mlp.fc2.",
            "gamma_2": "ls2.gamma",
            "ffn.gamma2.weight": "ls2.gamma",
        },
        "beside": {  # mmpretrain's MAE: MAEPretrainDecoder as the neck; its classifiers' heads
            "neck.mask_token": "mask_token",
            "neck.decoder_pos_embed": "decoder_pos_embed",
            "neck.decoder_embed.": "decoder_embed.",
            "neck.decoder_blocks.{i}.": "decoder_blocks.{i}.",
            "neck.ln1.": "decoder_norm.",
            "neck.decoder_pred.": "decoder_pred.",
            "head.fc.": "head.",  # LinearClsHead
            "head.layers.head.": "head.",  # VisionTransformerClsHead
        },
    },
    "Hugging Face": {
        "encoder": {
            "embeddings.patch_embeddings.projection.": "patch_embed.proj.",
            "embeddings.cls_token": "cls_token",
            "embeddings.position_embeddings": "pos_embed",
            "encoder.layer.{i}.": "blocks.{i}.",
            "layernorm.": "norm.",
        },
        "block": {
            "layernorm_before.": "norm1.",
            "attention.attention.query.": "attn.q.",  # see FUSED
            "attention.attention.key.": "attn.k.",
            "attention.attention.value.": "attn.v.",
            "attention.output.dense.": "attn.proj.",
            "layernorm_after.": "norm2.",
            "intermediate.dense.": "mlp.fc1.",
            "output.dense.": "mlp.fc2.",
        },
        "beside": {  # ViTMAEForPreTraining's decoder; ViTForImageClassification's head
            "decoder.mask_token": "mask_token",
            "decoder.decoder_pos_embed": "decoder_pos_embed",
            "decoder.decoder_embed.": "decoder_embed.",
            "decoder.decoder_layers.{i}.": "decoder_blocks.{i}.",
            "decoder.decoder_norm.": "decoder_norm.",
            "decoder.decoder_pred.": "decoder_pred.",
            "classifier.": "head.",
        },
    },
}

# What timm's Attention holds as one tensor and others keep apart: our fused name -> its parts
# (block names after KEY_TABLE), concatenated along dim 0 in this order. None is zeros: BEiT
# learns no k bias (it would not change the attention: softmax ignores a shift that all keys
# share).
FUSED: Dict[str, Tuple[Tuple[Optional[str], ...], ...]] = {
    "attn.qkv.weight": (("attn.q.weight", "attn.k.weight", "attn.v.weight"),),
    "attn.qkv.bias": (
        ("attn.q.bias", "attn.k.bias", "attn.v.bias"),
        ("attn.q_bias", None, "attn.v_bias"),
    ),
}


@dataclass
class Renaming:
    """What :func:`to_timm_names` did: the codebase whose names it read ('' for ours) and the
    tensors it fused, as ``'blocks.0.attn.qkv.bias <- q_bias, zeros, v_bias'``."""

    scheme: str = ""
    fused: List[str] = field(default_factory=list)


def to_timm_names(state: Mapping[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], Renaming]:
    """``state`` in our names, whatever codebase named it (see module docstring).

    The ViT's prefix is kept (``backbone.`` stays in front of ``patch_embed.proj.weight``),
    and the tensors beside it that the table knows (a decoder, a head) move under that prefix;
    a state dict already in our names comes back with only :data:`FUSED` applied. Idempotent.
    """
    scheme, prefix = find_scheme(state)
    out: Dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = _rename(key, scheme, prefix) if scheme else key
        if new != key and (new in out or new in state):  # a name taken twice: left as it was
            new = key
        out[new] = value
    out, fused = _fuse(out)
    return out, Renaming(scheme, fused)


def find_scheme(state: Mapping[str, torch.Tensor]) -> Tuple[str, str]:
    """(codebase of ``state``'s names, the prefix its ViT sits under), found by its name of the
    patch embedding's weight; ('', '') when the names are ours, or no codebase's here."""
    if any(_is_name(k, OUR_ANCHOR) for k in state):
        return "", ""
    for scheme in KEY_TABLE:
        anchor = anchor_of(scheme)
        prefixes = [k[: -len(anchor)] for k in state if _is_name(k, anchor)]
        if prefixes:
            return scheme, min(prefixes, key=len)
    return "", ""


def anchor_of(scheme: str) -> str:
    """``scheme``'s name of our ``patch_embed.proj.weight`` (relative to its ViT)."""
    encoder = KEY_TABLE[scheme]["encoder"]
    theirs = [t for t, ours in encoder.items() if ours + "weight" == OUR_ANCHOR]
    return theirs[0] + "weight"


def _is_name(key: str, name: str) -> bool:
    """True when ``key`` is ``name`` or ends with ``.name`` (``x.patch_embed.proj.weight``)."""
    return key == name or key.endswith("." + name)


def _rename(key: str, scheme: str, prefix: str) -> str:
    """``key`` in our names: under ``prefix`` by the encoder table, beside it by the 'beside'
    one (and moved under ``prefix``); unchanged when no entry matches."""
    sections = _COMPILED[scheme]
    if key.startswith(prefix):
        new = _match(key[len(prefix) :], sections["encoder"], sections["block"])
        if new is not None:
            return prefix + new
    parent = prefix[: prefix.rstrip(".").rfind(".") + 1]  # "a.b." -> "a.", "vit." -> ""
    if key.startswith(parent):
        new = _match(key[len(parent) :], sections["beside"], sections["block"])
        if new is not None:
            return prefix + new
    return key


def _match(name: str, entries: Sequence, block: Sequence) -> Optional[str]:
    """``name`` by the first entry that matches it (a block's inside by ``block``), or None."""
    for pattern, ours in entries:
        found = pattern.match(name)
        if not found:
            continue
        rest = name[found.end() :]
        if found.groups():  # a block: what follows its index, by the block entries
            inside = _match(rest, block, ()) if block else None
            return ours.format(i=found.group(1)) + (rest if inside is None else inside)
        return ours + rest
    return None


def _compile(entries: Mapping[str, str]) -> List[Tuple[re.Pattern, str]]:
    """(regex, our name) per entry, the longest names first: a prefix ends with '.', a whole
    name must match to its end, '{i}' takes a block index."""
    out = []
    for theirs in sorted(entries, key=len, reverse=True):
        pattern = re.escape(theirs).replace(r"\{i\}", r"(\d+)")
        out.append(
            (re.compile(pattern if theirs.endswith(".") else pattern + "$"), entries[theirs])
        )
    return out


_COMPILED = {
    scheme: {section: _compile(entries) for section, entries in sections.items()}
    for scheme, sections in KEY_TABLE.items()
}


def _fuse(state: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Concatenates the parts of :data:`FUSED` wherever all of them are present (and the fused
    tensor is not) and fit together (parts of another width are left apart, for the load
    report to list); returns the new state and what was fused."""
    fused = []
    for target, alternatives in FUSED.items():
        for parts in alternatives:
            first = parts[0]
            for key in [k for k in state if _is_name(k, first)]:
                base = key[: -len(first)]
                names = [base + p if p else None for p in parts]
                if base + target in state or any(n is not None and n not in state for n in names):
                    continue
                if not _fit_together([state[n] for n in names if n is not None]):
                    continue
                like = state[key]
                tensors = [state.pop(n) if n else torch.zeros_like(like) for n in names]
                state[base + target] = torch.cat(tensors, dim=0)
                parts_named = ", ".join(_short(n[len(base) :]) if n else "zeros" for n in names)
                fused.append(f"{base + target} <- {parts_named}")
    return state, fused


def _fit_together(parts: Sequence[torch.Tensor]) -> bool:
    """True when ``parts`` can be concatenated along dim 0 (torch.cat would raise otherwise)."""
    return all(p.ndim > 0 for p in parts) and len({p.shape[1:] for p in parts}) == 1


def _short(part: str) -> str:
    """'q.weight' for 'attn.q.weight': a part's name in a report line."""
    return part[len("attn.") :] if part.startswith("attn.") else part
