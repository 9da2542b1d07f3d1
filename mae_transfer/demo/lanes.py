"""Independent seeded runs, executed in parallel "lanes": one fresh process per run.

The demo's runs are small (a 0.5M-parameter ViT, 96 px images): one process barely uses a
second core, so two single-threaded processes finish two runs in about the time one takes.
Each run gets a fresh process (nothing leaks from one run into the next) and a fixed thread
count, so its result depends only on its own settings and seed, not on what ran beside it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch

logger = logging.getLogger(__name__)


@dataclass
class Job:
    """One run: ``function`` ("module:name") is called with ``kwargs`` in a fresh process."""

    name: str
    function: str
    kwargs: Dict[str, Any] = field(default_factory=dict)
    log: Optional[str] = None  # the run's stdout / stderr go here (None: inherited)
    cost: float = 1.0  # relative duration, for scheduling the longest runs first


def _call(job: Job, threads: int) -> Dict[str, Any]:
    torch.set_num_threads(threads)
    module, name = job.function.split(":")
    fn: Callable[..., Dict] = getattr(importlib.import_module(module), name)
    start = time.time()
    if job.log is None:
        result = fn(**job.kwargs)
    else:
        os.makedirs(os.path.dirname(os.path.abspath(job.log)), exist_ok=True)
        with open(job.log, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
            logging.basicConfig(stream=f, level=logging.INFO, force=True)
            result = fn(**job.kwargs)
    return {**result, "seconds": time.time() - start}


def run_jobs(jobs: List[Job], lanes: int = 2, threads: int = 1) -> Dict[str, Dict[str, Any]]:
    """Runs every job (longest first) in ``lanes`` parallel processes; {job name: result}.

    ``lanes=0`` runs them one after the other in this process, printing to its console.
    """
    order = sorted(jobs, key=lambda j: -j.cost)
    results: Dict[str, Dict[str, Any]] = {}
    if lanes == 0:
        for job in order:
            results[job.name] = _call(dataclasses.replace(job, log=None), torch.get_num_threads())
            _report(job, results[job.name])
        return results
    ctx = mp.get_context("spawn")  # no forked torch / framework state
    with _exit_on_sigterm(), ctx.Pool(lanes, maxtasksperchild=1) as pool:
        pending = [(job, pool.apply_async(_call, (job, threads))) for job in order]
        for job, handle in pending:
            results[job.name] = handle.get()
            _report(job, results[job.name])
    return results


@contextlib.contextmanager
def _exit_on_sigterm():
    """SIGTERM raises SystemExit here, so the pool's ``with`` block terminates the workers (by
    default a terminated parent leaves its running workers behind, orphaned)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _report(job: Job, result: Dict[str, Any]) -> None:
    shown = {k: round(v, 1) for k, v in result.items() if isinstance(v, float) and k != "seconds"}
    logger.info("%s: %s (%.0f s)", job.name, shown, result["seconds"])
