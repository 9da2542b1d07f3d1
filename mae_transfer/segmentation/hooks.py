"""A hook for mmengine's Runner: resumed runs draw the random numbers of uninterrupted ones.

Registered in mmseg's ``HOOKS``: ``tools/train_seg.py`` adds it; with mmengine's own Runner
(mmseg's ``tools/train.py``) name it, ``custom_hooks = [dict(type="TorchRNGStateHook")]``.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
from mmengine.hooks import Hook
from mmseg.registry import HOOKS


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
    def _state() -> Dict:
        state = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    @staticmethod
    def _restore(state: Dict) -> None:
        torch.set_rng_state(state["cpu"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        checkpoint.setdefault("meta", {})["torch_rng_state"] = self._state()

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        state = checkpoint.get("meta", {}).get("torch_rng_state")
        if state is None or not runner._resume or runner._randomness_cfg.get("diff_rank_seed"):
            return
        self._restore(state)

    def before_val(self, runner) -> None:
        self._before_val = self._state()

    def after_val(self, runner) -> None:
        if self._before_val is not None:
            self._restore(self._before_val)
            self._before_val = None
