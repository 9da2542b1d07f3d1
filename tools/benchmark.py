#!/usr/bin/env python
"""Benchmarks: how close pretraining and transfer run to this machine's limit.

    python tools/benchmark.py all --json bench.json            # everything (~40-55 min on 2 cores)
    python tools/benchmark.py pretrain --model mae_vit_base_patch16 --batch 8
    python tools/benchmark.py official                          # ours vs the official step
    python tools/benchmark.py data --feed_rates 3000            # input pipeline, loader workers
    python tools/benchmark.py table2 | maskratio | transfer | matmul
    python tools/benchmark.py pretrain --tiny --repeats 2       # seconds (what the tests run)

Every timing has a warm-up, then ``--repeats`` runs; the median and the spread (min-max) are
reported. Rivals (ours vs official; pipelines) run in one process, interleaved, and their ratio
is the median of back-to-back ratios. FLOPs come from fvcore (multiply-adds x 2; backward
counted as twice the forward). "Peak" is the matrix-multiply rate in the run's precision,
measured in the same run. Memory is the growth of the process's peak resident set (CPU) or
CUDA's peak allocation during the measured step, each case in a fresh process (``--tiny`` runs
them in this one: CPU memory is then not measured, n/a). A markdown table goes to stdout;
``--json`` writes every number (null: not measured). The logic lives in ``mae_transfer.benchmark``.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mae_transfer.benchmark import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(description=__doc__))
