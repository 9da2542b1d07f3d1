"""Fine-tuning and linear probing on the shared training loop (:class:`EpochTrainer`): each
adds its model, data, loss and optimizer; the loop, precision, DDP, checkpoints, exact resume
and logging are the engine's.

- :class:`FinetuneTrainer`: AdamW with layer-wise lr decay, timm's RandAugment / random
  erasing / mixup / cutmix with soft-target cross-entropy, drop path;
- :class:`LinprobeTrainer`: a ``BatchNorm1d(affine=False)`` + ``Linear`` head on the frozen
  encoder (kept in eval mode), LARS; optionally on features extracted once;
- both: top-1 / top-5 on ``val/`` after every epoch (over all processes), ``checkpoint-best.pth``
  beside ``checkpoint-last.pth``; :func:`evaluate_checkpoint` for ``--eval``.
"""

from __future__ import annotations

import glob
import logging
import os
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from mae_transfer.checkpoint import (
    CheckpointError,
    find_state_dict,
    load_file,
    save_atomic,
    strip_to_vit,
)
from mae_transfer.data import (
    ClassFolder,
    ClassFolderDataset,
    ShardSampler,
    collate_flags,
    seeded,
)
from mae_transfer.data.sampler import sample_seed
from mae_transfer.data.transforms import eval_transform, hw
from mae_transfer.device import pin_memory_for, resolve_amp
from mae_transfer.engine.config import ConfigError
from mae_transfer.engine.distributed import DistInfo, all_reduce_sum, on_every_rank
from mae_transfer.engine.trainer import EpochTrainer, tf32_enabled
from mae_transfer.optim import param_groups

from .config import ClassifyConfig, FinetuneConfig, LinprobeConfig, eval_crop_pct
from .data import FeatureDataset, build_mixup, class_folders, finetune_transform, linprobe_transform
from .knn import extract_features
from .model import ViTClassifier, build_classifier, head_dim_of, load_classifier_checkpoint

__all__ = [
    "FinetuneTrainer",
    "LinprobeTrainer",
    "ValEvaluator",
    "evaluate_checkpoint",
    "lars_param_groups",
]

logger = logging.getLogger(__name__)

BEST = "checkpoint-best.pth"
MIXUP_SEED_OFFSET = 1_000_003  # mixup's draws: a stream apart from the images' own seeds


def _fp32_logits(model: torch.nn.Module, x: torch.Tensor, amp_dtype) -> torch.Tensor:
    """The encoder under autocast, the head in fp32: bf16 logits (8 bits of mantissa: 12.005
    and 12.025 are both 12.0) left top-1 to the tie order of ``topk``."""
    net = getattr(model, "module", model)  # (DDP or not)
    with torch.autocast(x.device.type, amp_dtype, enabled=amp_dtype is not None):
        feats = x if x.ndim == 2 else net.pooled(x)  # (B, D): cached features (the probe)
    with torch.autocast(x.device.type, enabled=False):
        return net.head(feats.float())


