"""Benchmarks: how close pretraining, the input pipeline and transfer run to this machine's
limit, and how they compare with the official implementation measured side by side.

One module per concern: :mod:`.measure` (timing, memory, peak, profile, FLOPs),
:mod:`.official` (the official pretraining step, re-implemented as the baseline),
:mod:`.pretrain`, :mod:`.data`, :mod:`.transfer` (the sections), :mod:`.report` and
:mod:`.cli` (``tools/benchmark.py`` calls :func:`main`).
"""

from .cli import SECTIONS, main

__all__ = ["SECTIONS", "main"]
