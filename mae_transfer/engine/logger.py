"""What a run reports: a progress bar with ETA, ``log.jsonl`` and TensorBoard (rank 0 only)."""

from __future__ import annotations

import json
import os
import sys
from typing import Dict, Mapping, Optional, Tuple

from tqdm import tqdm


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
        resumed_at: Optional[Tuple[int, int]] = None,
    ):
        """``resumed_at``: (epoch, global step) of the checkpoint a resumed run starts from;
        what the interrupted run logged after it (it is trained again) is dropped from
        ``log.jsonl`` and hidden in TensorBoard (``purge_step``), so no curve holds it twice."""
        self.output_dir, self.enabled = output_dir, enabled
        self.writer = None
        self.bar: Optional[tqdm] = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            os.makedirs(output_dir, exist_ok=True)
            purge = None
            if resumed_at is not None:
                self._drop_records_after(*resumed_at)
                purge = resumed_at[1] + 1
            self.writer = SummaryWriter(log_dir=log_dir or output_dir, purge_step=purge)

    def _drop_records_after(self, epoch: int, step: int) -> None:
        """Keeps the iteration records up to ``step`` and the epoch records before ``epoch``."""
        path = os.path.join(self.output_dir, "log.jsonl")
        if not os.path.isfile(path):
            return
        with open(path) as f:
            records = [json.loads(line) for line in f if line.strip()]
        kept = [
            r
            for r in records
            if not ("step" in r and r["step"] > step)
            and not ("train_loss" in r and r.get("epoch", -1) >= epoch)
        ]
        if len(kept) < len(records):
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
            os.replace(tmp, path)

    def progress(self, total: int, initial: int) -> tqdm:
        """The run's bar over all iterations (tqdm's rate and ETA); a quiet one off rank 0."""
        self.bar = tqdm(
            total=total,
            initial=initial,
            disable=not self.enabled,
            unit="it",
            dynamic_ncols=True,
            mininterval=1.0 if sys.stderr.isatty() else 10.0,
        )
        return self.bar

    def scalars(self, values: Mapping[str, float], step: float, prefix: str) -> None:
        if self.writer is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.writer.add_scalar(f"{prefix}/{k}", v, step)

    def record(self, record: Dict) -> None:
        """Appends one JSON line to ``log.jsonl``."""
        if not self.enabled:
            return
        with open(os.path.join(self.output_dir, "log.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")

    def last_record(self, key: str) -> Dict:
        """The last ``log.jsonl`` record holding ``key`` (empty when there is none)."""
        path = os.path.join(self.output_dir, "log.jsonl")
        found: Dict = {}
        if os.path.isfile(path):
            with open(path) as f:
                for line in f:
                    record = json.loads(line)
                    if key in record:
                        found = record
        return found

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