class ValEvaluator:
    """Top-1 / top-5 accuracy and the cross-entropy of a classifier on a labelled set, each
    process taking a shard and the counts summed over all of them. An unreadable image is
    left out (the data set hands another readable one in its place, which would count that
    one twice) and counted in ``skipped_images``.

    ``pin_memory``: pin the batches, for a run on a GPU (see :func:`pin_memory_for`).
    """

    def __init__(
        self,
        dataset: Dataset,
        dist: DistInfo,
        batch_size: int,
        num_workers: int,
        pin_memory: bool = False,
    ):
        self.dataset, self.dist = dataset, dist
        self.loader = DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=ShardSampler(len(dataset), dist.rank, dist.world_size),
            num_workers=num_workers,
            collate_fn=collate_flags,
            pin_memory=pin_memory,
        )

    @torch.no_grad()
    def __call__(
        self, model: torch.nn.Module, device: torch.device, amp_dtype: Optional[torch.dtype]
    ) -> Dict[str, float]:
        was_training = model.training
        model.eval()
        correct1 = torch.zeros((), device=device)
        correct5, loss_sum, n = torch.zeros_like(correct1), torch.zeros_like(correct1), 0
        replaced = 0
        outputs = getattr(getattr(model, "module", model), "num_classes", 0)  # DDP or not
        try:
            for x, y, skipped in self.loader:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                logits = _fp32_logits(model, x, amp_dtype)
                keep = (skipped == 0).to(device, logits.dtype, non_blocking=True)
                loss_sum += (F.cross_entropy(logits, y, reduction="none") * keep).sum()
                top = logits.topk(min(5, logits.shape[1]), dim=1).indices
                hits = top == y[:, None]
                correct1 += (hits[:, 0] * keep).sum()
                correct5 += (hits.any(dim=1) * keep).sum()
                bad = int((skipped > 0).sum())  # skipped is on the host: no device sync
                n, replaced = n + len(y) - bad, replaced + bad
        finally:
            model.train(was_training)
        c1, c5, loss, total, replaced = all_reduce_sum(
            [correct1, correct5, loss_sum, n, replaced], self.dist
        )
        if replaced and self.dist.is_main:
            logger.warning("%d unreadable validation images left out", int(replaced))
        total = max(int(total), 1)
        return {
            "acc1": 100.0 * c1 / total,
            # with 5 classes or fewer every label is in the top 5: no measure, NaN
            "acc5": 100.0 * c5 / total if outputs > 5 else float("nan"),
            "val_loss": loss / total,
            "val_skipped_images": int(replaced),
        }


def _num_classes(cfg: ClassifyConfig, folder: ClassFolder) -> int:
    n = cfg.nb_classes or len(folder.classes)
    if n < len(folder.classes):
        raise ConfigError(
            f"nb_classes {cfg.nb_classes} is fewer than the {len(folder.classes)} class folders "
            f"of {folder.root}; set it to {len(folder.classes)} or 0"
        )
    return n


