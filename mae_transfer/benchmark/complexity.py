"""Multiply-adds and parameters of a detection or segmentation model built from its config
(tools/analyze_model.py), by top-level module, counted by fvcore on one image as the model
runs at test time (fused attention counted as its two matmuls)."""

from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch

from .measure import _sdpa_macs

# (GMACs, millions of parameters) per top-level module, and "total"
Rows = Dict[str, Tuple[float, float]]


def count(model: torch.nn.Module, inputs: tuple, prefix: str = "") -> Rows:
    """fvcore's count of ``model(*inputs)`` by the children of the module named ``prefix``
    in it (the whole model when '')."""
    from fvcore.nn import FlopCountAnalysis

    fca = FlopCountAnalysis(model, inputs)
    fca.set_op_handle("aten::scaled_dot_product_attention", _sdpa_macs)
    fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    by_module = fca.by_module()
    root = model.get_submodule(prefix.rstrip("."))
    rows = {}
    for name, child in root.named_children():
        params = sum(p.numel() for p in child.parameters())
        macs = by_module.get(prefix + name, 0)
        if params or macs:
            rows[name] = (macs / 1e9, params / 1e6)
    rows["total"] = (fca.total() / 1e9, sum(p.numel() for p in model.parameters()) / 1e6)
    return rows


class _TestTimeDetector(torch.nn.Module):
    """A detectron2 detector as fvcore can trace it: an image tensor in, its detections'
    tensors out (detectron2's own adapter, in detectron2.export, needs caffe2 in 0.6)."""

    def __init__(self, detector: torch.nn.Module):
        super().__init__()
        self.detector = detector

    def forward(self, image: torch.Tensor):
        h, w = image.shape[-2:]
        (out,) = self.detector([{"image": image, "height": h, "width": w}])
        found = out["instances"]
        masks = [found.pred_masks] if found.has("pred_masks") else []
        return (found.pred_boxes.tensor, found.scores, found.pred_classes, *masks)


def detector_complexity(config: str, opts: Sequence[str], size: Tuple[int, int]) -> Rows:
    """A detectron2 YAML config's model (tools/train_det.py's config rules), one image."""
    from detectron2.modeling import build_model

    from mae_transfer.detection.train import build_cfg

    cfg = build_cfg(config, [*opts, "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""])
    cfg.MODEL.VIT.PRETRAINED = ""
    model = _TestTimeDetector(build_model(cfg).eval())
    image = torch.rand(3, *size) * 255  # detections (and so the heads' work) need some texture
    with torch.no_grad():
        return count(model, (image,), "detector.")


def segmentor_complexity(config: str, options: Dict, size: Tuple[int, int]) -> Rows:
    """An mmseg config's segmentor (tools/test_seg.py's config rules), one image through the
    backbone and heads (``mode='tensor'``: no sliding window, no resizing back)."""
    from mmseg.registry import MODELS

    from mae_transfer.segmentation.runner import build_cfg

    cfg = build_cfg(config, options, for_training=False)
    model = MODELS.build(cfg.model).eval()
    with torch.no_grad():
        return count(model, (torch.zeros(1, 3, *size),))
