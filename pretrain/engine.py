"""The pretraining loop: one Trainer that builds everything from a config and runs it.

Read top to bottom: ``__init__`` builds model, data, optimizer and restores a checkpoint;
``train`` runs epochs; ``_train_epoch`` runs iterations; ``_step`` is one iteration.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from typing import Dict

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from mae_transfer.checkpoint import load_file, save_atomic
from mae_transfer.device import fused_adamw_supported, resolve_amp
from mae_transfer.optim import param_groups
from mae_transfer.registry import create_model

from .config import ConfigError, PretrainConfig, save_config
from .data import PretrainDataset, ResumableDistributedSampler, collate
from .distributed import DistInfo, all_reduce_sum, barrier

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "mae-transfer-pretrain/1"
LAST = "checkpoint-last.pth"


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stopped without writing a checkpoint."""


def cosine_lr(epoch: float, cfg: PretrainConfig, base_lr: float) -> float:
    """Linear warmup for ``warmup_epochs``, then half-cycle cosine to ``min_lr`` (per iteration)."""
    if epoch < cfg.warmup_epochs:
        return base_lr * epoch / cfg.warmup_epochs
    span = max(cfg.epochs - cfg.warmup_epochs, 1e-12)
    progress = min((epoch - cfg.warmup_epochs) / span, 1.0)
    return cfg.min_lr + (base_lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def input_hw(cfg: PretrainConfig) -> tuple:
    s = cfg.input_size
    return (s, s) if isinstance(s, int) else (int(s[0]), int(s[-1]))


class Trainer:
    """MAE pretraining on one process, or one of many under torchrun / Slurm."""

    def __init__(self, cfg: PretrainConfig, device: torch.device, dist_info: DistInfo):
        self.cfg, self.device, self.dist = cfg, device, dist_info
        # seed + rank as the official code: DDP broadcasts rank 0's initial weights, and with
        # mask_noise=global (noise drawn in the forward) every rank then draws its own masks
        torch.manual_seed(cfg.seed + dist_info.rank)
        self.model = self._build_model()
        self.loader, self.sampler = self._build_data()
        self.ipe = self.sampler.batches_per_epoch  # iterations per epoch
        eff_batch = cfg.batch_size * cfg.accum_iter * dist_info.world_size
        self.base_lr = cfg.lr if cfg.lr is not None else cfg.blr * eff_batch / 256
        groups = param_groups(
            self.model.named_parameters(), cfg.weight_decay, extra_no_decay=("mask_token",)
        )
        self.optimizer = torch.optim.AdamW(
            groups, lr=self.base_lr, betas=(0.9, 0.95), **_adamw_impl(device)
        )
        self.amp_dtype, use_scaler = resolve_amp(cfg.amp, device)
        self.scaler = torch.amp.GradScaler(device.type) if use_scaler else None
        self.epoch, self.iter = 0, 0  # next epoch / next batch within it
        self.skipped_images = 0
        self._resume()
        self.ddp = self._wrap(self.model)
        self.writer = self._tensorboard()
        logger.info(
            "model %s, %.1fM params; %d images, %d iterations/epoch; effective batch %d, lr %.3g; "
            "%s, precision %s",
            cfg.model,
            sum(p.numel() for p in self.model.parameters()) / 1e6,
            len(self.loader.dataset),
            self.ipe,
            eff_batch,
            self.base_lr,
            device,
            self.amp_dtype or torch.float32,
        )

    # -- building ----------------------------------------------------------------------------
    def _build_model(self) -> torch.nn.Module:
        cfg = self.cfg
        model = create_model(
            cfg.model, img_size=input_hw(cfg), norm_pix_loss=cfg.norm_pix_loss, **cfg.model_kwargs
        )
        h, w = input_hw(cfg)
        p = model.patch_size
        if h % p or w % p:
            raise ConfigError(
                f"input_size {cfg.input_size} is not a multiple of the patch size {p}"
            )
        if int(model.patch_embed.num_patches * (1 - cfg.mask_ratio)) < 1:
            raise ConfigError(
                f"mask_ratio {cfg.mask_ratio} keeps no patch of the {model.patch_embed.num_patches}"
            )
        return model.to(self.device)

    def _build_data(self):
        cfg = self.cfg
        dataset = PretrainDataset(
            cfg.data_path,
            cfg.input_size,
            self.model.patch_embed.num_patches,
            seed=cfg.seed,
            repeats=cfg.dataset_repeats,
        )
        try:
            sampler = ResumableDistributedSampler(
                len(dataset), cfg.batch_size, self.dist.rank, self.dist.world_size, cfg.seed
            )
        except ValueError as e:  # fewer images than one global batch
            raise ConfigError(str(e)) from e
        loader = DataLoader(
            dataset,
            batch_size=cfg.batch_size,
            sampler=sampler,
            num_workers=cfg.num_workers,
            pin_memory=cfg.pin_mem and self.device.type == "cuda",
            persistent_workers=cfg.num_workers > 0,
            collate_fn=collate,
            drop_last=True,
        )
        return loader, sampler

    def _wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """DDP first, then torch.compile over it (so compiled graphs split at DDP buckets)."""
        if self.dist.enabled:
            ids = [self.dist.local_rank] if self.device.type == "cuda" else None
            model = DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True)
        self.ddp_module = model  # for no_sync()
        if self.cfg.compile:
            model = torch.compile(model)
        return model

    def _tensorboard(self):
        if not self.dist.is_main:
            return None
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=self.cfg.log_dir or self.cfg.output_dir)

    # -- checkpoints -------------------------------------------------------------------------
    def _resume(self) -> None:
        cfg = self.cfg
        path = cfg.resume
        last = os.path.join(cfg.output_dir, LAST)
        if not path and cfg.auto_resume and os.path.isfile(last):
            path = last
        if not path:
            return
        ckpt = load_file(path)
        self.model.load_state_dict(ckpt["model"])
        if "optimizer" not in ckpt:
            logger.info("loaded weights only from %s (no optimizer state: a fresh start)", path)
            return
        if ckpt.get("format") != CHECKPOINT_FORMAT:
            self._resume_official(ckpt, path)
            return
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch, self.iter = int(ckpt["epoch"]), int(ckpt.get("iter", 0))
        self.skipped_images = int(ckpt.get("skipped_images", 0))
        _set_rng_state(ckpt.get("rng", {}))
        if self.dist.rank:  # rank 0's state was saved; the others keep their own streams
            torch.manual_seed(
                cfg.seed + self.dist.rank + 7919 * (self.epoch * self.ipe + self.iter)
            )
        logger.info("resumed from %s at epoch %d, iteration %d", path, self.epoch, self.iter)

    def _resume_official(self, ckpt: Dict, path: str) -> None:
        """An official ``main_pretrain.py`` checkpoint-N.pth: N is the last *finished* epoch.

        Its optimizer has the official parameter groups ([no decay, decay], tokens decayed),
        which do not map one to one onto ours, so the AdamW moments start afresh.
        """
        self.epoch, self.iter = int(ckpt.get("epoch", -1)) + 1, 0
        logger.warning(
            "%s is an official MAE checkpoint: resuming its weights at epoch %d; its optimizer "
            "state uses the official parameter groups and is not loaded (AdamW moments restart)",
            path,
            self.epoch,
        )

    def checkpoint_state(self) -> Dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "epoch": self.epoch,
            "iter": self.iter,
            "skipped_images": self.skipped_images,
            "args": self.cfg.to_dict(),
            "rng": _get_rng_state(),
        }

    def save(self, also_epoch_copy: bool = False) -> None:
        if not self.dist.is_main:
            return
        bad = [n for n, p in self.model.named_parameters() if not torch.isfinite(p).all()]
        if bad:  # a finite loss can still come with an overflowing update
            raise NonFiniteLossError(
                f"non-finite weights ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}) at "
                f"epoch {self.epoch}, iteration {self.iter}: not saved, the last checkpoint in "
                f"{self.cfg.output_dir} is intact. Lower the lr or set --clip_grad."
            )
        state = self.checkpoint_state()
        save_atomic(state, os.path.join(self.cfg.output_dir, LAST))
        if also_epoch_copy:
            save_atomic(
                state, os.path.join(self.cfg.output_dir, f"checkpoint-{self.epoch - 1}.pth")
            )

    # -- training ----------------------------------------------------------------------------
    def train(self) -> Dict[str, float]:
        cfg = self.cfg
        if self.dist.is_main:
            os.makedirs(cfg.output_dir, exist_ok=True)
            save_config(cfg, os.path.join(cfg.output_dir, "config.yaml"))
        total = cfg.epochs * self.ipe
        bar = tqdm(
            total=total,
            initial=self.epoch * self.ipe + self.iter,
            disable=not self.dist.is_main,
            unit="it",
            dynamic_ncols=True,
            mininterval=1.0 if _is_tty() else 10.0,
        )
        stats: Dict[str, float] = {}
        if self.epoch >= cfg.epochs:
            logger.info("nothing to do: %s has finished all %d epochs", cfg.output_dir, cfg.epochs)
            stats = self._last_epoch_stats()
        while self.epoch < cfg.epochs:
            stats = self._train_epoch(bar)
        bar.close()
        barrier(self.dist)
        return stats

    def _last_epoch_stats(self) -> Dict[str, float]:
        """The epoch record of a finished run, from its log.jsonl (empty when there is none)."""
        path = os.path.join(self.cfg.output_dir, "log.jsonl")
        stats: Dict[str, float] = {}
        if os.path.isfile(path):
            with open(path) as f:
                for line in f:
                    record = json.loads(line)
                    if "train_loss" in record:
                        stats = record
        return stats

    def _train_epoch(self, bar) -> Dict[str, float]:
        cfg, epoch = self.cfg, self.epoch
        self.sampler.set_epoch(epoch, start_batch=self.iter)
        if self.iter == 0:  # as the official loop: a partial accumulation never crosses epochs
            self.optimizer.zero_grad(set_to_none=True)
        self.ddp.train()
        loss_sum, n, t0 = 0.0, 0, time.time()
        window = []  # losses since the last log line
        for imgs, noise, skipped in self.loader:
            loss = self._step(imgs, noise, skipped)
            loss_sum, n = loss_sum + loss, n + 1
            window.append(loss)
            bar.update(1)
            bar.set_description(f"epoch {epoch + 1}/{cfg.epochs}", refresh=False)
            if self.iter % cfg.log_every_iters == 0 or self.iter == self.ipe:
                img_s = n * cfg.batch_size * self.dist.world_size / (time.time() - t0)
                self._log_iter(bar, sum(window) / len(window), img_s)
                window = []
            if self._mid_epoch_save_due():
                self.save()
        self.epoch, self.iter = epoch + 1, 0
        keep = self.epoch % cfg.save_every_epochs == 0 or self.epoch == cfg.epochs
        self.save(also_epoch_copy=keep)
        stats = {"epoch": epoch, "train_loss": loss_sum / max(n, 1), "time_s": time.time() - t0}
        stats.update(lr=self.optimizer.param_groups[0]["lr"], skipped_images=self.skipped_images)
        self._log_json(stats)
        return stats

    def _mid_epoch_save_due(self) -> bool:
        """Every ``save_every_iters``, at an optimizer step, not at the end of the epoch."""
        n = self.cfg.save_every_iters
        at_update = self.iter % self.cfg.accum_iter == 0
        return bool(n) and self.iter % n == 0 and at_update and self.iter < self.ipe

    def _step(self, imgs: torch.Tensor, noise: torch.Tensor, skipped: int) -> float:
        """One iteration: lr update, forward, backward, and every ``accum_iter`` an update."""
        cfg = self.cfg
        if self.iter % cfg.accum_iter == 0:
            lr = cosine_lr(self.epoch + self.iter / self.ipe, cfg, self.base_lr)
            for g in self.optimizer.param_groups:
                g["lr"] = lr * g.get("lr_scale", 1.0)
        imgs = imgs.to(self.device, non_blocking=True)
        noise = noise.to(self.device, non_blocking=True) if cfg.mask_noise == "per_sample" else None
        update = (self.iter + 1) % cfg.accum_iter == 0
        sync = (
            contextlib.nullcontext()
            if update or not self.dist.enabled
            else self.ddp_module.no_sync()
        )
        with sync:
            with torch.autocast(
                self.device.type, self.amp_dtype, enabled=self.amp_dtype is not None
            ):
                loss, _, _ = self.ddp(imgs, mask_ratio=cfg.mask_ratio, noise=noise)
            loss_sum, skipped_sum = all_reduce_sum([loss.item(), skipped], self.dist)
            self._check_finite(loss_sum)
            self._backward(loss / cfg.accum_iter, update)
        self.skipped_images += int(skipped_sum)
        self.iter += 1
        return loss_sum / self.dist.world_size

    def _backward(self, loss: torch.Tensor, update: bool) -> None:
        clip = self.cfg.clip_grad
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            if update:
                if clip:
                    self.scaler.unscale_(self.optimizer)
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
                self.scaler.step(self.optimizer)
                self.scaler.update()
        else:
            loss.backward()
            if update:
                if clip:
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
                self.optimizer.step()
        if update:
            self.optimizer.zero_grad(set_to_none=True)

    def _check_finite(self, loss_sum: float) -> None:
        if math.isfinite(loss_sum):
            return
        last = os.path.join(self.cfg.output_dir, LAST)
        where = f"{last} is intact" if os.path.isfile(last) else "no checkpoint was written yet"
        raise NonFiniteLossError(
            f"loss is {loss_sum} at epoch {self.epoch}, iteration {self.iter}; stopping without "
            f"saving ({where}). Lower the lr (blr={self.cfg.blr}), set --clip_grad, or use "
            "--amp bf16 / fp32 instead of fp16; then resume."
        )

    # -- logging -----------------------------------------------------------------------------
    def _log_iter(self, bar, loss: float, img_s: float) -> None:
        lr = self.optimizer.param_groups[0]["lr"]
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{img_s:.1f}", refresh=False)
        step = self.epoch * self.ipe + self.iter
        if self.writer is not None:
            self.writer.add_scalar("train/loss", loss, step)
            self.writer.add_scalar("train/lr", lr, step)
        self._log_json(
            {
                "epoch": self.epoch + self.iter / self.ipe,
                "step": step,
                "loss": loss,
                "lr": lr,
                "img_s": img_s,
            }
        )

    def _log_json(self, record: Dict) -> None:
        if not self.dist.is_main:
            return
        os.makedirs(self.cfg.output_dir, exist_ok=True)
        with open(os.path.join(self.cfg.output_dir, "log.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        if "train_loss" in record and self.writer is not None:
            self.writer.add_scalar("epoch/train_loss", record["train_loss"], record["epoch"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _adamw_impl(device: torch.device) -> dict:
    """Fused AdamW (one pass over each parameter) on CUDA, and on CPU where torch has it
    (2.4+; ~5x faster than the foreach loop for ViT-B on 2 cores); foreach otherwise."""
    return {"fused": True} if fused_adamw_supported(device.type) else {"foreach": True}


def _get_rng_state() -> Dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Dict) -> None:
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _is_tty() -> bool:
    import sys

    return sys.stderr.isatty()


def export_encoder(checkpoint: str, output: str) -> int:
    """Writes the encoder of a pretraining checkpoint in the official ``{'model': ...}`` form."""
    from mae_transfer.checkpoint import find_state_dict

    state = find_state_dict(load_file(checkpoint))
    encoder = {k: v for k, v in state.items() if not k.startswith(("decoder_", "mask_token"))}
    save_atomic({"model": encoder}, output)
    return len(encoder)