class _ClassifierTrainer(EpochTrainer):
    """What both protocols share: class folders, the classifier, validation, the best copy."""

    cfg: ClassifyConfig
    probe = False
    head_init_std = 2e-5

    def __init__(self, cfg: ClassifyConfig, device: torch.device, dist_info: DistInfo):
        self.folders = class_folders(cfg, dist_info)
        self.num_classes = _num_classes(cfg, self.folders[0])
        self.best_acc1 = -1.0
        super().__init__(cfg, device, dist_info)
        self.val = ValEvaluator(
            self.build_val_dataset(),
            dist_info,
            cfg.batch_size,
            cfg.num_workers,
            pin_memory_for(self.device, cfg.pin_mem),
        )
        logger.info(
            "%d classes; %d training / %d validation images",
            self.num_classes,
            len(self.train_dataset),
            len(self.val.dataset),
        )

    def model_kwargs(self) -> Dict:
        return dict(self.cfg.model_kwargs)

    def build_model(self) -> ViTClassifier:
        cfg = self.cfg
        model = build_classifier(
            cfg.model,
            self.num_classes,
            cfg.input_size,
            cfg.global_pool,
            probe=self.probe,
            head_init_std=self.head_init_std,
            **self.model_kwargs(),
        )
        self.load_report = None
        if cfg.finetune:
            logger.info("initialising the encoder from %s", cfg.finetune)
            # memory-mapped: a node's processes share the pages, and the optimizer state of a
            # training checkpoint (2x the weights) is never read
            state, _ = strip_to_vit(find_state_dict(load_file(cfg.finetune, mmap=True)))
            # the head always starts afresh, as in the official code (a fine-tuned file's head
            # may not even have the right classes)
            state = {k: v for k, v in state.items() if not k.startswith("head.")}
            self.load_report = load_classifier_checkpoint(model, state, source=cfg.finetune)
            self._check_encoder_loaded()
        elif not cfg.resume and not cfg.eval:
            logger.warning(
                "no --finetune weights: the encoder starts from random initialisation (a "
                "baseline; give --finetune a pretraining checkpoint to evaluate one)"
            )
        return model

    def _check_encoder_loaded(self) -> None:
        """The encoder must come whole from --finetune, as the official scripts assert: only
        the head (and, with avg pooling, a fresh fc_norm) may be new. A missing part would
        stay at its random initialisation: the probe would measure it, fine-tuning would
        start from it (a checkpoint of another depth filled two blocks of four)."""
        report, cfg = self.load_report, self.cfg
        if report is None:
            return
        fresh = ("head.",) + (("fc_norm.",) if cfg.global_pool == "avg" else ())
        absent = [
            k for k in report.missing + report.new + report.mismatched if not k.startswith(fresh)
        ]
        if absent:
            hint = (
                "; a checkpoint fine-tuned with avg pooling has no 'norm' (nor a trained class "
                "token): use --global_pool avg"
                if cfg.global_pool != "avg" and any(k.startswith("norm.") for k in absent)
                else ""
            )
            what = "frozen encoder" if self.probe else "encoder"
            use = "the probe would read them" if self.probe else "fine-tuning would start them"
            raise CheckpointError(
                f"{cfg.finetune} does not fill the {what} ({len(absent)} tensors missing or of "
                f"another shape, so {use} untrained; another depth or model_kwargs?): "
                f"{', '.join(sorted(absent)[:6])}{hint}"
            )

    def val_images(self) -> Dataset:
        cfg = self.cfg
        transform = eval_transform(cfg.input_size, eval_crop_pct(cfg))
        return ClassFolderDataset(self.folders[1], transform, cfg.seed, cfg.max_val_images)

    def build_val_dataset(self) -> Dataset:
        return self.val_images()

    def evaluate(self) -> Dict[str, float]:
        metrics = self.val(self.model, self.device, self.amp_dtype)
        self.bar_extras["acc1"] = f"{metrics['acc1']:.1f}"
        logger.info(
            "val after %d epochs: top-1 %.2f, top-5 %.2f, loss %.4f (best top-1 %.2f)",
            self.epoch,
            metrics["acc1"],
            metrics["acc5"],
            metrics["val_loss"],
            max(self.best_acc1, metrics["acc1"]),
        )
        return metrics

    def checkpoint_copies(self, metrics: Dict[str, float]) -> List[str]:
        if metrics.get("acc1", -1.0) > self.best_acc1:
            self.best_acc1 = metrics["acc1"]
            return [BEST]
        return []

    def extra_state(self) -> Dict:
        # the class names, so that --eval can label any val/ folder (even a subset) as trained
        return {"best_acc1": self.best_acc1, "classes": list(self.folders[0].classes)}

    def load_extra_state(self, ckpt: Dict) -> None:
        trained, classes = ckpt.get("classes"), list(self.folders[0].classes)
        if isinstance(trained, list) and trained != classes:
            # the head's output i is the checkpoint's class i: other folder names (or another
            # order) would train on permuted labels
            changed = [f"{a} -> {b}" for a, b in zip(trained, classes) if a != b]
            raise ConfigError(
                f"the checkpoint's {len(trained)} classes are not the {len(classes)} class "
                f"folders of {self.folders[0].root} (in sorted order: "
                f"{', '.join(changed[:3]) or 'one list longer than the other'}): the labels "
                "would be permuted; give the data set it was trained on, or start a new run"
            )
        self.best_acc1 = float(ckpt.get("best_acc1", -1.0))

    def describe(self) -> str:
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad) / 1e6
        return f"model {self.cfg.model}, {trainable:.2f}M trainable params"


