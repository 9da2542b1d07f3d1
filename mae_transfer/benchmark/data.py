"""Input pipeline: the official one (PIL decode, RandomResizedCrop, flip, ToTensor, Normalize
into float32) and ours (uint8 decode and augment, normalised on the device) side by side on
one core, on JPEGs made from the embedded photographs; the loader workers a step rate needs."""

from __future__ import annotations

import math
import os
import tempfile
from typing import Dict, List, Sequence, Tuple

import torch

from .measure import in_fresh_process, per_item_best, timed

IMAGENET_LIKE = (375, 500)  # (H, W): a typical ImageNet photograph
LARGE = (1536, 2048)  # a larger photograph: crops >= 4x the output are decoded at 1/4


def make_jpegs(directory: str, n: int, hw: Tuple[int, int], quality: int = 90) -> List[str]:
    """``n`` JPEGs of size ``hw`` cut from the photographs scikit-image ships (4:3 windows at
    varied offsets, every other one mirrored), so that decoding sees real image statistics."""
    from PIL import Image

    from pretrain.samples import sample_images

    photos = [Image.fromarray(img) for _, img in sample_images()]
    os.makedirs(directory, exist_ok=True)
    paths = []
    for i in range(n):
        im = photos[i % len(photos)]
        w, h = im.size
        cw = min(w, round(h * hw[1] / hw[0]))
        ch = round(cw * hw[0] / hw[1])
        k = (i // len(photos)) % 4
        x0, y0 = (w - cw) * k // 3, (h - ch) * k // 3
        out = im.crop((x0, y0, x0 + cw, y0 + ch)).resize((hw[1], hw[0]), Image.BICUBIC)
        if i % 2:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        paths.append(os.path.join(directory, f"{i:04d}.jpg"))
        out.save(paths[-1], quality=quality)
    return paths


def _official_item(paths: Sequence[str], size: int):
    """The official loader + transform (torchvision's pil_loader: open, convert to RGB), its
    random draws seeded as our item ``i`` of epoch 0 seeds them: every try of an image, and
    both rivals, do the same crop and flip (a best-of-N over new crops would time the
    cheapest crop, not the expected one)."""
    from PIL import Image

    from mae_transfer.data import pretrain_transform, sample_seed

    transform = pretrain_transform(size)

    def run(i: int):
        torch.manual_seed(sample_seed(0, 0, i))
        with open(paths[i], "rb") as f:
            transform(Image.open(f).convert("RGB"))

    return run


def _ours_item(paths: Sequence[str], size: int, **crop_kw):
    """Our dataset's item: seed, header, decode, crop, flip, noise, unreadable-file counting;
    always epoch 0 (the official rival's crop of the image)."""
    from pretrain.data import PretrainDataset

    ds = PretrainDataset("", size, (size // 16) ** 2, files=paths)
    for k, v in crop_kw.items():
        setattr(ds.crop, k, v)

    def run(i: int):
        ds[(0, i)]

    return run


def _per_core_case(hw: Tuple[int, int], n: int, size: int, warmup: int, repeats: int) -> Dict:
    """One core: official vs ours (vs ours with PIL decoding / without reduced decoding),
    interleaved image by image, each image's time the best of ``repeats`` tries."""
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        paths = make_jpegs(d, n, hw)
        fns = {
            "official": _official_item(paths, size),
            "ours": _ours_item(paths, size),
            "ours_pil_decode": _ours_item(paths, size, use_torchvision=False),
            "ours_no_reduced_decode": _ours_item(paths, size, reduced_decode=False),
        }
        per_item_best(fns, n, max(warmup, 1))  # files into the page cache, code warm
        t = per_item_best(fns, n, repeats)
    row = {"images": f"{hw[1]}x{hw[0]} q90 JPEG", "output": size, "files": n}
    for name in fns:
        row[f"{name}_img_s"] = n / t[name]
    for name in list(fns)[1:]:
        row[f"{name}_speedup"] = t["official"] / t[name]
    return row


def _loader_case(n: int, size: int, workers: int, repeats: int) -> Dict:
    """Our pipeline through a DataLoader (batches of 32, uint8, collated) with ``workers``
    (0: in this process), one thread per process (run here: pool processes cannot have
    loader workers)."""
    from torch.utils.data import DataLoader

    from mae_transfer.data import ResumableDistributedSampler, collate
    from pretrain.data import PretrainDataset

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        ds = PretrainDataset(d, size, (size // 16) ** 2, files=make_jpegs(d, n, IMAGENET_LIKE))
        sampler = ResumableDistributedSampler(len(ds), 32)
        loader = DataLoader(
            ds,
            batch_size=32,
            sampler=sampler,
            num_workers=workers,
            collate_fn=collate,
            persistent_workers=workers > 0,
        )
        epochs = iter(range(10**6))

        def epoch():
            sampler.set_epoch(next(epochs))
            for _ in loader:
                pass

        t = timed(epoch, 1, repeats, torch.device("cpu"))
    torch.set_num_threads(threads)
    return {"workers": workers, "loader_img_s": sampler.batches_per_epoch * 32 / t["median_s"]}


def workers_needed(step_img_s: float, per_worker_img_s: float, headroom: float = 1.25) -> int:
    """Loader workers (one core each) that feed ``step_img_s``, with 25% headroom for the
    main process's own work, collation and the machine's noise."""
    return max(1, math.ceil(step_img_s * headroom / per_worker_img_s))


def bench_data(args) -> List[Dict]:
    n = 16 if args.tiny else 64
    size = args.input_size
    rows = [
        in_fresh_process(_per_core_case, hw, n, size, args.warmup, args.repeats)
        for hw in (IMAGENET_LIKE, LARGE)
    ]
    cores = os.cpu_count() or 1
    for workers in sorted({0, 1, min(2, cores)}):
        rows.append(_loader_case(2 * n, size, workers, args.repeats))
    per_worker = rows[0]["ours_img_s"]
    for rate in args.feed_rates:
        rows.append(
            {
                "feed_img_s": rate,
                "workers_ours": workers_needed(rate, per_worker),
                "workers_official": workers_needed(rate, rows[0]["official_img_s"]),
            }
        )
    return rows
