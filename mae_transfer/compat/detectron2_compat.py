"""Makes the pure-Python detectron2 0.6 release importable on current torch / numpy / Pillow.

Importing this module applies five fixes, each a no-op where the real thing exists (2 and 3
only with the pure-Python build, i.e. when ``detectron2._C`` is missing):

1. ``detectron2._C`` (detectron2's compiled ops) is absent from the registry's source release. A
   stand-in module is registered that raises a clear error when one of its ops is really called.
   Mask R-CNN + FPN does not use it (torchvision's ``roi_align`` and ``nms`` are used instead);
   deformable convolution, rotated boxes and the fast COCO evaluator do.
2. ``np.bool`` / ``np.int`` / ``np.float`` were removed in numpy 1.24; detectron2 0.6 uses them.
3. ``PIL.Image.LINEAR`` was removed in Pillow 10; detectron2 0.6 uses it as a default argument.
4. ``get_norm("LN", C)`` (channel LayerNorm for FPN and heads, the ViTDet recipe) came after
   0.6; it is added, with timm's ``LayerNorm2d``, when missing.
5. When a mapper returns None (an image it cannot use), detectron2's map-style ``MapDataset``
   draws another image with ``random.sample`` from a set, which Python 3.11 refuses
   (TypeError, training stops): its random generator is given one that samples from a set
   in sorted order, as older Pythons did (their set of small integers iterates sorted).

It must run before the first import of a detectron2 submodule: ``mae_transfer.detection``
imports it first, and ``tools/setup_env.sh`` installs an import hook
(:mod:`detectron2_hook`) that runs it at the first ``import detectron2`` from anywhere.
"""

from __future__ import annotations

import importlib.util
import random
import sys
import types

import numpy as np
from PIL import Image

__all__ = ["HAS_COMPILED_OPS", "apply"]

HAS_COMPILED_OPS = True


class MissingCompiledOp(AttributeError):
    """An op of detectron2's C++/CUDA extension was used with the pure-Python build."""


class _MissingOps(types.ModuleType):
    """Stands in for ``detectron2._C``; any op lookup raises an error that says why."""

    def get_compiler_version(self) -> str:
        return "none (pure-Python detectron2 build)"

    def get_cuda_version(self) -> str:
        return "none"

    def has_cuda(self) -> bool:
        return False

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        other_way = _PYTHON_ALTERNATIVES.get(name, "")
        raise MissingCompiledOp(
            f"detectron2._C.{name} is a compiled op, and this detectron2 is the pure-Python build "
            "(no C++/CUDA ops: deformable conv, rotated boxes, fast COCO eval). Install detectron2 "
            f"from source (DETECTRON2_SOURCE=<path or git URL> tools/setup_env.sh) to use it"
            f"{other_way}."
        )


# ops with a pure-Python way round them, said in the error (the fast COCO evaluation's, which
# COCOEvaluator uses by default: a DefaultTrainer's usual build_evaluator failed after training)
_PYTHON_ALTERNATIVES = dict.fromkeys(
    ("InstanceAnnotation", "ImageEvaluation", "COCOevalAccumulate", "COCOevalEvaluateImages"),
    ", or evaluate with pycocotools' implementation: COCOEvaluator(..., use_fast_impl=False)",
)


def _patch_numpy() -> None:
    for name, value in (("bool", bool), ("int", int), ("float", float)):
        try:
            getattr(np, name)
        except AttributeError:
            setattr(np, name, value)


def _patch_pillow() -> None:
    if not hasattr(Image, "LINEAR"):
        Image.LINEAR = Image.BILINEAR


def _install_ops_stand_in() -> None:
    global HAS_COMPILED_OPS
    current = sys.modules.get("detectron2._C")
    if current is not None:
        HAS_COMPILED_OPS = not isinstance(current, _MissingOps)
        return
    if importlib.util.find_spec("detectron2._C") is not None:
        return
    HAS_COMPILED_OPS = False
    stub = _MissingOps("detectron2._C", "stand-in for detectron2's compiled ops (mae_transfer)")
    sys.modules["detectron2._C"] = stub
    sys.modules["detectron2"]._C = stub


def _add_layer_norm() -> None:
    if importlib.util.find_spec("detectron2") is None:
        return
    from detectron2.layers import batch_norm

    original = batch_norm.get_norm
    try:
        original("LN", 8)
        return
    except KeyError:
        pass

    def get_norm(norm, out_channels):
        if norm == "LN":
            from timm.layers import LayerNorm2d

            return LayerNorm2d(out_channels, eps=1e-6)
        return original(norm, out_channels)

    for name, module in list(sys.modules.items()):
        if name.startswith("detectron2") and vars(module).get("get_norm") is original:
            module.get_norm = get_norm


class _SetSamplingRandom(random.Random):
    """``random.Random`` whose ``sample`` also takes a set (sorted first)."""

    def sample(self, population, k, **kw):
        if isinstance(population, (set, frozenset)):
            population = sorted(population)
        return super().sample(population, k, **kw)


def _sample_from_sets() -> None:
    try:
        random.Random().sample({0}, 1)
        return
    except TypeError:
        pass
    from detectron2.data import common

    original = common.MapDataset.__init__
    if getattr(original, "_samples_sets", False):
        return

    def __init__(self, dataset, map_func):
        original(self, dataset, map_func)
        self._rng = _SetSamplingRandom(42)

    __init__._samples_sets = True
    common.MapDataset.__init__ = __init__


_applied = False


def apply() -> None:
    """Applies the fixes once; a no-op when detectron2 is not installed.

    The numpy and Pillow aliases are only added for the pure-Python build (no ``detectron2._C``):
    a compiled, current detectron2 needs neither, and gets no global changes from here.
    """
    global _applied
    if _applied or importlib.util.find_spec("detectron2") is None:
        return
    _applied = True  # before importing detectron2: the import hook calls apply() again
    import detectron2  # noqa: F401  (the package only; its submodules need the fixes below)

    _install_ops_stand_in()
    if not HAS_COMPILED_OPS:
        _patch_numpy()
        _patch_pillow()
    _add_layer_norm()
    _sample_from_sets()


apply()
