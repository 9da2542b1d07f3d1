"""A hook for mmengine's Runner: resumed runs draw the random numbers of uninterrupted ones.

Registered in mmseg's ``HOOKS``: ``tools/train_seg.py`` adds it; with mmengine's own Runner
(mmseg's ``tools/train.py``) name it, ``custom_hooks = [dict(type="TorchRNGStateHook")]``.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
from mmengine.hooks import Hook
from mmseg.registry import HOOKS

from mae_transfer.engine.state import get_rng_state, set_rng_state


@HOOKS.register_module()
class TorchRNGStateHook(Hook):
    """Keeps torch's random state in each checkpoint and restores it on resume, so that the
    model's random draws (drop path) after a resume are those of the uninterrupted run.

    mmengine replays the data (its loop advances the loader past the iterations done, the
    workers seeded as before) but the model's generator restarted from the seed: a resumed run
    drifted from the uninterrupted one. Only torch's generators: numpy's and Python's drive the
    data, which the replay already reproduces. Skipped with ``diff_rank_seed`` (each rank's
    state would be needed; the checkpoint holds rank 0's).

    A validation leaves the state as it found it: it runs after the checkpoint of its
    iteration (the ADE20K recipe validates and saves at 16,000), and its data loader draws
    from the generator, which a resumed run, not validating there, did not."""

    priority = "VERY_LOW"

    def __init__(self) -> None:
        self._before_val: Optional[Dict] = None

    @staticmethod
    def _device() -> torch.device:
        """This process's device, whose CUDA generator is kept with the CPU's."""
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        checkpoint.setdefault("meta", {})["torch_rng_state"] = get_rng_state(self._device())

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        state = checkpoint.get("meta", {}).get("torch_rng_state")
        if state is None or not runner._resume or runner._randomness_cfg.get("diff_rank_seed"):
            return
        if "cpu" in state:  # saved before the pretraining's format was used here
            state = {"torch": state["cpu"], **{k: v for k, v in state.items() if k != "cpu"}}
        set_rng_state(state, self._device())

    def before_val(self, runner) -> None:
        self._before_val = get_rng_state(self._device())

    def after_val(self, runner) -> None:
        if self._before_val is not None:
            set_rng_state(self._before_val, self._device())
            self._before_val = None
