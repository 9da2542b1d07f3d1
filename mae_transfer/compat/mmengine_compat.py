"""Lets mmengine resume its own checkpoints under torch >= 2.6, where ``torch.load`` defaults
to ``weights_only=True``.

mmengine stores its message hub (``HistoryBuffer`` objects holding numpy arrays) in every
checkpoint; the safe unpickler refuses those classes. They are allow-listed here (plain data
containers), rather than turning ``weights_only`` off. ``HistoryBuffer`` also pickles its
statistics *functions* (through ``getattr``, which must never be allow-listed); they are left
out of the pickled state and restored from the class on load. A no-op on torch < 2.4.
"""

from __future__ import annotations

import numpy as np
import torch


def _numpy_globals() -> list:
    try:
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct, scalar
    dtypes = [type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool", "uint8")]
    return [_reconstruct, scalar, np.ndarray, np.dtype, *dtypes]


def _getstate(self) -> dict:
    state = dict(self.__dict__)
    state.pop("statistics_methods", None)  # functions: restored from the class, not pickled
    return state


def _setstate(self, state: dict) -> None:
    state = dict(state)
    state.pop("statistics_methods", None)
    self.__dict__.update(state)
    for name in ("min", "max", "current", "mean"):
        type(self)._statistics_methods.setdefault(name, getattr(type(self), name))


def apply() -> None:
    if not hasattr(torch.serialization, "add_safe_globals"):
        return
    try:
        from mmengine.logging.history_buffer import HistoryBuffer
    except ImportError:
        return
    HistoryBuffer.__getstate__ = _getstate
    HistoryBuffer.__setstate__ = _setstate
    torch.serialization.add_safe_globals([HistoryBuffer, *_numpy_globals()])


apply()
