"""One registry of named model factories: MAE pretraining models and encoder-only ViTs.

>>> from mae_transfer import registry
>>> registry.list_models("mae_*")
>>> model = registry.create_model("mae_vit_base_patch16", norm_pix_loss=True)
"""

from __future__ import annotations

import fnmatch
from typing import Callable, Dict, List

import torch.nn as nn

_FACTORIES: Dict[str, Callable[..., nn.Module]] = {}


class UnknownModelError(KeyError):
    """A model name that is not registered; the message lists the registered ones."""

    def __str__(self) -> str:
        return str(self.args[0])


_ALIASES: Dict[str, str] = {}


def register_model(fn: Callable[..., nn.Module] = None, *, aliases: tuple = ()):
    """Decorator that registers a factory under its function name (and optional aliases)."""

    def wrap(f):
        name = f.__name__
        if name in _FACTORIES or name in _ALIASES:
            raise KeyError(f"model {name!r} is already registered")
        _FACTORIES[name] = f
        for alias in aliases:
            _ALIASES[alias] = name
        return f

    return wrap(fn) if fn is not None else wrap


def list_models(pattern: str = "*", include_aliases: bool = False) -> List[str]:
    """Sorted names of registered models matching a shell-style pattern."""
    names = list(_FACTORIES) + (list(_ALIASES) if include_aliases else [])
    return sorted(n for n in names if fnmatch.fnmatch(n, pattern))


def resolve_name(name: str) -> str:
    """Canonical name of a model or alias; a clear error listing the choices otherwise."""
    _ensure_registered()
    if name in _FACTORIES:
        return name
    if name in _ALIASES:
        return _ALIASES[name]
    raise UnknownModelError(
        f"unknown model {name!r}; registered: {', '.join(list_models(include_aliases=True))}"
    )


def patch_size_of(name: str) -> int:
    """The patch size a registered model's name ends with (``vit_huge_patch14``: 14)."""
    return int(resolve_name(name).rsplit("patch", 1)[-1])


def create_model(name: str, **kwargs) -> nn.Module:
    """Builds a registered model; keyword arguments override the factory's defaults."""
    return _FACTORIES[resolve_name(name)](**kwargs)


def _ensure_registered() -> None:
    # Factories live beside their architectures; importing the modules registers them.
    from . import models  # noqa: F401
