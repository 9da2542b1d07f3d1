"""MAE pretraining on the shared training loop: the model, the data and the loss.

Everything else (lr schedule, precision, accumulation, DDP, checkpoints, exact resume, logging)
is :class:`mae_transfer.engine.EpochTrainer`'s.
"""

from __future__ import annotations

from typing import Dict, List

import torch

from mae_transfer.checkpoint import find_state_dict, load_file, save_atomic
from mae_transfer.data.transforms import hw
from mae_transfer.engine.config import ConfigError
from mae_transfer.engine.trainer import LAST, EpochTrainer, NonFiniteLossError
from mae_transfer.optim import param_groups
from mae_transfer.registry import create_model

from .config import PretrainConfig
from .data import PretrainDataset

__all__ = ["LAST", "NonFiniteLossError", "Trainer", "export_encoder"]

CHECKPOINT_FORMAT = "mae-transfer-pretrain/1"


class Trainer(EpochTrainer):
    """MAE pretraining on one process, or one of many under torchrun / Slurm."""

    checkpoint_format = CHECKPOINT_FORMAT
    betas = (0.9, 0.95)  # the paper's AdamW betas for pretraining
    cfg: PretrainConfig

    def build_model(self) -> torch.nn.Module:
        cfg = self.cfg
        h, w = hw(cfg.input_size)
        model = create_model(
            cfg.model, img_size=(h, w), norm_pix_loss=cfg.norm_pix_loss, **cfg.model_kwargs
        )
        p = model.patch_size
        if h % p or w % p:
            raise ConfigError(
                f"input_size {cfg.input_size} is not a multiple of the patch size {p}"
            )
        if int(model.patch_embed.num_patches * (1 - cfg.mask_ratio)) < 1:
            raise ConfigError(
                f"mask_ratio {cfg.mask_ratio} keeps no patch of the {model.patch_embed.num_patches}"
            )
        return model

    def build_train_dataset(self) -> PretrainDataset:
        cfg = self.cfg
        return PretrainDataset(
            cfg.data_path,
            cfg.input_size,
            self.model.patch_embed.num_patches,
            seed=cfg.seed,
            repeats=cfg.dataset_repeats,
        )

    def param_groups(self) -> List[Dict]:
        return param_groups(
            self.model.named_parameters(), self.cfg.weight_decay, extra_no_decay=("mask_token",)
        )

    def compute_loss(self, imgs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        noise = noise if cfg.mask_noise == "per_sample" else None  # global: drawn in forward
        loss, _, _ = self.ddp(imgs, mask_ratio=cfg.mask_ratio, noise=noise)
        return loss

    def describe(self) -> str:
        return f"model {self.cfg.model}, " + super().describe().split(", ", 1)[1]


def export_encoder(checkpoint: str, output: str) -> int:
    """Writes the encoder of a pretraining checkpoint in the official ``{'model': ...}`` form."""
    state = find_state_dict(load_file(checkpoint))
    encoder = {k: v for k, v in state.items() if not k.startswith(("decoder_", "mask_token"))}
    save_atomic({"model": encoder}, output)
    return len(encoder)
