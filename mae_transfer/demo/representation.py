"""The representation check: weighted k-NN on labelled object crops of the pretrained encoder
and of randomly initialised ones, with the protocol of the pretraining's k-NN monitor
(:class:`mae_transfer.classification.knn.KNNEvaluator`: eval resize + centre crop, cosine
similarity, k 20 / 200, T 0.07).

The curve over pretraining epochs is the monitor's own output: the records of ``log.jsonl``
that carry ``knn_k20_top1`` (epoch -1 = the initialisation, before any update).
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Sequence, Tuple

import torch

from mae_transfer.checkpoint import find_state_dict, load_file
from mae_transfer.classification.knn import KNNEvaluator
from mae_transfer.datasets import write_object_crops
from mae_transfer.registry import create_model

CROP_SEED = 5000  # scenes of the crop sets: streams apart from pretraining and fine-tuning data


def crop_dirs(root: str, seed: int, per_class: int, size: int) -> Tuple[str, str]:
    """(train, val) class folders of object crops for ``seed``: ``per_class`` crops of each
    class to vote, half as many to classify, from disjoint scene streams."""
    dirs = []
    for split, n, offset in (("train", per_class, 0), ("val", max(1, per_class // 2), 1)):
        path = os.path.join(root, f"seed{seed}", split)
        dirs.append(write_object_crops(path, n, CROP_SEED + 2 * seed + offset, crop_size=size))
    return dirs[0], dirs[1]


def _args(path: str) -> Dict:
    args = load_file(path).get("args") or {}
    if not args.get("model"):
        raise ValueError(f"{path} carries no pretraining config ('args'); pass one of ours")
    return args


def _build(args: Dict) -> torch.nn.Module:
    kwargs = dict(args.get("model_kwargs") or {})
    return create_model(args["model"], img_size=args.get("input_size", 224), **kwargs)


def load_mae(path: str) -> torch.nn.Module:
    """The MAE of one of our pretraining checkpoints, built from the config it carries."""
    model = _build(_args(path))
    model.load_state_dict(find_state_dict(load_file(path)))
    return model.eval()


def fresh_mae(path: str, seed: int) -> torch.nn.Module:
    """The checkpoint's architecture, randomly initialised under ``seed`` as pretraining
    builds it (``seed`` = the run's seed gives exactly its starting weights)."""
    with torch.random.fork_rng(devices=[]):  # built on the CPU; the GPUs' generators untouched
        torch.default_generator.manual_seed(seed)
        return _build(_args(path)).eval()


def knn_of(model: torch.nn.Module, train_dir: str, val_dir: str, pool: str) -> Dict[str, float]:
    """{"knn_k20_top1": .., "knn_k200_top1": ..} of ``model`` (in %) on one crop-set pair."""
    size = tuple(model.img_size)
    evaluator = KNNEvaluator(train_dir, val_dir, size, batch_size=128)
    return evaluator(model, torch.device("cpu"), pool)


def compare(
    checkpoint: str, root: str, seeds: Sequence[int], per_class: int, pool: str
) -> Dict[str, List[Dict[str, float]]]:
    """k-NN of the pretrained encoder and of random initialisations, one crop set per seed.

    Seed ``s`` draws the crop sets (both sides are measured on the same crops) and the random
    initialisation; the pretrained encoder is the same for every seed (one pretraining run).

    Returns:
        {"mae": [metrics of seed s, ...], "random": [...]}.
    """
    mae = load_mae(checkpoint)
    size = int(mae.img_size[0])
    out: Dict[str, List[Dict[str, float]]] = {"mae": [], "random": []}
    for seed in seeds:
        train_dir, val_dir = crop_dirs(root, seed, per_class, size)
        out["mae"].append(knn_of(mae, train_dir, val_dir, pool))
        out["random"].append(knn_of(fresh_mae(checkpoint, seed), train_dir, val_dir, pool))
    return out


def curve_from_log(log_path: str) -> List[Dict[str, float]]:
    """The k-NN records of a pretraining ``log.jsonl``, in order (epoch -1 = the start)."""
    with open(log_path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [r for r in records if "knn_k20_top1" in r]
