"""Weighted k-NN classification of frozen encoder features: the monitor of pretraining and a
standalone evaluation of any checkpoint.

The classifier of Wu et al. 2018 as DINO and solo-learn use it: features are L2-normalised, a
test image's k nearest training images by cosine similarity vote for their class with weight
``exp(similarity / T)``. MAE features are known to be weak under k-NN (less linearly separable
than contrastive ones, the paper's Fig. 9): the numbers track a run's progress, they do not rank
MAE against other methods.
"""

from __future__ import annotations

import logging
import re
from typing import Callable, Dict, Iterable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from mae_transfer.data import (
    ClassFolderDataset,
    ShardSampler,
    collate_flags,
    eval_transform,
)
from mae_transfer.data.folder import class_difference
from mae_transfer.engine.config import ConfigError
from mae_transfer.engine.distributed import (
    DistInfo,
    all_gather_padded,
    all_reduce_min,
    all_reduce_sum,
)
from mae_transfer.engine.logger import progress_bar
from mae_transfer.engine.trainer import tf32_enabled

logger = logging.getLogger(__name__)

KS = (20, 200)
TEMPERATURE = 0.07
POOLS = ("cls", "avg")


def knn_scores(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = TEMPERATURE,
    chunk_size: int = 256,
) -> torch.Tensor:
    """Class scores of each test feature: the sum of ``exp(sim / T)`` over its ``k`` nearest
    training features of that class.

    Args:
        train_feats: (N, D); train_labels: (N,) class indices; test_feats: (M, D). Features
            are L2-normalised here (cosine similarity).
        k: neighbours, capped at N.
        chunk_size: test rows per similarity block (memory stays O(chunk_size * N)).

    Returns:
        (M, num_classes) scores.
    """
    return _votes(
        train_feats, train_labels, test_feats, num_classes, (k,), temperature, chunk_size
    )[k]


def _votes(
    train_feats,
    train_labels,
    test_feats,
    num_classes,
    ks,
    temperature,
    chunk_size,
    normalized=False,
):
    """{k: (M, C) scores} for several k from one top-k search (the largest k), computed on the
    features' device (a GPU for the monitor: the 50k x 1.28M similarity of ImageNet is
    ~1e14 FLOP, minutes there and half an hour on a CPU)."""
    train = train_feats.float() if normalized else F.normalize(train_feats.float(), dim=1)
    test = test_feats.float() if normalized else F.normalize(test_feats.float(), dim=1)
    labels = train_labels.long().to(train.device)
    padding = (labels < 0).nonzero().squeeze(1)  # rows of no image (:func:`gather_features`)
    k_max = min(max(ks), train.shape[0] - len(padding))
    out = {k: torch.zeros(test.shape[0], num_classes, device=test.device) for k in ks}
    for start in range(0, test.shape[0], chunk_size):
        # full fp32 even where evaluation allows TF32: exp(sim / 0.07) turns a 1e-3 error of a
        # similarity into a 1.4% change of its vote, enough to reorder the neighbours
        with tf32_enabled(test.device, enabled=False):
            sim = test[start : start + chunk_size] @ train.T
        if len(padding):
            sim[:, padding] = -float("inf")  # never a neighbour
        sim, idx = sim.topk(k_max, dim=1)
        weight, neighbour = (sim / temperature).exp(), labels[idx]  # both (chunk, k_max)
        for k in ks:
            kk = min(k, k_max)
            scores = torch.zeros(sim.shape[0], num_classes, device=sim.device)
            scores.scatter_add_(1, neighbour[:, :kk], weight[:, :kk])
            out[k][start : start + chunk_size] = scores
    return out


def knn_correct(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    ks: Sequence[int] = KS,
    temperature: float = TEMPERATURE,
    chunk_size: int = 256,
    normalized: bool = False,
) -> Dict[int, int]:
    """How many test features the weighted k-NN classifier gets right, for each k in ``ks``
    (counts, so that shards of a test set add up exactly)."""
    if not len(test_labels):
        return {k: 0 for k in ks}
    votes = _votes(
        train_feats, train_labels, test_feats, num_classes, ks, temperature, chunk_size, normalized
    )
    truth = test_labels.long().to(test_feats.device)
    return {k: int((v.argmax(dim=1) == truth).sum()) for k, v in votes.items()}


def knn_accuracy(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    ks: Sequence[int] = KS,
    temperature: float = TEMPERATURE,
    chunk_size: int = 256,
) -> Dict[int, float]:
    """Top-1 accuracy in percent of the weighted k-NN classifier, for each k in ``ks``."""
    correct = knn_correct(
        train_feats, train_labels, test_feats, test_labels, num_classes, ks, temperature, chunk_size
    )
    n = len(test_labels)
    return {k: 100.0 * c / n if n else float("nan") for k, c in correct.items()}


