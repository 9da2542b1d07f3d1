"""What a run reports: a progress bar with ETA, ``log.jsonl`` and TensorBoard (rank 0 only)."""

from __future__ import annotations

import json
import os
import sys
from typing import Dict, Mapping, Optional

from tqdm import tqdm


class RunLogger:
    """Rank 0 writes ``output_dir/log.jsonl`` and TensorBoard events; other ranks write nothing.

    Args:
        output_dir: where ``log.jsonl`` goes.
        log_dir: TensorBoard directory (default: ``output_dir``).
        enabled: False on ranks other than 0.
    """

    def __init__(self, output_dir: str, log_dir: Optional[str], enabled: bool):
        self.output_dir, self.enabled = output_dir, enabled
        self.writer = None
        self.bar: Optional[tqdm] = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            os.makedirs(output_dir, exist_ok=True)
            self.writer = SummaryWriter(log_dir=log_dir or output_dir)

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