class FinetuneTrainer(_ClassifierTrainer):
    """End-to-end fine-tuning (the official ``main_finetune.py`` recipe)."""

    cfg: FinetuneConfig
    betas = (0.9, 0.999)
    protocol = "fine-tuning"

    def __init__(self, cfg: FinetuneConfig, device: torch.device, dist_info: DistInfo):
        self.mixup = None
        super().__init__(cfg, device, dist_info)
        self.mixup = build_mixup(cfg, self.num_classes)

    def model_kwargs(self) -> Dict:
        return {"drop_path_rate": self.cfg.drop_path, **self.cfg.model_kwargs}

    def build_train_dataset(self) -> Dataset:
        cfg = self.cfg
        transform = finetune_transform(cfg)
        return ClassFolderDataset(self.folders[0], transform, cfg.seed, cfg.max_train_images)

    def param_groups(self) -> List[Dict]:
        return param_groups(
            self.model.named_parameters(),
            self.cfg.weight_decay,
            layer_decay=self.cfg.layer_decay,
            depth=self.model.depth,
        )

    def prepare_batch(self, tensors: List[torch.Tensor]) -> List[torch.Tensor]:
        """Mixup / cutmix, its draws seeded by (seed, epoch, iteration, rank)."""
        if self.mixup is None:
            return tensors
        x, y = tensors
        step = (self.epoch * self.ipe + self.iter) * self.dist.world_size + self.dist.rank
        with seeded(sample_seed(self.cfg.seed + MIXUP_SEED_OFFSET, 0, step)):
            x, y = self.mixup(x, y)
        return [x, y]

    def compute_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = self.ddp(x).float()
        if self.mixup is not None:  # soft targets (smoothing included by Mixup)
            return torch.sum(-y * F.log_softmax(logits, dim=-1), dim=-1).mean()
        return F.cross_entropy(logits, y, label_smoothing=self.cfg.smoothing)


def lars_param_groups(model: torch.nn.Module, weight_decay: float) -> List[Dict]:
    """LARS groups as the official linear probe (MoCo v3's LARS): matrices with weight decay
    and the trust-ratio adaptation, 1-d parameters (biases) with neither."""
    matrices, vectors = [], []
    for p in model.parameters():
        if p.requires_grad:
            (matrices if p.ndim > 1 else vectors).append(p)
    groups = [{"params": matrices, "weight_decay": weight_decay, "always_adapt": True}]
    if vectors:
        groups.append({"params": vectors, "weight_decay": 0.0, "always_adapt": False})
    return groups


