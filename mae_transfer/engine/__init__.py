"""The training machinery shared by pretraining, fine-tuning and linear probing (torch only).

- :mod:`.config`: dataclass configs, YAML + flags, checks that report every bad value at once;
- :mod:`.distributed`: process groups for one process, torchrun and Slurm; small collectives;
- :mod:`.trainer`: :class:`EpochTrainer`, the loop (precision, accumulation, DDP, checkpoints,
  exact resume, non-finite stops, logging) that each protocol subclasses;
- :mod:`.schedule`, :mod:`.state`, :mod:`.logger`: the lr schedule, RNG and resume bookkeeping,
  progress bar / ``log.jsonl`` / TensorBoard.
"""

from .config import ConfigError, TrainConfig
from .distributed import DistInfo, cleanup, init_distributed
from .trainer import LAST, EpochTrainer, NonFiniteLossError

__all__ = [
    "LAST",
    "ConfigError",
    "DistInfo",
    "EpochTrainer",
    "NonFiniteLossError",
    "TrainConfig",
    "cleanup",
    "init_distributed",
]
