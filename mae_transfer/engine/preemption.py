"""Stopping for a Slurm requeue where a checkpoint can be written.

Slurm signals a job some time before its time limit or a preemption (``USR2``, 120 s ahead
as :mod:`.slurm` asks). submitit's own handler requeues the job at once, from wherever the
training is: everything since the last checkpoint is trained again (up to a whole epoch with
``save_every_iters`` 0). :func:`install` puts a handler in its place that only records the
request, on every process. The trainer shares the request at its next log step (in the
all-reduce it makes there anyway: no host sync is added), writes ``checkpoint-last.pth`` at the
next update, on every process together, and raises :class:`PreemptionStop`; the job then calls
:func:`hand_over`, which runs submitit's handler: requeue (rank 0) and exit. If the trainer does
not get there within :data:`FALLBACK_S` (a stalled loader, a very long save), an alarm hands
over anyway: submitit's behaviour, with the last checkpoint written before.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Any, Optional

logger = logging.getLogger(__name__)

FALLBACK_S = 90  # seconds from the signal (120 s before the limit) to submitit's own requeue


class PreemptionStop(Exception):
    """Training stopped after writing its checkpoint, for the job to be requeued."""


class _Request:
    signum: Optional[int] = None  # the signal received (None: no request)
    original: Any = None  # the handler replaced by install()
    frame: Any = None
    pid: Optional[int] = None  # the process that installed it (not its forked loader workers)


_request = _Request()


def install(signum: int) -> None:
    """Records ``signum`` instead of acting on it at once (see the module docstring); once
    per process (a second call keeps the first's original handler)."""
    if signal.getsignal(signum) is not _record:
        _request.original = signal.getsignal(signum)
    _request.signum, _request.pid = None, os.getpid()
    signal.signal(signum, _record)


def _ours() -> bool:
    return os.getpid() == _request.pid  # loader workers inherit the handlers: not theirs


def _record(signum: int, frame: Any) -> None:
    if _ours() and _request.signum is None:
        logger.warning(
            "signal %s: the job will be requeued after writing a checkpoint at the next log "
            "step and update (within %d s, or requeued as it is)",
            signal.Signals(signum).name,
            FALLBACK_S,
        )
        _request.signum, _request.frame = signum, frame
        signal.signal(signal.SIGALRM, _fallback)
        signal.alarm(FALLBACK_S)


def _fallback(signum: int, frame: Any) -> None:
    if _ours():
        logger.warning("no checkpoint within %d s of the signal: requeued as it is", FALLBACK_S)
        hand_over()


def requested() -> bool:
    """Whether this process received the signal :func:`install` watches."""
    return _request.signum is not None


def hand_over(signum: Optional[int] = None) -> None:
    """Runs the handler :func:`install` replaced (submitit's: on rank 0 it calls the job's
    ``checkpoint()``, requeues and exits; elsewhere it returns), for the signal this process
    received or, when only another process received it, for ``signum``."""
    signal.alarm(0)
    original, signum = _request.original, _request.signum or signum
    if signum is not None and callable(original):
        original(signum, _request.frame)


def reset() -> None:
    """Forgets a request (tests)."""
    signal.alarm(0)
    _request.signum = _request.frame = None