class LinprobeTrainer(_ClassifierTrainer):
    """Linear probing (the official ``main_linprobe.py`` recipe, with the encoder in eval mode,
    unlike the official script (mae#54): its dropout-free blocks are the same either way, but a
    frozen encoder should not depend on the mode)."""

    cfg: LinprobeConfig
    probe = True
    protocol = "linear probing"
    head_init_std = 0.01

    def __init__(self, cfg: LinprobeConfig, device: torch.device, dist_info: DistInfo):
        self._feature_files: List[str] = []  # this process's cached-feature shards
        super().__init__(cfg, device, dist_info)

    def build_model(self) -> ViTClassifier:
        model = super().build_model()
        for name, p in model.named_parameters():
            p.requires_grad = name.startswith("head.")
        return model

    def set_train_mode(self) -> None:
        self.ddp.eval()  # the frozen encoder (and fc_norm) in eval mode
        self.model.head.train()  # the probe's BatchNorm collects its statistics

    def build_optimizer(self) -> torch.optim.Optimizer:
        from timm.optim import Lars

        cfg = self.cfg
        groups = lars_param_groups(self.model, cfg.weight_decay)
        # eps 0: the official LARS's trust ratio, trust * |w| / |g|, exactly at weight decay 0
        # (the recipe); with decay timm divides by |g| + wd |w| where the official uses |g + wd w|
        return Lars(
            groups,
            lr=self.base_lr,
            momentum=cfg.momentum,
            trust_coeff=cfg.trust_coefficient,
            eps=0.0,
        )

    def build_train_dataset(self) -> Dataset:
        cfg = self.cfg
        if cfg.cache_features:  # the images; their features are extracted in _resume()
            return ClassFolderDataset(
                self.folders[0],
                eval_transform(cfg.input_size, eval_crop_pct(cfg)),
                cfg.seed,
                cfg.max_train_images,
            )
        return ClassFolderDataset(
            self.folders[0], linprobe_transform(cfg.input_size), cfg.seed, cfg.max_train_images
        )

    def _init_rest(self, cfg: LinprobeConfig, device: torch.device, dist_info: DistInfo) -> None:
        # after the resume (the features of the encoder as loaded) and after output_dir was
        # claimed (a folder in use by another run was found only after the whole extraction,
        # whose shards were written into that run's folder)
        if cfg.cache_features:
            self.train_dataset = self._extract(self.train_dataset, "training")
            self.loader = self.make_loader(self.train_dataset, self.sampler, drop_last=True)
        super()._init_rest(cfg, device, dist_info)

    def build_val_dataset(self) -> Dataset:
        images = self.val_images()
        return self._extract(images, "validation") if self.cfg.cache_features else images

    def _extract(self, images: ClassFolderDataset, what: str) -> FeatureDataset:
        """The frozen features of ``images``, each process extracting a shard.

        With several processes the shards meet through files in ``output_dir`` that every
        process memory-maps: the processes of a node then share one copy in the page cache
        (a gathered copy per process would be ~5 GB each for ViT-L on ImageNet-1k), and no
        collective carries the features. The files are unlinked once all have mapped them.
        """
        cfg, d = self.cfg, self.dist
        name = "features-" + "-".join(what.split())
        paths = [os.path.join(cfg.output_dir, f"{name}.{r}-of-{d.world_size}.pth")
                 for r in range(d.world_size)]  # fmt: skip
        if d.is_main:  # a crashed run's shards, of another process count (as many: rewritten)
            for path in glob.glob(os.path.join(glob.escape(cfg.output_dir), f"{name}.*-of-*.pth")):
                if path not in paths:
                    os.remove(path)
        loader = DataLoader(
            images,
            batch_size=cfg.batch_size,
            sampler=ShardSampler(len(images), d.rank, d.world_size),
            num_workers=cfg.num_workers,
            collate_fn=collate_flags,  # (which images stood in for unreadable ones)
            pin_memory=pin_memory_for(self.device, cfg.pin_mem),
        )
        amp_dtype, _ = resolve_amp(cfg.amp, self.device)
        logger.info("extracting the frozen features of %d %s images", len(images), what)
        with tf32_enabled(self.device):
            feats, labels, replaced = extract_features(
                self.model,
                loader,
                self.device,
                amp_dtype=amp_dtype,
                normalize=False,
                feature_fn=self.model.pooled,
                progress=f"{what} features" if d.is_main else "",
            )
        if not d.enabled:
            return FeatureDataset([feats], [labels], [replaced])
        self._feature_files.append(paths[d.rank])

        def write() -> None:
            os.makedirs(cfg.output_dir, exist_ok=True)
            save_atomic({"features": feats, "labels": labels, "replaced": replaced}, paths[d.rank])

        # each step ends in a collective: a failure on one process stops all of them (and the
        # files are all written before any is read)
        on_every_rank(write, d, "could not write their cached features")
        shards: List = []
        on_every_rank(
            lambda: shards.extend(load_file(p, mmap=True) for p in paths),
            d,
            "could not read the features the others cached in output_dir (is it on storage "
            "every node can read?)",
        )
        return FeatureDataset(*([s[k] for s in shards] for k in ("features", "labels", "replaced")))

    def train(self) -> Dict[str, float]:
        try:
            return super().train()  # ends with a barrier: no process reads the features now
        finally:  # (also after an error or an interruption: no shards left in output_dir)
            for path in self._feature_files:  # each process its own shards (NFS keeps no
                if os.path.isfile(path):  # unlinked file alive for other clients: only now)
                    os.remove(path)

    def compute_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.ddp(x).float(), y)


def _as_trained(
    folder: ClassFolder, trained: Optional[List[str]], num_classes: int, path: str
) -> ClassFolder:
    """``folder`` labelled with the classes the checkpoint was trained on: by name when it
    records them (ours), so that a val/ with some of the classes scores them right; otherwise
    (official files) by the sorted folder order, which needs every class present."""
    if trained:
        index = {name: i for i, name in enumerate(trained)}
        unknown = [c for c in folder.classes if c not in index]
        if unknown:
            raise ConfigError(
                f"{folder.root} has {len(unknown)} class folders {path} was not trained on "
                f"(e.g. {unknown[:5]}); it knows {len(trained)} classes, e.g. {trained[:5]}"
            )
        samples = [(p, index[folder.classes[label]]) for p, label in folder.samples]
        return ClassFolder(folder.root, list(trained), samples)
    if len(folder.classes) != num_classes:
        raise ConfigError(
            f"{folder.root} has {len(folder.classes)} class folders but the head of {path} has "
            f"{num_classes} outputs, and the file does not name its classes (labels are the "
            "positions of the sorted folder names): evaluate on a val/ with exactly the "
            "classes it was trained on"
        )
    return folder


