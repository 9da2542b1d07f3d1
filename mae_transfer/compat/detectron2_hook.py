"""Applies :mod:`detectron2_compat` at the first ``import detectron2``, whoever imports it.

For the pure-Python detectron2 build only: ``tools/setup_env.sh`` installs a one-line ``.pth``
file that loads this file (by path, with the standard library only, so that starting Python
stays cheap). It puts an import hook in front of ``sys.meta_path``; the first import of
``detectron2`` runs the package as usual and then the compatibility fixes, so that
``from detectron2.modeling import ...`` works before or without ``import mae_transfer``.
"""

import importlib.abc
import importlib.util
import sys


class _Loader(importlib.abc.Loader):
    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        try:
            from mae_transfer.compat import detectron2_compat
        except ImportError:  # mae_transfer not importable here: leave detectron2 as it is
            return
        detectron2_compat.apply()


class Detectron2Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "detectron2":
            return None
        sys.meta_path.remove(self)  # once: the rest of detectron2 imports as usual
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


if "detectron2" not in sys.modules and not any(
    type(f).__name__ == "Detectron2Hook" for f in sys.meta_path
):
    sys.meta_path.insert(0, Detectron2Hook())
