"""MODEL.WEIGHTS that may be an MAE/ViT checkpoint (official, ours) or a detectron2 one."""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
from detectron2.checkpoint import DetectionCheckpointer

from mae_transfer.checkpoint import (
    ANCHOR_KEY,
    CheckpointError,
    find_state_dict,
    load_array_pickle,
    load_file,
    load_pretrained,
    mismatch_phrases,
    save_atomic,
    strip_to_vit,
)
from mae_transfer.vit import VisionTransformer

from .config import FPN_BACKBONE, PYRAMID_BACKBONE, SIMPLE_FPN_BACKBONE

logger = logging.getLogger(__name__)


def load_pkl(path: str) -> Dict[str, Any]:
    """A detectron2 / Detectron (Caffe2) model-zoo ``.pkl`` in detectron2's checkpoint form,
    read as detectron2 reads it but with only arrays allowed in the pickle (detectron2's own
    ``pickle.load`` runs whatever the file asks for)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    data = load_array_pickle(path)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a {type(data).__name__}, not a dict of weights")
    if "model" in data and "__author__" in data:  # detectron2's model zoo
        return data
    data = data.get("blobs", data)  # Caffe2 / Detectron: detection models keep them in blobs
    data = {k: v for k, v in data.items() if not k.endswith("_momentum")}
    return {"model": data, "__author__": "Caffe2", "matching_heuristics": True}


# Where each backbone's ViT sits in a detector (MODEL.BACKBONE.NAME -> key prefix). The simple
# pyramid's is ViTDet's (its ViT is `net` of SimpleFeaturePyramid), so ViTDet detectors load
# into it by name.
VIT_PREFIXES = {
    FPN_BACKBONE: "backbone.bottom_up.vit.",
    PYRAMID_BACKBONE: "backbone.vit.",
    SIMPLE_FPN_BACKBONE: "backbone.net.",
}
D2_VIT_PREFIX = VIT_PREFIXES[FPN_BACKBONE]


def find_vit(model: nn.Module) -> Tuple[str, VisionTransformer]:
    """(dotted name, module) of the ViT inside a detector built with our backbone."""
    for name, module in model.named_modules():
        if isinstance(module, VisionTransformer):
            return name, module
    raise ValueError("the model has no MAE ViT backbone (MODEL.BACKBONE.NAME build_mae_vit_*)")


DETECTOR_HEADS = ("roi_heads.", "proposal_generator.")
OUR_VIT_PREFIXES = tuple(VIT_PREFIXES.values())


def is_vit_source(state: Dict[str, Any], vit_prefix: Optional[str] = None) -> bool:
    """True for checkpoints of which only the ViT can be used here: MAE / ViT files (ours,
    official, a classifier), and other models holding a ViT (an mmseg segmentor, a detector
    with another backbone, a backbone-only conversion); False for detectors of the model's kind
    (their ViT where the model's sits, ``vit_prefix``, e.g. 'backbone.net.', or any of ours
    when None; and detection heads) and checkpoints without a ViT (detectron2's own path). A
    ViTDet detector is of the simple pyramid's kind."""
    vit, prefix = strip_to_vit(state)
    if ANCHOR_KEY not in vit:
        return False
    kind = OUR_VIT_PREFIXES if vit_prefix is None else (vit_prefix,)
    ours = prefix in kind and any(k.startswith(DETECTOR_HEADS) for k in state)
    return not ours


class MAECheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer that also takes MAE checkpoints for the backbone's ViT.

    A bare ViT/MAE file (``mae_pretrain_vit_*.pth``, a full MAE checkpoint, our pretraining
    checkpoint or ``encoder.pth``) is loaded into the ViT with position tables resized, and a
    report says what loaded, what is new and what was dropped. Anything else (detectron2
    checkpoints, for fine-tuning or resuming) goes through detectron2's own loading.

    ``whole_model=True`` (evaluating or drawing a trained detector): the file must fill the
    whole detector; a bare ViT/MAE file or missing, unexpected or mis-shaped tensors raise
    :class:`CheckpointError` instead of leaving heads at random.
    """

    def __init__(self, model, save_dir: str = "", *, whole_model: bool = False, **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self.whole_model = whole_model
        self._source = ""

    def _load_file(self, filename: str) -> Dict[str, Any]:
        self._source = filename
        if filename.endswith(".pkl"):  # a model zoo's (ViTDet's detectors are only .pkl files)
            loaded = load_pkl(filename)
            # as tensors (detectron2 converts them too) for the ViT's names to be read; a
            # Caffe2 / detectron2 ResNet holds no ViT and goes on to detectron2's loading
            state = loaded["model"] = {
                k: torch.as_tensor(v) if isinstance(v, np.ndarray) else v
                for k, v in loaded["model"].items()
            }
        else:
            loaded = load_file(filename)  # weights_only=True
            if filename.endswith(".pyth"):  # pycls, as detectron2 reads it
                return _pycls_checkpoint(loaded, filename)
            state = find_state_dict(loaded)
        if is_vit_source(state, self._vit_prefix()):
            if self.whole_model:
                raise CheckpointError(
                    f"{filename} holds a ViT but not a detector of this code with this "
                    "config's backbone (a ViT / MAE checkpoint, a detector with the other "
                    "pyramid (MODEL.BACKBONE.NAME), or another model's, e.g. a segmentor): the "
                    "detector's pyramid and heads would be random. Give a trained detector "
                    "(model_final.pth); train one with tools/train_det.py ... MODEL.WEIGHTS "
                    f"{filename}"
                )
            return {"model": state, "__mae__": True}
        if "model" in loaded:  # detectron2's own checkpoints (with optimizer, iteration, ...)
            return loaded
        return {"model": state}  # a bare or mmengine-style ({"state_dict": ...}) whole model

    def _unwrapped(self) -> nn.Module:
        return self.model.module if hasattr(self.model, "module") else self.model

    def _vit_prefix(self) -> Optional[str]:
        try:
            return find_vit(self._unwrapped())[0] + "."
        except ValueError:
            return None

    def _load_model(self, checkpoint: Dict[str, Any]):
        if not checkpoint.pop("__mae__", False):
            incompatible = super()._load_model(checkpoint)
            if self.whole_model:
                check_fits(incompatible, self._source)
            return incompatible
        model = self._unwrapped()
        vit_name, vit = find_vit(model)
        report = load_pretrained(vit, checkpoint.pop("model"), log=False, source=self._source)
        others = [k for k in model.state_dict() if not k.startswith(vit_name + ".")]
        (logger.info if report.ok else logger.warning)(
            "MAE weights into %s:\n%s\n  new outside the ViT (trained from scratch): %d tensors"
            " in %s",
            vit_name,
            report.summary(),
            len(others),
            ", ".join(module_groups(others)),
        )
        return None


def _pycls_checkpoint(loaded: Any, filename: str) -> Dict[str, Any]:
    """A pycls ``.pyth`` checkpoint in detectron2's form, as detectron2 reads it."""
    state = loaded.get("model_state") if isinstance(loaded, dict) else None
    if state is None:
        raise CheckpointError(f"{filename}: a pycls .pyth checkpoint has 'model_state'")
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    return {"model": state, "__author__": "pycls", "matching_heuristics": True}


def check_fits(incompatible, source: str) -> None:
    """Raises :class:`CheckpointError` naming what of a detectron2 load did not fit (the
    ``_IncompatibleKeys`` of detectron2's checkpointer)."""
    shapes = incompatible.incorrect_shapes
    reshaped = {k for k, _, _ in shapes}  # detectron2 lists them as missing too
    missing = [k for k in incompatible.missing_keys if k not in reshaped]
    parts = mismatch_phrases(
        missing, shapes, incompatible.unexpected_keys, lambda keys: ", ".join(module_groups(keys))
    )
    if not parts:
        return
    raise CheckpointError(
        f"{source} does not fit the detector of this config: {'; '.join(parts)}. Was it "
        "trained with another config or other KEY VALUE overrides (e.g. MODEL.VIT.*)?"
    )


def module_groups(names) -> list:
    """Parameter names collapsed to their top two modules (level numbers dropped), with counts:
    ['backbone.fpn_lateral (12)', 'backbone.simfp (32)', 'roi_heads.box_head (8)', ...]."""
    counts: Dict[str, int] = {}
    for name in names:
        parts = name.split(".")[:2]
        parts[-1] = parts[-1].rstrip("0123456789").rstrip("_") or parts[-1]
        key = ".".join(parts)
        counts[key] = counts.get(key, 0) + 1
    return [f"{k} ({n})" for k, n in counts.items()]


def convert_to_detectron2(src: str, dst: str, cfg) -> Dict[str, int]:
    """Writes an MAE/ViT checkpoint as a detectron2 one for the backbone of ``cfg``.

    Position tables are resized to the model's (``MODEL.VIT.IMG_SIZE``'s grid, or
    ``POS_EMBED_IMG_SIZE``'s) and a patch-14 kernel to 16, so the file loads into the detector
    with detectron2's plain DetectionCheckpointer.
    """
    from .backbone import build_vit_part

    _, vit = find_vit(build_vit_part(cfg, pretrained=False))
    report = load_pretrained(vit, src)
    loaded = {k for k in report.loaded}
    # where the ViT sits in the detector: under the FPN's bottom_up, the backbone itself, or
    # the simple pyramid's net
    prefix = VIT_PREFIXES.get(cfg.MODEL.BACKBONE.NAME, D2_VIT_PREFIX)
    state = {prefix + k: v for k, v in vit.state_dict().items() if k in loaded}
    save_atomic({"model": state, "__author__": "mae-transfer", "matching_heuristics": False}, dst)
    return {"written": len(state), "dropped": len(report.dropped), "new": len(report.new)}
