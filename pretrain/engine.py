"""MAE pretraining on the shared training loop: the model, the data and the loss.

Everything else (lr schedule, precision, accumulation, DDP, checkpoints, exact resume, logging)
is :class:`mae_transfer.engine.EpochTrainer`'s.
"""

from __future__ import annotations

import logging
from typing import Dict, List

import torch

from mae_transfer.checkpoint import (
    CheckpointError,
    find_state_dict,
    load_file,
    save_atomic,
    strip_to_vit,
)
from mae_transfer.classification.knn import KNNEvaluator
from mae_transfer.data import find_images
from mae_transfer.data.device_decode import PendingBatch, decode_on_device
from mae_transfer.data.transforms import hw, normalize
from mae_transfer.device import pin_memory_for
from mae_transfer.engine.config import ConfigError
from mae_transfer.engine.distributed import DistInfo, on_rank0
from mae_transfer.engine.trainer import LAST, EpochTrainer, NonFiniteLossError
from mae_transfer.optim import param_groups
from mae_transfer.registry import create_model

from .config import PretrainConfig, patch_problems
from .data import PretrainDataset

__all__ = ["LAST", "NonFiniteLossError", "Trainer", "export_encoder"]

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "mae-transfer-pretrain/1"


class Trainer(EpochTrainer):
    """MAE pretraining on one process, or one of many under torchrun / Slurm."""

    checkpoint_format = CHECKPOINT_FORMAT
    protocol = "pretraining"
    betas = (0.9, 0.95)  # the paper's AdamW betas for pretraining
    evaluate_at_start = True  # the k-NN curve starts at the initialisation
    cfg: PretrainConfig

    def __init__(self, cfg: PretrainConfig, device: torch.device, dist_info: DistInfo):
        self.knn = None
        if cfg.knn_train:  # first: bad k-NN folders are named before anything is written
            try:
                self.knn = KNNEvaluator(
                    cfg.knn_train,
                    cfg.knn_val,
                    cfg.input_size,
                    dist_info,
                    max_images=cfg.knn_max_images,
                    batch_size=cfg.batch_size,
                    num_workers=cfg.num_workers,  # a full ImageNet set is 1.28M decodes
                    seed=cfg.seed,
                    pin_memory=pin_memory_for(device, cfg.pin_mem),
                )
            except ConfigError as e:  # no class folders, other classes: named as this setting
                raise ConfigError(f"k-NN monitor (knn_train / knn_val): {e}") from e
        super().__init__(cfg, device, dist_info)
        if self.knn is not None:
            logger.info("k-NN monitor every %d epochs: %s", cfg.knn_every, self.knn.describe())

    def build_model(self) -> torch.nn.Module:
        cfg = self.cfg
        h, w = hw(cfg.input_size)
        model = create_model(
            cfg.model, img_size=(h, w), norm_pix_loss=cfg.norm_pix_loss, **cfg.model_kwargs
        )
        problems = patch_problems(cfg, model)
        if problems:
            raise ConfigError("; ".join(problems))
        return model

    def build_train_dataset(self) -> PretrainDataset:
        cfg = self.cfg
        if cfg.decode_on_device and self.device.type != "cuda":
            logger.warning(
                "decode_on_device on %s: JPEGs are decoded in the training process, on the CPU "
                "(the same images as the loader's uint8 pipeline, only slower)",
                self.device,
            )
        return PretrainDataset(
            cfg.data_path,
            cfg.input_size,
            self.model.patch_embed.num_patches,
            seed=cfg.seed,
            repeats=cfg.dataset_repeats,
            pipeline="device" if cfg.decode_on_device else "uint8",
            reduced_decode=cfg.reduced_decode,
            files=on_rank0(find_images, self.dist, cfg.data_path),  # one walk, not one per rank
        )

    def param_groups(self) -> List[Dict]:
        return param_groups(
            self.model.named_parameters(), self.cfg.weight_decay, extra_no_decay=("mask_token",)
        )

    def compute_loss(self, imgs, noise: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        noise = noise if cfg.mask_noise == "per_sample" else None  # global: drawn in forward
        images = self.prepare_images(imgs)
        loss, _, _ = self.ddp(images, mask_ratio=cfg.mask_ratio, noise=noise, loss_only=True)
        return loss

    def prepare_images(self, imgs) -> torch.Tensor:
        """The batch as it left the loader -> normalised float32 (N, 3, H, W) on the device.

        uint8 batches (the loader's pipeline) are normalised here, on the device; still-encoded
        ones (``decode_on_device``) are decoded, cropped and flipped first. Outside autocast:
        the inputs are fp32 whatever the precision, as with the official float pipeline.
        """
        with torch.autocast(self.device.type, enabled=False):
            if isinstance(imgs, PendingBatch):
                imgs, failed = decode_on_device(imgs, hw(self.cfg.input_size), self.device)
                self._window.skipped += failed  # counted as the loader's skipped files
            return normalize(imgs) if imgs.dtype == torch.uint8 else imgs

    def evaluate(self) -> Dict[str, float]:
        """The k-NN monitor of the encoder, every ``knn_every`` epochs and after the last one
        (the engine runs it in eval mode with the training's random streams set aside)."""
        cfg = self.cfg
        if self.knn is None or (self.epoch % cfg.knn_every and self.epoch != cfg.epochs):
            return {}
        metrics = self.knn(self.model, self.device, cfg.knn_pool, amp_dtype=self.amp_dtype)
        self.bar_extras["knn"] = f"{metrics['knn_k20_top1']:.1f}"
        logger.info(
            "k-NN after %d epochs: %s",
            self.epoch,
            ", ".join(f"{k} {v:.2f}" for k, v in metrics.items() if k.endswith("top1")),
        )
        return metrics

    def describe(self) -> str:
        return f"model {self.cfg.model}, " + super().describe().split(", ", 1)[1]


def export_encoder(checkpoint: str, output: str) -> int:
    """Writes the encoder of a pretraining checkpoint in the official ``{'model': ...}`` form.

    Raises:
        CheckpointError: the file is not an MAE pretraining checkpoint (a detector's or a
            segmentor's, whose ViT sits under a prefix, or a fine-tuned classifier's).
    """
    state = find_state_dict(load_file(checkpoint))
    _, prefix = strip_to_vit(state)
    if prefix or "patch_embed.proj.weight" not in state:
        found = f"its ViT sits under '{prefix}'" if prefix else "it holds no ViT encoder"
        raise CheckpointError(
            f"{checkpoint} is not an MAE pretraining checkpoint ({found}); export takes ours "
            "(checkpoint-*.pth) or an official mae_pretrain / mae_visualize file"
        )
    head = sorted(k for k in state if k.startswith(("head.", "fc_norm.")))
    if head:
        raise CheckpointError(
            f"{checkpoint} is a fine-tuned classifier ({', '.join(head[:2])}, ...), not a "
            "pretraining checkpoint: its encoder loads as it is wherever a ViT is expected"
        )
    encoder = {k: v for k, v in state.items() if not k.startswith(("decoder_", "mask_token"))}
    save_atomic({"model": encoder}, output)
    return len(encoder)
