"""What a run reports: a progress bar with ETA, ``log.jsonl`` and TensorBoard (rank 0 only)."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from typing import Dict, List, Mapping, Optional, Tuple

from tqdm import tqdm

from .state import move_aside


def json_safe(value):
    """``value`` with every non-finite float (NaN: what was not measured, e.g. top-5 of 5
    classes) as None, so that ``json.dumps`` writes strict JSON (``null``, not ``NaN``, which
    JSON parsers other than Python's refuse)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


logger = logging.getLogger(__name__)


def progress_bar(iterable=None, **kwargs) -> tqdm:
    """tqdm (rate and ETA) redrawn every second on a terminal and every 10 s into a file (a
    Slurm log), whose lines would otherwise pile up."""
    return tqdm(
        iterable, dynamic_ncols=True, mininterval=1.0 if sys.stderr.isatty() else 10.0, **kwargs
    )


class RunLogger:
    """Rank 0 writes ``output_dir/log.jsonl`` and TensorBoard events; other ranks write nothing.

    Args:
        output_dir: where ``log.jsonl`` goes.
        log_dir: TensorBoard directory (default: ``output_dir``).
        enabled: False on ranks other than 0.
    """

    def __init__(
        self,
        output_dir: str,
        log_dir: Optional[str],
        enabled: bool,
        resumed_at: Optional[Tuple[float, Optional[int]]] = None,
    ):
        """``resumed_at``: where a resumed run starts, as (epoch + fraction of it, global step
        or None when the step's size changed); what the interrupted run logged after that
        point (it is trained again) is dropped from ``log.jsonl`` and hidden in TensorBoard
        (``purge_step``), so that no curve holds it twice. A run that starts from scratch
        where one was killed before its first checkpoint moves that run's ``log.jsonl`` aside
        (``log.jsonl.old``) and hides its events.

        TensorBoard hides by step, and the two kinds of curves count differently: the
        per-iteration ones (``train/``) by global step, the per-epoch ones (``epoch/``) by
        epoch. Each kind has its own event files (the epoch curves in the ``epoch`` folder of
        the log directory), so each is cut where the resumed run starts."""
        self.output_dir, self.enabled = output_dir, enabled
        self.writers: Dict[str, object] = {}
        self.bar: Optional[tqdm] = None
        if enabled:
            os.makedirs(output_dir, exist_ok=True)
            purge_step = purge_epoch = None
            if resumed_at is not None:
                self._drop_records_after(resumed_at[0])
                purge_step = None if resumed_at[1] is None else resumed_at[1] + 1
                # the epoch the run resumes in is logged again, and those after it
                purge_epoch = int(resumed_at[0] + 1e-9)
            elif os.path.isfile(self.path):  # from scratch: nothing logged before is this run's
                aside = move_aside(self.path)
                logger.info("%s moved to %s: this run starts from scratch", self.path, aside)
                purge_step = purge_epoch = -1  # (the initial evaluation is logged at epoch -1)
            self.writers = _tensorboard_writers(log_dir or output_dir, purge_step, purge_epoch)

    @property
    def path(self) -> str:
        return os.path.join(self.output_dir, "log.jsonl")

    def records(self) -> List[Dict]:
        """The records of ``log.jsonl``; a line cut short (a kill mid-write) is skipped."""
        return self._read()[0]

    def _read(self) -> Tuple[List[Dict], int]:
        """(the records of ``log.jsonl``, how many of its lines could not be read)."""
        if not os.path.isfile(self.path):
            return [], 0
        out, unreadable = [], 0
        with open(self.path) as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    logger.warning("%s: skipping an unreadable line %r", self.path, line[:80])
                    unreadable += 1
        return out, unreadable

    def _drop_records_after(self, epoch: float) -> None:
        """Keeps the iteration records up to ``epoch`` (with its fraction) and the records of
        the epochs that ended before it."""
        records, unreadable = self._read()
        kept = [
            r
            for r in records
            if not ("step" in r and r.get("epoch", 0) > epoch + 1e-9)
            and not ("train_loss" in r and r.get("epoch", -1) >= int(epoch))
        ]
        # rewritten also to drop a line cut short by a kill: the next record would be
        # appended to it, and both lost
        if len(kept) < len(records) or unreadable:
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(json.dumps(json_safe(r), allow_nan=False) + "\n" for r in kept)
            os.replace(tmp, self.path)

    def progress(self, total: int, initial: int) -> tqdm:
        """The run's bar over all iterations (tqdm's rate and ETA); a quiet one off rank 0."""
        self.bar = progress_bar(total=total, initial=initial, disable=not self.enabled, unit="it")
        return self.bar

    def scalars(self, values: Mapping[str, float], step: float, prefix: str) -> None:
        """TensorBoard scalars ``prefix/key``: ``prefix`` "train" by global step, "epoch" by
        epoch."""
        writer = self.writers.get(prefix)
        if writer is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    writer.add_scalar(f"{prefix}/{k}", v, step)

    def record(self, record: Dict) -> None:
        """Appends one JSON line to ``log.jsonl``."""
        if not self.enabled:
            return
        with open(os.path.join(self.output_dir, "log.jsonl"), "a") as f:
            f.write(json.dumps(json_safe(record), allow_nan=False) + "\n")

    def last_record(self, key: str) -> Dict:
        """The last ``log.jsonl`` record holding ``key`` (empty when there is none)."""
        found: Dict = {}
        for record in self.records():
            if key in record:
                found = record
        return found

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        for writer in self.writers.values():
            writer.close()


def _tensorboard_writers(log_dir: str, purge_step, purge_epoch) -> Dict[str, object]:
    """The two SummaryWriters (per iteration; per epoch, in ``log_dir/epoch``), or none where
    TensorBoard is not installed (the core install: ``log.jsonl`` holds the same values)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch's module imports the tensorboard package
        logger.warning(
            "tensorboard is not installed: no TensorBoard event files (log.jsonl has every "
            "value); pip install tensorboard, or mae-transfer[train], to have them"
        )
        return {}
    return {
        "train": SummaryWriter(log_dir=log_dir, purge_step=purge_step),
        "epoch": SummaryWriter(log_dir=os.path.join(log_dir, "epoch"), purge_step=purge_epoch),
    }