def pool_tokens(tokens: torch.Tensor, pool: str, prefix_tokens: int = 1) -> torch.Tensor:
    """(B, P + L, D) encoder tokens -> (B, D): the class token, or the mean of the patches."""
    if pool == "cls":
        return tokens[:, 0]
    if pool == "avg":
        return tokens[:, prefix_tokens:].mean(dim=1)
    raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")


@torch.no_grad()
def extract_features(
    model: torch.nn.Module,
    loader: Iterable,
    device: torch.device,
    pool: str = "cls",
    amp_dtype: Optional[torch.dtype] = None,
    normalize: bool = True,
    feature_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    on_device: bool = False,
    progress: str = "",
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features and labels of every batch of ``loader``, L2-normalised unless ``normalize`` is
    False; on the CPU, or left on ``device`` with ``on_device``. Neither waits for the device
    batch by batch (the copies to the host are asynchronous, into pinned memory). A non-empty
    ``progress`` names a progress bar over the batches (with ETA), for a pass that can take
    hours (ImageNet on a CPU); empty, nothing is shown.

    The feature of a batch is ``feature_fn(imgs)``, by default ``pool`` over
    ``model.forward_features(imgs)`` (our ViT, or the MAE model's unmasked encoder: (B, 1 + L, D)
    tokens). The model runs in eval mode; its previous mode is restored. The loader's batches
    are ``(images, labels, skipped)``; with ``skipped`` per item (:func:`collate_flags`) the
    rows of the images that stood in for an unreadable file are marked.

    Returns:
        (N, D) fp32 features, (N,) labels and (N,) bool: the row stands in for an unreadable
        file (a duplicate of another image of the set, which evaluation leaves out).
    """
    if feature_fn is None:
        prefix = getattr(model, "num_prefix_tokens", 1)  # 0: an encoder without class token
        if pool == "cls" and prefix == 0:
            raise ConfigError("--pool cls: these weights have no class token; use --pool avg")

        def feature_fn(imgs):
            return pool_tokens(model.forward_features(imgs), pool, prefix)

    was_training = model.training
    model.eval()
    where = device if on_device else torch.device("cpu")
    feats, labels, replaced = [], [], []
    batches = progress_bar(loader, desc=progress, disable=not progress, unit="batch")
    try:
        for imgs, targets, *rest in batches:
            imgs = imgs.to(device, non_blocking=True)
            with torch.autocast(device.type, amp_dtype, enabled=amp_dtype is not None):
                f = feature_fn(imgs).float()
            f = F.normalize(f, dim=1) if normalize else f
            # (from a GPU: a copy into pinned memory that the host does not wait for)
            feats.append(f.to(where, non_blocking=True))
            labels.append(targets.to(where, non_blocking=True))
            skipped = rest[-1] if rest else 0
            flags = skipped > 0 if isinstance(skipped, torch.Tensor) else None
            if flags is None or flags.shape != targets.shape:  # (counts summed per batch)
                flags = torch.zeros(len(targets), dtype=torch.bool)
            replaced.append(flags.to(where, non_blocking=True))
    finally:
        model.train(was_training)
    if device.type == "cuda" and not on_device:
        torch.cuda.synchronize(device)  # the copies to the host have landed
    if not feats:  # this process's shard is empty
        empty = torch.zeros(0, dtype=torch.long, device=where)
        return torch.zeros(0, 0, device=where), empty, empty.bool()
    return torch.cat(feats), torch.cat(labels), torch.cat(replaced)


def gather_features(
    feats: torch.Tensor, labels: torch.Tensor, dist: DistInfo
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Every process's (features, labels) shard in one tensor on every process, gathered on
    the device without a copy through the host (the ImageNet bank of ViT-B is 3.9 GB). The
    parts are padded to equal lengths (NCCL's rule; shards differ by a row at most): padding
    rows are zero with label -1, which the search never takes as a neighbour."""
    if not dist.enabled:
        return feats, labels
    # a process with no images (fewer than processes) still joins, as (0, D)
    width = int(-all_reduce_min(-float(feats.shape[1] if feats.numel() else 0), dist))
    feats = feats if feats.numel() else feats.new_zeros(0, width)
    bank, sizes = all_gather_padded(feats, dist)
    all_labels, _ = all_gather_padded(labels.long(), dist)
    row = torch.arange(max(sizes), device=all_labels.device)
    padding = row[None, :] >= torch.tensor(sizes, device=row.device)[:, None]  # (W, longest)
    return bank, all_labels.masked_fill(padding.flatten(), -1)


class KNNEvaluator:
    """k-NN accuracy of an encoder on two class-folder sets. Each process extracts a shard of
    each set; the training features are gathered on every process, on the encoder's device,
    and each process classifies only its own shard of the validation set (the correct counts
    are summed): the search is split across the processes, not repeated by each.

    Args:
        train_dir, val_dir: class folders (``<dir>/<class>/<image>``); the same class names.
        input_size: int or (H, W) of the encoder's input (resize by 1/0.875, centre crop).
        max_images: a fixed random subset of this many images per set (0 = all).
        batch_size, num_workers: of the feature-extraction loaders.
        pin_memory: pin their batches, for a run on a GPU (see
            :func:`mae_transfer.device.pin_memory_for`).
    """

    def __init__(
        self,
        train_dir: str,
        val_dir: str,
        input_size,
        dist: Optional[DistInfo] = None,
        max_images: int = 0,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        pin_memory: bool = False,
    ):
        dist = dist or DistInfo()
        from mae_transfer.classification.data import class_folder

        try:  # (a ConfigError with a hint for images not sorted into class folders)
            folders = tuple(class_folder(d, dist) for d in (train_dir, val_dir))
        except ValueError as e:  # no class folders in it
            raise ConfigError(str(e)) from e
        diff = class_difference(*folders)
        if diff:
            raise ConfigError(
                f"k-NN class folders differ ({diff}): train and val need the same class names"
            )
        transform = eval_transform(input_size)
        self.sets = [ClassFolderDataset(f, transform, seed, max_images) for f in folders]
        self.num_classes = len(folders[0].classes)
        self.dist, self._said_capped = dist, False
        self.loaders = [
            DataLoader(
                ds,
                batch_size=batch_size,
                sampler=ShardSampler(len(ds), dist.rank, dist.world_size),
                num_workers=num_workers,
                collate_fn=collate_flags,  # (which images stood in for unreadable ones)
                pin_memory=pin_memory,
            )
            for ds in self.sets
        ]

    def __call__(
        self,
        model: torch.nn.Module,
        device: torch.device,
        pool: str = "cls",
        ks: Sequence[int] = KS,
        temperature: float = TEMPERATURE,
        amp_dtype: Optional[torch.dtype] = None,
        feature_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        progress: bool = False,
    ) -> Dict[str, float]:
        """{'knn_k20_top1': ..., 'knn_k200_top1': ..., 'knn_skipped_images': ...} (the same on
        every process; the last counts the unreadable images left out of both sets); the
        features are ``pool`` over ``model``'s tokens, or ``feature_fn(images)`` when given.
        ``progress``: rank 0 shows a bar over each set's batches (the standalone tool; the
        pretraining monitor runs under the run's own bar)."""
        train, val = self.loaders
        args = (device, pool, amp_dtype, True, feature_fn, True)  # (kept on the device)
        bars = ("k-NN bank", "k-NN val") if progress and self.dist.is_main else ("", "")
        # an image standing in for an unreadable file is left out (label -1): never a
        # neighbour, never counted, as the validation of the classifiers leaves it out
        tr_f, tr_l, tr_bad = extract_features(model, train, *args, progress=bars[0])
        tr_f, tr_l = gather_features(tr_f, tr_l.masked_fill(tr_bad, -1), self.dist)
        va_f, va_l, va_bad = extract_features(model, val, *args, progress=bars[1])  # own shard
        correct = knn_correct(
            tr_f.to(device),
            tr_l.to(device),
            va_f,
            va_l.masked_fill(va_bad, -1),  # (no class is -1: never right)
            self.num_classes,
            ks,
            temperature,
            normalized=True,  # extract_features normalised them
        )
        *counts, total, left_out = all_reduce_sum(
            [*correct.values(), int((~va_bad).sum()), int(tr_bad.sum() + va_bad.sum())],
            self.dist,
        )
        if left_out and self.dist.is_main:
            logger.warning("k-NN: %d unreadable images left out", int(left_out))
        bank = int((tr_l >= 0).sum())  # (the same on every process)
        capped = [k for k in ks if k > bank]
        if capped and not self._said_capped and self.dist.is_main:
            logger.warning(
                "k-NN: k %s is more than the %d images of the bank: every image votes (as k %d)",
                ", ".join(map(str, capped)),
                bank,
                bank,
            )
            self._said_capped = True
        nan = float("nan")  # an empty validation set
        out = {
            f"knn_k{k}_top1": 100.0 * c / total if total else nan for k, c in zip(correct, counts)
        }
        return {**out, "knn_skipped_images": int(left_out)}

    def describe(self) -> str:
        return (
            f"k-NN on {len(self.sets[0])} / {len(self.sets[1])} images of "
            f"{self.num_classes} classes"
        )


def encoder_for_checkpoint(path: str, model: str, input_size, **overrides) -> torch.nn.Module:
    """The ViT encoder ``model`` (``vit_*`` or the MAE name ``mae_vit_*``) with a class token,
    built for ``input_size`` and loaded from any checkpoint form (with the load report).

    A checkpoint fine-tuned with ``global_pool avg`` (``fc_norm``, no final ``norm``: the
    official fine-tuned ones and ours) gives a :class:`ViTClassifier` instead, whose
    ``pooled`` is the feature its head was trained on: ``fc_norm`` of the mean patch token
    (see :func:`checkpoint_features`)."""
    from mae_transfer.checkpoint import find_state_dict, load_file, load_pretrained, strip_to_vit
    from mae_transfer.classification.model import build_classifier, head_dim_of, note_padding
    from mae_transfer.data.transforms import hw
    from mae_transfer.registry import create_model, resolve_name

    name = resolve_name(model)
    if name.startswith("mae_"):
        name = name[len("mae_") :]
    whole = find_state_dict(load_file(path))
    state, _ = strip_to_vit(whole)
    kernel = state.get("patch_embed.proj.weight")
    if "patch_size" not in overrides and kernel is not None and kernel.ndim == 4:
        # the patch size the weights were trained at (a kernel resized to the name's would
        # give other features): e.g. a /8 model evaluated under a /16 name
        patch = int(kernel.shape[-1])
        named = re.search(r"patch(\d+)", name)
        if kernel.shape[-2] == patch and named and int(named.group(1)) != patch:
            logger.info("%s: patch size %d, read from its patch embedding", path, patch)
            overrides = {**overrides, "patch_size": patch}
    try:
        if "fc_norm.weight" in state and "norm.weight" not in state:
            classes = head_dim_of(state) or 1
            net = build_classifier(name, classes, input_size, global_pool="avg", **overrides)
        else:  # weights without a class token (a detection backbone's): an encoder without one
            no_cls = "cls_token" not in state and "class_token" not in overrides
            cls = {"class_token": False} if no_cls else {}
            net = create_model(name, img_size=hw(input_size), **cls, **overrides)
            note_padding(net, input_size)
    except (TypeError, ValueError) as e:  # e.g. an embed_dim that num_heads does not divide
        sizes = ", ".join(f"--{k} {v}" for k, v in overrides.items())
        raise ConfigError(f"cannot build {model}{' with ' + sizes if sizes else ''}: {e}") from e
    report = load_pretrained(net, whole, source=path)  # (the report names their codebase)
    if "norm.weight" in report.missing:  # e.g. a detection / segmentation backbone's weights
        logger.warning(
            "%s has no final norm: the features go through an untrained LayerNorm (plain "
            "standardisation) instead",
            path,
        )
    if getattr(net, "num_prefix_tokens", 1) == 0:
        logger.warning(
            "%s has no class token: the encoder runs without one (as a detection backbone "
            "does) and its feature is the mean patch token (--pool avg)",
            path,
        )
    return net


def default_pool(model: torch.nn.Module) -> str:
    """The k-NN feature a model from :func:`encoder_for_checkpoint` is read by when none is
    asked for: ``avg`` for an avg-pool fine-tuned classifier (what its head read) or weights
    without a class token, else ``cls``."""
    from mae_transfer.classification.model import ViTClassifier

    if isinstance(model, ViTClassifier) or getattr(model, "num_prefix_tokens", 1) == 0:
        return "avg"
    return "cls"


def checkpoint_features(
    model: torch.nn.Module, pool: str
) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """The k-NN feature of a model from :func:`encoder_for_checkpoint`: None (``pool`` over
    its tokens) for an encoder; ``fc_norm`` of the mean patch token for an avg-pool fine-tuned
    classifier with ``pool`` avg. Its class token was never read in training and has no final
    norm: ``pool`` cls then reads it raw, with a warning."""
    from mae_transfer.classification.model import ViTClassifier

    if not isinstance(model, ViTClassifier):
        return None
    if pool == "avg":
        return model.pooled
    logger.warning(
        "the checkpoint was fine-tuned on the mean patch token (fc_norm): its class token was "
        "never trained to be read and has no final norm; --pool avg reads what its head read"
    )
    return None