def _trained_input_size(ckpt) -> Optional[tuple]:
    """(H, W) a classifier checkpoint was trained at, from its ``args`` (ours: a dict; the
    official ones: an argparse Namespace); None when it does not say."""
    args = ckpt.get("args") if isinstance(ckpt, dict) else None
    size = args.get("input_size") if isinstance(args, dict) else getattr(args, "input_size", None)
    try:
        return hw(size) if size is not None else None
    except (TypeError, ValueError):
        return None


def evaluate_checkpoint(
    cfg: ClassifyConfig, device: torch.device, dist: DistInfo
) -> Dict[str, float]:
    """``--eval``: top-1 / top-5 on ``val/`` of a fine-tuned or linear-probe checkpoint (ours or
    an official ``mae_finetuned_vit_*.pth``), without conversion."""
    _, val_folder = class_folders(cfg, dist)
    path = cfg.resume or cfg.finetune
    ckpt = load_file(path, mmap=True)  # (as --finetune: shared pages, the optimizer unread)
    state, _ = strip_to_vit(find_state_dict(ckpt))
    if head_dim_of(state) is None:  # (said first: what follows would read it as a classifier)
        raise CheckpointError(
            f"{path} has no classification head: --eval needs a fine-tuned (or linear-probe) "
            "checkpoint; a pretraining checkpoint is for --finetune (or tools/knn.py)"
        )
    if cfg.nb_classes and cfg.nb_classes != head_dim_of(state):
        raise ConfigError(
            f"nb_classes {cfg.nb_classes}, but the head of {path} has {head_dim_of(state)} "
            "outputs: leave nb_classes at 0 to evaluate it with its own"
        )
    num_classes = cfg.nb_classes or head_dim_of(state) or len(val_folder.classes)
    names = ckpt.get("classes") if isinstance(ckpt, dict) else None
    val_folder = _as_trained(val_folder, names, num_classes, path)
    trained = _trained_input_size(ckpt)
    if trained is not None and trained != hw(cfg.input_size):
        logger.warning(
            "%s was trained at input_size %s, evaluated here at %s (its position table "
            "resized): give --input_size %s to evaluate it as trained",
            path,
            "x".join(map(str, trained)),
            "x".join(map(str, hw(cfg.input_size))),
            " ".join(map(str, trained)),
        )
    probe = "head.0.running_mean" in state
    pool = "avg" if "fc_norm.weight" in state else "cls"  # as the checkpoint was trained
    if pool != cfg.global_pool:
        logger.info("%s was trained with global_pool %s: evaluating it so", path, pool)
    model = build_classifier(
        cfg.model, num_classes, cfg.input_size, pool, probe=probe, **cfg.model_kwargs
    )
    load_classifier_checkpoint(model, state, need_head=True, source=path)  # read once
    model.to(device)
    transform = eval_transform(cfg.input_size, eval_crop_pct(cfg))
    images = ClassFolderDataset(val_folder, transform, cfg.seed, cfg.max_val_images)
    pin = pin_memory_for(device, cfg.pin_mem)
    evaluator = ValEvaluator(images, dist, cfg.batch_size, cfg.num_workers, pin)
    amp_dtype, _ = resolve_amp(cfg.amp, device)
    with tf32_enabled(device):
        metrics = evaluator(model, device, amp_dtype)
    logger.info(
        "%s on %d images of %s: top-1 %.3f, top-5 %.3f",
        os.path.basename(path),
        len(images) - metrics["val_skipped_images"],  # (the unreadable ones said above)
        val_folder.root,
        metrics["acc1"],
        metrics["acc5"],
    )
    return metrics
