"""The training loop shared by MAE pretraining, fine-tuning and linear probing.

:class:`EpochTrainer` owns what every protocol does the same way: seeding, the resumable
distributed sampler, the lr (``blr`` x effective batch / 256, warmup then cosine, per
iteration), precision (autocast + a gradient scaler), gradient accumulation with DDP's
``no_sync``, clipping, atomic checkpoints and exact resume, the progress bar, ``log.jsonl`` and
TensorBoard, and stopping cleanly on non-finite values. A protocol subclasses it and adds only
its model, data and loss:

- ``build_model()``: the model (moved to the device here);
- ``build_train_dataset()``: a data set indexed by ``(epoch, index)`` keys whose items are
  ``(tensor, ..., skipped)`` (see :func:`mae_transfer.data.collate`);
- ``compute_loss(*tensors)``: the loss of one batch, under autocast (forward through
  ``self.ddp``);
- optionally ``param_groups()``, ``build_optimizer()``, ``prepare_batch()`` (on the device,
  before autocast), ``evaluate()`` (metrics after each epoch), ``set_train_mode()``,
  ``extra_state()`` / ``load_extra_state()``, ``checkpoint_copies()``.

Read top to bottom: ``__init__`` builds and resumes, ``train`` runs epochs, ``_train_epoch``
iterations, ``_step`` one iteration.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler

from mae_transfer.checkpoint import (
    CheckpointError,
    copy_atomic,
    load_file,
    remove_stale_temporaries,
    save_atomic,
)
from mae_transfer.data import ResumableDistributedSampler, collate
from mae_transfer.device import fused_adamw_supported, pin_memory_for, resolve_amp
from mae_transfer.matmul import cpu_linear_check
from mae_transfer.optim import keep_optimizer_impl, param_groups

from . import preemption
from .config import ConfigError, TrainConfig, save_config
from .distributed import (
    DistInfo,
    all_gather_objects,
    all_reduce_min,
    all_reduce_sum,
    barrier,
    broadcast_buffers,
    broadcast_object,
    on_every_rank,
)
from .logger import RunLogger
from .preemption import PreemptionStop
from .schedule import cosine_lr
from .state import (
    UNREADABLE,
    check_owner,
    checkpoint_files,
    claim_output_dir,
    get_rng_state,
    move_aside,
    newest_checkpoint,
    owns_output_dir,
    refuse_if_in_use,
    release_output_dir,
    set_rng_state,
    takeover_message,
)

logger = logging.getLogger(__name__)

LAST = "checkpoint-last.pth"


class NonFiniteLossError(RuntimeError):
    """The loss or the gradients became NaN or infinite; training stopped without saving."""


def make_scaler(device: torch.device, fp16: bool) -> torch.amp.GradScaler:
    """The gradient scaler every update goes through.

    fp16: dynamic loss scaling. bf16 / fp32: a guard with scale 1 (multiplying by 1 is exact)
    whose only job is its on-device check: an update with a non-finite gradient is skipped
    without a host sync (fused AdamW reads the flag in its kernel), and the skip is seen at the
    next log step, where training stops (see ``EpochTrainer._flush``).
    """
    if fp16:
        return torch.amp.GradScaler(device.type)
    return torch.amp.GradScaler(device.type, init_scale=1.0, growth_interval=GUARD_GROWTH_INTERVAL)


GUARD_GROWTH_INTERVAL = 2**30  # the scale-1 guard never grows: how its saved state is told


def adamw_impl(device: torch.device) -> dict:
    """Fused AdamW (one pass over each parameter) on CUDA, and on CPU where torch has it
    (2.4+; ~5x faster than the foreach loop for ViT-B on 2 cores); foreach otherwise."""
    return {"fused": True} if fused_adamw_supported(device) else {"foreach": True}


def set_tf32(enabled: bool) -> None:
    """TF32 for fp32 matrix multiplies and convolutions on Ampere+ GPUs (CUDA only)."""
    precision = "tf32" if enabled else "ieee"
    torch.backends.cuda.matmul.fp32_precision = precision
    torch.backends.cudnn.conv.fp32_precision = precision


@contextlib.contextmanager
def tf32_enabled(device: torch.device, enabled: bool = True):
    """TF32 inside the block on a CUDA device (evaluation need not be bitwise fp32), or with
    ``enabled=False`` full fp32 inside it (where a small error is amplified)."""
    if device.type != "cuda":
        yield
        return
    before = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    set_tf32(enabled)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.fp32_precision = before[0]
        torch.backends.cudnn.conv.fp32_precision = before[1]


class _Window:
    """Loss and skipped-file counts since the last log step, the loss kept on the device so
    that no step waits for the host."""

    def __init__(self):
        self.reset(0)

    def reset(self, first_iter: int) -> None:
        self.loss: Optional[torch.Tensor] = None
        self.n, self.skipped, self.first_iter = 0, 0, first_iter

    def add(self, loss: torch.Tensor, skipped: int) -> None:
        loss = loss.detach().float()
        self.loss = loss if self.loss is None else self.loss + loss
        self.n += 1
        self.skipped += skipped


# settings a run may change when it resumes (how it runs, not what it trains); any other
# change is refused when auto-resume found the checkpoint, and logged with an explicit --resume
RUN_SETTINGS = frozenset(
    [
        "batch_size",
        "accum_iter",
        "epochs",
        "num_workers",
        "pin_mem",
        "output_dir",
        "log_dir",
        "resume",
        "auto_resume",
        "device",
        "amp",
        "tf32",
        "compile",
        "save_every_epochs",
        "save_every_iters",
        "log_every_iters",
        "dist_url",
        "data_path",
        "decode_on_device",
        "reduced_decode",
        "knn_train",
        "knn_val",
        "knn_every",
        "knn_max_images",
        "knn_pool",
        "eval",  # evaluation only: what is measured, not what is trained
        "eval_crop_pct",
        "max_val_images",
    ]
)


def recipe_changes(saved: Dict, now: Dict) -> List[str]:
    """``'name old -> new'`` for each training setting (not a :data:`RUN_SETTINGS` one) whose
    value differs between a checkpoint's ``args`` and this run's config; paths are compared
    resolved."""

    def same(a, b) -> bool:
        if isinstance(a, str) and isinstance(b, str) and a and b and os.sep in a + b:
            return os.path.realpath(a) == os.path.realpath(b)
        plain = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731
        return plain(a) == plain(b)

    return [
        f"{k} {saved[k]!r} -> {now[k]!r}"
        for k in now
        if k in saved and k not in RUN_SETTINGS and not same(saved[k], now[k])
    ]


def _saved_epoch_loss(ckpt: Dict) -> List:
    """A checkpoint's (loss summed over images, images) of its epoch so far; earlier ones
    summed the batch means of each process (``epoch_loss``)."""
    if "epoch_image_loss" in ckpt:
        loss_sum, n = ckpt["epoch_image_loss"]
        return [float(loss_sum), int(n)]
    loss_sum, n = ckpt.get("epoch_loss", (0.0, 0))
    ranks = ckpt.get("rng_per_rank")
    batch = int(ckpt.get("global_batch", 1)) // (len(ranks) if isinstance(ranks, list) else 1)
    return [float(loss_sum) * batch, int(n) * batch]


class EpochTrainer:
    """Epoch-based training on one process, or one of many under torchrun / Slurm."""

    checkpoint_format = "mae-transfer/1"
    protocol = "training"  # what the checkpoints say they hold (a run resumes only its own)
    betas = (0.9, 0.999)
    evaluate_at_start = False  # also evaluate the initial model (epoch -1 in log.jsonl)

    def __init__(self, cfg: TrainConfig, device: torch.device, dist_info: DistInfo):
        self.cfg, self.device, self.dist = cfg, device, dist_info
        # seed + rank as the official code: DDP broadcasts rank 0's initial weights, and
        # randomness drawn in the forward (drop path, global mask noise) differs per rank
        torch.manual_seed(cfg.seed + dist_info.rank)
        if device.type == "cuda":
            set_tf32(cfg.tf32)
        self.model = self.build_model().to(device)
        self.train_dataset = self.build_train_dataset()
        self.sampler = self._train_sampler(len(self.train_dataset))
        self.loader = self.make_loader(self.train_dataset, self.sampler, drop_last=True)
        self.ipe = self.sampler.batches_per_epoch  # iterations per epoch
        self._check_accumulation()
        self.eff_batch = cfg.batch_size * cfg.accum_iter * dist_info.world_size
        self.base_lr = cfg.lr if cfg.lr is not None else cfg.blr * self.eff_batch / 256
        if cfg.min_lr > self.base_lr:  # (blr's lr is known only here: it needs the batch)
            raise ConfigError(
                f"min_lr {cfg.min_lr} is above the lr {self.base_lr:.4g} (blr {cfg.blr} x "
                f"batch {self.eff_batch} / 256): the cosine schedule would rise, not decay"
            )
        self.optimizer = self.build_optimizer()
        self.amp_dtype, fp16 = resolve_amp(cfg.amp, device)
        if device.type == "cpu":  # a bad MAE_TRANSFER_CPU_MATMUL: now, not at the first step
            try:
                cpu_linear_check()
            except ValueError as e:
                raise ConfigError(str(e)) from None
        self.scaler = make_scaler(device, fp16)
        self._dynamic_scale = fp16  # skipped updates are routine; else they stop the run
        # GradScaler.step reads its finiteness flag on the host (a sync every update) unless
        # the optimizer takes it on the device (fused AdamW does, LARS and foreach loops do
        # not); at scale 1 such an optimizer steps directly, the flag still recorded
        self._direct_step = not fp16 and not getattr(
            self.optimizer, "_step_supports_amp_scaling", False
        )
        self.epoch, self.iter = 0, 0  # next epoch / next batch within it
        self.skipped_images = 0
        self._epoch_loss = [0.0, 0]  # the epoch's loss so far: (sum over images, images)
        self._resumed = False  # from a training checkpoint of ours
        self._stop_requested = False  # for a requeue (preemption): agreed at a log step
        self._saved_at: Optional[tuple] = None  # (epoch, iter) of the last save
        # an ended epoch's record while its evaluation is to come: checkpoints written then
        # hold it, and a run resumed from one evaluates that epoch first
        self._eval_pending: Optional[Dict] = None
        self._resumed_from: Optional[str] = None  # the checkpoint chosen (every rank)
        self._last_unreadable = False  # output_dir's checkpoint-last.pth passed over (rank 0)

        def check_free() -> None:  # a live run's folder: refused before its checkpoint loads
            if dist_info.is_main:
                refuse_if_in_use(cfg.output_dir)

        on_every_rank(check_free, dist_info, f"could not start in {cfg.output_dir}")
        self._resume()
        self._owner: Dict = {}

        def claim() -> None:  # rank 0: this run writes output_dir (two runs there: refused)
            if dist_info.is_main:
                self._owner = claim_output_dir(cfg.output_dir)
                for path in remove_stale_temporaries(cfg.output_dir):
                    logger.info("removed %s, left by a process killed while writing it", path)
                self._tidy_checkpoints()

        on_every_rank(claim, dist_info, f"could not start in {cfg.output_dir}")
        try:
            self._init_rest(cfg, device, dist_info)
        except BaseException:
            self.release()
            raise

    def _init_rest(self, cfg: TrainConfig, device: torch.device, dist_info: DistInfo) -> None:
        self.ddp = self._wrap(self.model)
        # a resumed run's logs drop what the interrupted run logged after its checkpoint: by
        # the fraction of the epoch, which (unlike the step) holds when the batch size changed
        resumed_at = None
        if self._resumed:
            step = self.epoch * self.ipe + self.iter if self._same_global_batch else None
            resumed_at = (self.epoch + self.iter / self.ipe, step)
        self.log = RunLogger(cfg.output_dir, cfg.log_dir, dist_info.is_main, resumed_at)
        if self._eval_pending is not None:  # evaluated, unless the log lacks its record
            record = self.log.last_record("train_loss") if dist_info.is_main else None
            record = broadcast_object(record, dist_info)
            if record.get("epoch") == self._eval_pending["epoch"]:
                self.checkpoint_copies(record)  # (written then: only the best accuracy kept)
                self._eval_pending = None
        self._window = _Window()
        self.bar_extras: Dict[str, str] = {}  # shown on the progress line (e.g. k-NN top-1)
        self._postfix: Dict[str, str] = {}  # the progress line's loss, lr, img/s
        logger.info(
            "%s; %d images, %d iterations/epoch; effective batch %d, lr %.3g; %s, precision %s",
            self.describe(),
            len(self.train_dataset),
            self.ipe,
            self.eff_batch,
            self.base_lr,
            device,
            str(self.amp_dtype or torch.float32).replace("torch.", ""),
        )

    def _check_accumulation(self) -> None:
        """An update every ``accum_iter`` batches, and a partial accumulation never crosses
        epochs: an epoch shorter than ``accum_iter`` would train nothing at all."""
        cfg, d = self.cfg, self.dist
        what = f"{len(self.train_dataset)} images / (batch_size {cfg.batch_size}"
        what += f" x {d.world_size} processes)" if d.enabled else ")"
        if self.ipe < cfg.accum_iter:
            raise ConfigError(
                f"an epoch has {self.ipe} iterations ({what}), fewer than accum_iter "
                f"{cfg.accum_iter}: no update would ever be made. Lower accum_iter or batch_size"
            )
        if self.ipe % cfg.accum_iter and d.is_main:
            logger.warning(
                "an epoch has %d iterations (%s), not a multiple of accum_iter %d: the last %d "
                "batches of every epoch are computed but never applied",
                self.ipe,
                what,
                cfg.accum_iter,
                self.ipe % cfg.accum_iter,
            )

    # -- what a protocol provides -----------------------------------------------------------
    def build_model(self) -> torch.nn.Module:
        raise NotImplementedError

    def build_train_dataset(self) -> Dataset:
        raise NotImplementedError

    def compute_loss(self, *tensors: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def prepare_batch(self, tensors: List[torch.Tensor]) -> List[torch.Tensor]:
        """The batch on the device, before autocast (e.g. mixup); as it is by default."""
        return tensors

    def param_groups(self) -> List[Dict]:
        """AdamW groups: no weight decay on norms, biases, tokens, position tables."""
        return param_groups(self.model.named_parameters(), self.cfg.weight_decay)

    def build_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(
            self.param_groups(), lr=self.base_lr, betas=self.betas, **adamw_impl(self.device)
        )

    def evaluate(self) -> Dict[str, float]:
        """Metrics after an epoch (every rank calls it; the model is in eval mode)."""
        return {}

    def set_train_mode(self) -> None:
        self.ddp.train()

    def extra_state(self) -> Dict:
        return {}

    def load_extra_state(self, ckpt: Dict) -> None:
        pass

    def checkpoint_copies(self, metrics: Dict[str, float]) -> List[str]:
        """File names to save this epoch's evaluated state under (e.g. the best one); also
        given an evaluated epoch's ``log.jsonl`` record on resume (to update, not to save)."""
        return []

    def describe(self) -> str:
        params = sum(p.numel() for p in self.model.parameters()) / 1e6
        return f"{type(self.model).__name__}, {params:.1f}M params"

    # -- building ----------------------------------------------------------------------------
    def _train_sampler(self, size: int) -> ResumableDistributedSampler:
        cfg, d = self.cfg, self.dist
        try:
            return ResumableDistributedSampler(size, cfg.batch_size, d.rank, d.world_size, cfg.seed)
        except ValueError as e:  # fewer images than one global batch
            raise ConfigError(str(e)) from e

    def make_loader(
        self, dataset: Dataset, sampler: Sampler, drop_last: bool, persistent: bool = True
    ) -> DataLoader:
        cfg = self.cfg
        return DataLoader(
            dataset,
            batch_size=cfg.batch_size,
            sampler=sampler,
            num_workers=cfg.num_workers,
            pin_memory=pin_memory_for(self.device, cfg.pin_mem),
            persistent_workers=persistent and cfg.num_workers > 0,
            collate_fn=collate,
            drop_last=drop_last,
            # each new iterator draws its workers' base seed from this generator, not from the
            # global stream that drop path and mask noise use (a resumed epoch makes one more)
            generator=torch.Generator().manual_seed(cfg.seed),
        )

    def _wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """DDP first, then torch.compile over it (so compiled graphs split at DDP buckets)."""
        if self.dist.enabled:
            ids = [self.device] if self.device.type == "cuda" else None
            # gradients live in the all-reduce buckets; they are zeroed in place, not freed,
            # so that they stay views there (see _update)
            model = DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True)
        self.ddp_module = model  # for no_sync()
        if self.cfg.compile:
            if self.device.type == "cpu" and self.amp_dtype is None and cpu_linear_check()[0]:
                logger.info(
                    "--compile in fp32 on this CPU: the compiled graph multiplies with torch's "
                    "default library, not oneDNN (mae_transfer.matmul; inductor lowers oneDNN's "
                    "product for frozen weights only); the eager step can be the faster one"
                )
            model = torch.compile(model)
        return model

    # -- checkpoints -------------------------------------------------------------------------
    def _choose_checkpoint(self) -> Optional[str]:
        """Rank 0 picks the checkpoint that is furthest along (an explicit ``resume`` or
        ``checkpoint-last.pth``, e.g. after an elastic restart) and every rank follows it: ranks
        deciding on their own could see different files and silently train apart."""
        cfg, path, error = self.cfg, None, None
        if self.dist.is_main:
            last = os.path.join(cfg.output_dir, LAST) if cfg.auto_resume else ""
            try:
                damaged_ok = last if last != cfg.resume else ""  # found, not asked for
                path, self._last_unreadable = newest_checkpoint(
                    [cfg.resume, last], self.checkpoint_format, damaged_ok
                )
            except Exception as e:  # noqa: BLE001 - every rank raises it, none waits forever
                # ours say what is wrong with which file (their class names are internal)
                error = str(e) if isinstance(e, CheckpointError) else f"{type(e).__name__}: {e}"
            restarted = any(
                int(os.environ.get(v, "0") or 0) > 0
                for v in ("SLURM_RESTART_COUNT", "TORCHELASTIC_RESTART_COUNT")
            )
            if path and cfg.resume and path != cfg.resume and os.path.isfile(cfg.resume):
                (logger.info if restarted else logger.warning)(
                    "--resume %s is behind %s (found by auto-resume): continuing from the "
                    "latter, the furthest along (what a requeue or a re-run needs). To go back "
                    "to %s instead, add --no-auto_resume (%s is then replaced at the next save)",
                    cfg.resume,
                    path,
                    cfg.resume,
                    LAST,
                )
        path, error = broadcast_object((path, error), self.dist)
        if error:
            raise ConfigError(f"cannot choose the checkpoint to resume from: {error}")
        if path and all_reduce_min(float(os.path.isfile(path)), self.dist) < 1:
            raise ConfigError(
                f"checkpoint {path}, chosen by rank 0 to resume from, is missing on some "
                "processes: put output_dir (and --resume) on storage every node can read"
            )
        return path

    def _tidy_checkpoints(self) -> None:
        """Rank 0, once output_dir is claimed: output_dir's checkpoints are this run's only.

        Resumed from one of them, an unreadable checkpoint-last.pth passed over is kept aside
        and the chosen file takes its place (what the end of a run reads, e.g. to export the
        encoder). Started afresh (or from a file elsewhere), an earlier run's
        ``checkpoint-*.pth`` are moved aside (``.old``, as its ``log.jsonl``): they would mix
        with this run's, and a fallback from an unreadable checkpoint-last.pth could take one
        of them for this run's."""
        out, chosen = self.cfg.output_dir, self._resumed_from
        last = os.path.join(out, LAST)
        if self._last_unreadable:
            os.replace(last, last + UNREADABLE)
            copy_atomic(chosen, last)
            return
        if chosen and os.path.dirname(os.path.abspath(chosen)) == os.path.abspath(out):
            return
        old = checkpoint_files(out)
        for path in old:
            move_aside(path)
        if old:
            logger.warning(
                "%s held checkpoints of an earlier run (%s): moved aside to *.old, as this run %s",
                out,
                ", ".join(os.path.basename(p) for p in old),
                f"continues {chosen}" if chosen else "starts afresh",
            )

    def _resume(self) -> None:
        path = self._resumed_from = self._choose_checkpoint()
        if not path:
            return
        ckpt = load_file(path, mmap=True)  # ours: replaced whole by save_atomic, never rewritten
        self._load_resumable(ckpt, path)
        if "optimizer" not in ckpt:
            logger.info("loaded weights only from %s (no optimizer state: a fresh start)", path)
            return
        if ckpt.get("format") != self.checkpoint_format:
            self._resume_official(ckpt, path)
            return
        with keep_optimizer_impl(self.optimizer):  # this run's fused / foreach choice
            self.optimizer.load_state_dict(ckpt["optimizer"])
        self._load_scaler(ckpt)
        self.epoch, self.iter = int(ckpt["epoch"]), self._resume_iteration(ckpt)
        self.skipped_images = int(ckpt.get("skipped_images", 0))
        pending = ckpt.get("eval_pending")
        self._eval_pending = dict(pending) if isinstance(pending, dict) and not self.iter else None
        if self.iter:
            self._epoch_loss = _saved_epoch_loss(ckpt)
        self._resumed = True
        self._same_global_batch = ckpt.get("global_batch") == self.sampler.global_batch
        self.load_extra_state(ckpt)
        per_rank = ckpt.get("rng_per_rank")
        if isinstance(per_rank, list) and len(per_rank) == self.dist.world_size:
            set_rng_state(per_rank[self.dist.rank], self.device)  # exact, rank by rank
        else:
            set_rng_state(ckpt.get("rng", {}), self.device)
            if self.dist.rank:  # another process count: rank 0's state, the others reseeded
                step = self.epoch * self.ipe + self.iter
                torch.manual_seed(self.cfg.seed + self.dist.rank + 7919 * step)
        saved_batch = int(ckpt.get("global_batch", 0)) * int(ckpt.get("accum_iter", 1))
        if saved_batch and saved_batch != self.eff_batch and self.dist.is_main:
            logger.warning(
                "effective batch %d (checkpoint) -> %d: the lr is now %.3g%s",
                saved_batch,
                self.eff_batch,
                self.base_lr,
                "" if self.cfg.lr is not None else f" (blr {self.cfg.blr} x batch / 256)",
            )
        logger.info("resumed from %s at epoch %d, iteration %d", path, self.epoch, self.iter)

    def _load_resumable(self, ckpt: Any, path: str) -> None:
        """Loads the model from a checkpoint of this protocol and model; one that auto-resume
        found in output_dir only with the same training settings (:func:`recipe_changes`: e.g.
        the ``--finetune`` weights, mask ratio, lr): a clear error instead of a strict-loading
        traceback, or of silently continuing (or declaring finished) another run."""
        cfg = self.cfg
        found = path != cfg.resume  # output_dir's checkpoint-last.pth
        if found:
            where = f"{path} (in output_dir, found by auto-resume)"
            hint = (
                "it belongs to another run: give this one another --output_dir "
                "(--no-auto_resume would start afresh, moving its files aside to *.old)"
            )
        else:
            where = path
            hint = f"--resume continues a run of {self.protocol}" + (
                "; initial weights are --finetune" if self.protocol != "pretraining" else ""
            )
        protocol = ckpt.get("protocol") if isinstance(ckpt, dict) else None
        if protocol and protocol != self.protocol:
            raise ConfigError(f"{where} is a {protocol} checkpoint, not {self.protocol}: {hint}")
        state = ckpt.get("model") if isinstance(ckpt, dict) else None
        if not isinstance(state, dict):
            raise ConfigError(f"{where} holds no 'model' weights to resume: {hint}")
        try:
            self.model.load_state_dict(state)
        except RuntimeError as e:  # missing / unexpected keys, other shapes
            detail = " ".join(str(e).split())
            detail = detail if len(detail) < 400 else detail[:400] + " ..."
            raise ConfigError(
                f"{where} does not hold this run's model ({cfg.model} for {self.protocol}: "
                f"{detail}): {hint}"
            ) from e
        if ckpt.get("format") != self.checkpoint_format:  # official args: a Namespace
            return
        changed = recipe_changes(ckpt.get("args", {}), cfg.to_dict())
        if changed and found:  # most likely a new run pointed at an old output_dir
            raise ConfigError(
                f"{cfg.output_dir} holds a run (at epoch {ckpt.get('epoch')}) with other "
                f"settings: {', '.join(changed)}. Give this run another --output_dir, or "
                f"--resume {path} to continue that one with the new values"
            )
        if changed:
            logger.warning("resuming %s with changed settings: %s", path, ", ".join(changed))

    def _resume_official(self, ckpt: Dict, path: str) -> None:
        """An official MAE checkpoint-N.pth (pretraining, fine-tuning or linear probing): N is
        the last *finished* epoch. Its optimizer uses the official parameter groups, which do
        not map one to one onto ours, so the optimizer moments start afresh."""
        self.epoch, self.iter = int(ckpt.get("epoch", -1)) + 1, 0
        logger.warning(
            "%s is an official MAE checkpoint: resuming its weights at epoch %d; its optimizer "
            "state uses the official parameter groups and is not loaded (moments restart)",
            path,
            self.epoch,
        )

    def _precision(self) -> str:
        return str(self.amp_dtype or torch.float32).replace("torch.", "")

    def _load_scaler(self, ckpt: Dict) -> None:
        saved, state = ckpt.get("precision", self._precision()), ckpt.get("scaler")
        # fp16 on CPU ran behind the scale-1 guard before it had loss scaling: a guard's state
        # would pin a dynamic scaler at scale 1 (and one never to grow)
        guard = bool(state) and state.get("growth_interval") == GUARD_GROWTH_INTERVAL
        if state and saved == self._precision() and guard != self._dynamic_scale:
            self.scaler.load_state_dict(state)
        elif saved != self._precision() or state:
            logger.info(
                "precision %s -> %s%s: gradient scaler starts afresh",
                saved,
                self._precision(),
                " (the checkpoint's had no loss scaling)" if saved == self._precision() else "",
            )

    def _resume_iteration(self, ckpt: Dict) -> int:
        """The batch to resume at within the epoch, from the *samples* the checkpoint had seen,
        so that a run may resume with another world size or batch size."""
        it = int(ckpt.get("iter", 0))
        if not it:
            return 0
        old_global = int(ckpt.get("global_batch", self.sampler.global_batch))
        samples = int(ckpt.get("samples_in_epoch", it * old_global))
        per_update = self.sampler.global_batch * self.cfg.accum_iter
        if samples % per_update:
            old = f"{old_global} x accum_iter {ckpt.get('accum_iter', '?')}"
            raise ConfigError(
                f"the checkpoint stopped {samples} samples into epoch {ckpt['epoch']} (global "
                f"batch {old}), which is not a whole number of this run's updates "
                f"({self.sampler.global_batch} x accum_iter {self.cfg.accum_iter} = {per_update})"
                ": resume with the batch size, process count and accum_iter it was saved with "
                "until that epoch ends, then change them"
            )
        return samples // self.sampler.global_batch

    def checkpoint_state(self, rng_per_rank: Optional[List[Dict]] = None) -> Dict:
        return {
            "format": self.checkpoint_format,
            "protocol": self.protocol,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "precision": self._precision(),
            "epoch": self.epoch,
            "iter": self.iter,
            "samples_in_epoch": self.iter * self.sampler.global_batch,
            "global_batch": self.sampler.global_batch,
            "accum_iter": self.cfg.accum_iter,
            "skipped_images": self.skipped_images,
            "epoch_image_loss": list(self._epoch_loss),
            "args": self.cfg.to_dict(),
            "rng": get_rng_state(self.device),
            # every process's streams (drop path, mask noise): restored rank by rank when the
            # run resumes with as many processes
            "rng_per_rank": rng_per_rank,
            "eval_pending": self._eval_pending,
            **self.extra_state(),
        }

    def save(
        self, also_epoch_copy: bool = False, copies: Sequence[str] = (), last: bool = True
    ) -> None:
        """Writes checkpoint-last.pth atomically (rank 0), after every rank has checked that the
        weights are finite: all processes stop together, with the message, when they are not.

        ``also_epoch_copy`` and ``copies`` (file names in output_dir) get the same state; with
        ``last`` False only they are written."""
        bad = [n for n, p in self.model.named_parameters() if not torch.isfinite(p).all()]
        if bad:  # a finite loss can still come with an overflowing update
            raise NonFiniteLossError(
                f"non-finite weights ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}) at "
                f"epoch {self.epoch}, iteration {self.iter}: not saved, the last checkpoint in "
                f"{self.cfg.output_dir} is intact. Lower the lr or set --clip_grad, and "
                f"continue with --resume {os.path.join(self.cfg.output_dir, LAST)}."
            )
        rngs = all_gather_objects(get_rng_state(self.device), self.dist)
        last_path = os.path.join(self.cfg.output_dir, LAST)

        def write() -> None:
            if not self.dist.is_main:
                return
            check_owner(self.cfg.output_dir, self._owner)
            names = list(copies)
            if also_epoch_copy:
                names.append(f"checkpoint-{self.epoch - 1}.pth")
            # the extra names (byte copies, each atomic) before checkpoint-last.pth: a kill in
            # between leaves the older last, whose resume writes them again
            paths = [os.path.join(self.cfg.output_dir, name) for name in names]
            paths += [last_path] if last else []
            if not paths:
                return
            save_atomic(self.checkpoint_state(rngs), paths[0])
            for path in paths[1:]:
                copy_atomic(paths[0], path)

        # a failed write (disk full, quota, permissions) stops every process with rank 0's
        # reason; the others used to wait for it in their next collective
        on_every_rank(write, self.dist, f"could not write {last_path if last else copies[0]}")
        if last:
            self._saved_at = (self.epoch, self.iter)

    # -- training ----------------------------------------------------------------------------
    def train(self) -> Dict[str, float]:
        try:
            return self._train()
        finally:
            self.release()  # (an error included: the claim is this process's, not the dir's)

    def _train(self) -> Dict[str, float]:
        cfg = self.cfg
        if self.epoch >= cfg.epochs and self._eval_pending is None:  # (the same on every rank)
            last = os.path.join(cfg.output_dir, LAST)
            here = os.path.isfile(last) if self.dist.is_main else False
            if not broadcast_object(here, self.dist):  # rank 0's answer: none waits for others
                raise ConfigError(
                    f"--resume {cfg.resume} has finished all {self.epoch} epochs: nothing to "
                    f"train into {cfg.output_dir}. Raise --epochs (now {cfg.epochs}) to train "
                    "on, or use that run's output_dir"
                )
        finished = self.epoch >= cfg.epochs and self._eval_pending is None
        config_file = os.path.join(cfg.output_dir, "config.yaml")
        on_every_rank(  # (not for a finished run: nothing is trained by this config)
            lambda: save_config(cfg, config_file) if self.dist.is_main and not finished else None,
            self.dist,
            f"could not write {config_file}",
        )
        bar = self.log.progress(cfg.epochs * self.ipe, self.epoch * self.ipe + self.iter)
        stats: Dict[str, float] = {}
        if self._eval_pending is not None:  # saved before its epoch's evaluation, not done
            logger.info("evaluating epoch %d, saved before its evaluation", self.epoch - 1)
            stats = self._finish_epoch()
        if self.epoch >= cfg.epochs and not stats:
            more = f" (--epochs {cfg.epochs})" if self.epoch > cfg.epochs else ""
            logger.info(
                "nothing to do: %s has finished %d epochs%s", cfg.output_dir, self.epoch, more
            )
            stats = self.log.last_record("train_loss")
        elif self.evaluate_at_start and self.epoch == self.iter == 0:
            metrics = self._evaluate()
            if metrics:
                self.log.record({"epoch": -1, **metrics})
                self.log.scalars(metrics, -1, "epoch")
        try:
            while self.epoch < cfg.epochs:
                stats = self._train_epoch(bar)
        finally:
            bar.close()
        barrier(self.dist)
        return stats

    def _train_epoch(self, bar) -> Dict[str, float]:
        cfg, epoch = self.cfg, self.epoch
        self.sampler.set_epoch(epoch, start_batch=self.iter)
        if self.iter == 0:  # as the official loop: a partial accumulation never crosses epochs
            self.optimizer.zero_grad(set_to_none=True)
        self.set_train_mode()
        self._window.reset(self.iter)
        if self.iter == 0:  # (a resumed epoch keeps the losses its checkpoint had summed)
            self._epoch_loss = [0.0, 0]
        t0, start = time.time(), self.iter
        for *tensors, skipped in self.loader:
            self._step(tensors, skipped)
            bar.update(1)
            bar.set_description(f"epoch {epoch + 1}/{cfg.epochs}", refresh=False)
            if self.iter % cfg.log_every_iters == 0 or self.iter == self.ipe:
                img_s = (self.iter - start) * self.sampler.global_batch / (time.time() - t0)
                self._log_iter(bar, img_s)
            if self._mid_epoch_save_due():
                self._flush()
                self.save()
            if self._stop_requested and self.iter % cfg.accum_iter == 0 and self.iter < self.ipe:
                self._stop_for_requeue()
        self._flush()
        loss_sum, n = self._epoch_loss
        stats = {"epoch": epoch, "train_loss": loss_sum / max(n, 1), "time_s": time.time() - t0}
        stats.update(lr=self.current_lr(), skipped_images=self.skipped_images)
        self.epoch, self.iter, self._eval_pending = epoch + 1, 0, stats
        # saved before the evaluation, as the official loops do: a crash or a time-out in it
        # loses no training (the resumed run evaluates this epoch first)
        self.save(
            also_epoch_copy=self.epoch % cfg.save_every_epochs == 0 or self.epoch == cfg.epochs
        )
        if self._stop_requested and self.epoch < cfg.epochs:
            raise PreemptionStop(f"stopped for a requeue after epoch {epoch}")
        return self._finish_epoch()

    def _finish_epoch(self) -> Dict[str, float]:
        """The pending evaluation of the epoch that ended, its copies (the best one), its record.

        checkpoint-last.pth keeps the evaluation pending (and the best accuracy before it) until
        the next save; a run resumed from it re-evaluates the epoch only if ``log.jsonl`` lacks
        its record (written after the copies). After the last epoch it is written once more,
        evaluated: a finished run's checkpoint then has nothing left to do."""
        stats, t0 = dict(self._eval_pending or {}), time.time()
        metrics = self._evaluate()
        if metrics:  # (the training's own time is time_s)
            metrics["eval_time_s"] = time.time() - t0
            if self.log.bar is not None:  # the new accuracy on the progress line now
                self.log.bar.set_postfix(**self._postfix, **self.bar_extras)
        self._eval_pending = None
        copies = self.checkpoint_copies(metrics)
        if copies:
            self.save(copies=copies, last=False)
        stats.update(metrics)
        self.log.record(stats)
        self.log.scalars(stats, stats["epoch"], "epoch")
        if self.epoch >= self.cfg.epochs:
            self.save()
        return stats

    def _stop_for_requeue(self) -> None:
        """Every process, together: checkpoint here (an update boundary), then stop."""
        self._flush()
        if self._saved_at != (self.epoch, self.iter):  # (not again after a mid-epoch save)
            self.save()
        raise PreemptionStop(
            f"stopped for a requeue at epoch {self.epoch}, iteration {self.iter}: "
            f"{os.path.join(self.cfg.output_dir, LAST)} written"
        )

    def _mid_epoch_save_due(self) -> bool:
        """At the first optimizer step at or after each multiple of ``save_every_iters`` (with
        ``accum_iter`` 16 and 1000, at 1008, 2000, 3008, ...; not only at the common multiples),
        not at the end of the epoch (the epoch's own save comes then)."""
        n, accum = self.cfg.save_every_iters, self.cfg.accum_iter
        at_update = self.iter % accum == 0
        crossed = self.iter // max(n, 1) > (self.iter - accum) // max(n, 1)
        return bool(n) and at_update and crossed and self.iter < self.ipe

    def current_lr(self) -> float:
        """The largest lr of the groups: the head's under layer-wise decay (group 0 holds the
        embeddings, at decay ** (depth + 1) of it)."""
        return max(g["lr"] for g in self.optimizer.param_groups)

    def _set_lr(self) -> None:
        lr = cosine_lr(self.epoch + self.iter / self.ipe, self.cfg, self.base_lr)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)

    def _step(self, tensors: Sequence[torch.Tensor], skipped: int) -> None:
        """One iteration: lr update, forward, backward, and every ``accum_iter`` an update."""
        accum = self.cfg.accum_iter
        if self.iter % accum == 0:
            self._set_lr()
        tensors = self.prepare_batch([t.to(self.device, non_blocking=True) for t in tensors])
        update = (self.iter + 1) % accum == 0
        no_sync = self.dist.enabled and not update
        with self.ddp_module.no_sync() if no_sync else contextlib.nullcontext():
            with torch.autocast(
                self.device.type, self.amp_dtype, enabled=self.amp_dtype is not None
            ):
                loss = self.compute_loss(*tensors)
            self.scaler.scale(loss / accum).backward()
        self._window.add(loss, skipped)
        if update:
            self._update()
        self.iter += 1

    def _update(self) -> None:
        clip = self.cfg.clip_grad
        if clip or self._direct_step:
            self.scaler.unscale_(self.optimizer)  # the finiteness flag, on the device
        if clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        if self._direct_step:
            self.optimizer.step()  # not skipped; a non-finite gradient stops the run at the
        else:  # next log step, before anything is saved
            self.scaler.step(self.optimizer)  # skipped on device when a gradient is not finite
        self.scaler.update()  # the scale leaves 1.0 after a non-finite gradient: see _flush
        # under DDP the gradients are views into its buckets: zero them there, don't free them
        self.optimizer.zero_grad(set_to_none=not self.dist.enabled)

    def _flush(self) -> Optional[float]:
        """Mean loss since the last flush over all processes (the one host sync of a log step);
        raises on every process, together, when it or a skipped update was not finite."""
        w = self._window
        if not w.n:
            return None
        # (a requeue signal one process received travels with the log step's numbers)
        lost = float(self.dist.is_main and not owns_output_dir(self.cfg.output_dir, self._owner))
        loss_sum, n, skipped, stop, lost = all_reduce_sum(
            [w.loss, w.n, w.skipped, float(preemption.requested()), lost], self.dist
        )
        if lost:  # another run claimed output_dir: stop before writing more into it
            raise ConfigError(takeover_message(self.cfg.output_dir))
        self._stop_requested = self._stop_requested or stop > 0
        self.skipped_images += int(skipped)
        self._check_finite(loss_sum, w.first_iter)
        # per image (each process's loss is its batch's mean): a resumed epoch may go on
        # with another batch size or process count
        self._epoch_loss[0] += loss_sum * self.cfg.batch_size
        self._epoch_loss[1] += int(n) * self.cfg.batch_size
        w.reset(self.iter)
        return loss_sum / n

    def _check_finite(self, loss_sum: float, first_iter: int) -> None:
        where = f"epoch {self.epoch}, iteration {first_iter}"
        if self.iter - 1 > first_iter:
            where += f"-{self.iter - 1}"
        if math.isfinite(loss_sum):
            if self._dynamic_scale or self.scaler.get_scale() == 1.0:
                return
            applied = "applied" if self._direct_step else "skipped"
            what = f"a gradient was not finite (the update was {applied})"
        else:
            what = f"loss is {loss_sum}"
        last = os.path.join(self.cfg.output_dir, LAST)
        saved = os.path.isfile(last)
        kept = f"{last} is intact" if saved else "no checkpoint was written yet"
        lr = f"lr={self.cfg.lr}" if self.cfg.lr is not None else f"blr={self.cfg.blr}"
        fp16 = ", or use --amp bf16 / fp32 instead of fp16" if self._dynamic_scale else ""
        then = (
            f"then continue with --resume {last} (which takes changed settings)"
            if saved
            else "then start again"
        )
        raise NonFiniteLossError(
            f"{what} at {where}; stopping without saving ({kept}). Lower the lr ({lr}), "
            f"set --clip_grad{fp16}; {then}."
        )

    def _evaluate(self) -> Dict[str, float]:
        """``evaluate()`` in eval mode, without touching the training's random streams."""
        devices = [self.device] if self.device.type == "cuda" else []
        broadcast_buffers(self.model, self.dist)  # every rank evaluates rank 0's model
        with torch.random.fork_rng(devices=devices), tf32_enabled(self.device):
            self.ddp.eval()
            metrics = self.evaluate()
        return metrics

    # -- logging -----------------------------------------------------------------------------
    def _log_iter(self, bar, img_s: float) -> None:
        loss = self._flush()
        if loss is None:
            return
        lr = self.current_lr()
        self._postfix = dict(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{img_s:.1f}")
        bar.set_postfix(**self._postfix, **self.bar_extras, refresh=False)
        step = self.epoch * self.ipe + self.iter
        self.log.scalars({"loss": loss, "lr": lr}, step, "train")
        frac = self.epoch + self.iter / self.ipe
        self.log.record({"epoch": frac, "step": step, "loss": loss, "lr": lr, "img_s": img_s})

    def release(self) -> None:
        """Gives up this run's claim on output_dir (rank 0; the next run there need not
        wait). Done when training ends, also by an error; :meth:`close` does it too."""
        if self.dist.is_main and self._owner:
            release_output_dir(self.cfg.output_dir, self._owner)
            self._owner = {}

    def close(self) -> None:
        self.release()
        self.log.close()
