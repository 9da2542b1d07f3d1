"""Image folders and class folders, with decoding that skips and counts unreadable files."""

from __future__ import annotations

import functools
import logging
import os
import random
from collections import Counter
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Set, Tuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from PIL.Image import DecompressionBombError

from .decode import decode_pil, open_encoded

logger = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# What a corrupt, truncated or mislabelled file raises while being decoded.
UNREADABLE = (OSError, UnidentifiedImageError, ValueError, SyntaxError, DecompressionBombError)
MAX_BAD_TRIES = 50  # unreadable files in a row for one item before the run stops


def split_root(root: str, split: str = "train") -> str:
    """``root/split`` when it exists (the ImageNet layout), else ``root`` itself."""
    sub = os.path.join(root, split)
    return sub if os.path.isdir(sub) else root


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def _hidden(name: str) -> bool:
    """Names starting with '.': macOS's ``._photo.jpg`` resource forks (not images, though
    named like them), ``.ipynb_checkpoints``, ``.git``, ``.DS_Store``."""
    return name.startswith(".")


@functools.cache
def _other_image_types() -> frozenset:
    """Extensions PIL can open that the data sets do not read (``.gif``, ``.jfif``, ...):
    such files are left out with a note; notes, JSON and the like silently."""
    return frozenset(Image.registered_extensions()) - set(IMG_EXTENSIONS)


def walk_images(base: str, report: bool = True) -> Iterator[Tuple[str, List[str]]]:
    """(folder, its image file names, sorted) under ``base``, recursively, in sorted order.

    Symlinks are followed, except one to a folder it is in (by device and inode): such a loop
    (``sub/up -> ..``) would list the same images again and again, or never end.
    Hidden files and folders are left out. ``report``: log what was left out (folders that
    cannot be read, loops, images of types not read, e.g. GIF) when done.
    """
    chain: Dict[str, frozenset] = {}  # folder -> (device, inode) of it and its ancestors
    loops, others = 0, Counter()

    def unreadable(e: OSError) -> None:
        logger.warning("cannot list %s (%s): its images are left out", e.filename, e.strerror)

    for dirpath, dirnames, filenames in os.walk(base, followlinks=True, onerror=unreadable):
        above = chain.get(os.path.dirname(dirpath), frozenset())
        try:
            st = os.stat(dirpath)
        except OSError:
            continue
        key = (st.st_dev, st.st_ino)
        if st.st_ino and key in above:  # a link back to a folder it is in (inode 0: unknown)
            loops += 1
            dirnames[:] = []
            continue
        chain[dirpath] = above | {key} if st.st_ino else above
        dirnames[:] = sorted(d for d in dirnames if not _hidden(d))
        names = []
        for f in sorted(f for f in filenames if not _hidden(f)):
            ext = os.path.splitext(f)[1].lower()
            if _is_image(f):
                names.append(f)
            elif ext in _other_image_types():
                others[ext] += 1
        yield dirpath, names
    if report and loops:
        logger.warning(
            "%s: %d symlink(s) to a folder they are in (a loop) were not followed", base, loops
        )
    if report and others:
        kinds = ", ".join(f"{ext} {n}" for ext, n in others.most_common(6))
        logger.warning(
            "%s: left out %d image file(s) of other types (%s); read are %s",
            base,
            sum(others.values()),
            kinds,
            " ".join(IMG_EXTENSIONS),
        )


def first_image(root: str, split: str = "train") -> Optional[str]:
    """The first image file found under ``root`` (stops there: cheap on ImageNet), or None."""
    for dirpath, names in walk_images(split_root(root, split), report=False):
        if names:
            return os.path.join(dirpath, names[0])
    return None


def list_images(base: str) -> List[str]:
    """Image files under ``base``, recursively, in sorted order (possibly none)."""
    return [os.path.join(d, f) for d, names in walk_images(base) for f in names]


class PathList(Sequence[str]):
    """File paths held in two numpy arrays (UTF-8 bytes and offsets) instead of a list of str.

    A data set of 1.28M paths is ~260 MB of Python objects in each training process; every
    forked loader worker that reads them bumps their reference counts, which copies the pages
    they sit on into the worker, so over an epoch each worker grows a private copy (16 workers
    x 8 GPUs: ~33 GB of a node's memory). Two arrays have no per-path objects to touch.
    """

    def __init__(self, paths: Iterable[str]):
        encoded = [p.encode("utf-8", "surrogateescape") for p in paths]
        self._offsets = np.cumsum([0] + [len(b) for b in encoded], dtype=np.int64)
        self._data = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"path index {i} out of range for {n} paths")
        i = int(i) % n
        chunk = self._data[self._offsets[i] : self._offsets[i + 1]]
        return chunk.tobytes().decode("utf-8", "surrogateescape")


def find_images(root: str, split: str = "train") -> List[str]:
    """Image files under ``root`` (``root/train`` when it exists), sorted, recursively."""
    base = split_root(root, split)
    files = list_images(base)
    if not files:
        raise FileNotFoundError(
            f"no images ({', '.join(IMG_EXTENSIONS)}) found under {base}; "
            "expected an ImageNet root with train/<class>/*.JPEG or a folder of images"
        )
    return files


def image_files(items: Sequence[str]) -> List[str]:
    """Image files given as files or folders (searched, see :func:`find_images`), in order.

    Raises:
        FileNotFoundError: an item that does not exist, a folder without images.
    """
    paths: List[str] = []
    for item in items:
        if os.path.isdir(item):
            paths += find_images(item)
        elif os.path.isfile(item):
            paths.append(item)
        else:
            raise FileNotFoundError(f"{item} does not exist")
    return paths


@dataclass
class ClassFolder:
    """``root/<class>/**/<image>``: class names sorted, labels their indices (torchvision's
    ImageFolder convention, so ImageNet's synset folders give the usual 0-999 labels)."""

    root: str
    classes: List[str]
    samples: List[Tuple[str, int]]

    @property
    def targets(self) -> List[int]:
        return [label for _, label in self.samples]


def find_classes(root: str) -> ClassFolder:
    """Scans a class-folder tree; a clear error when it holds no class folder with images."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root} is not a directory")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not _hidden(e.name))
    label = {name: i for i, name in enumerate(classes)}
    samples: List[Tuple[str, int]] = []
    for dirpath, names in walk_images(root):  # one walk: its notes come once, not per class
        rel = os.path.relpath(dirpath, root)
        if rel != ".":  # images directly in root belong to no class
            y = label[rel.split(os.sep, 1)[0]]
            samples += [(os.path.join(dirpath, f), y) for f in names]
    if not samples:
        raise FileNotFoundError(
            f"no class folders with images under {root}: expected {root}/<class>/<image> "
            f"(e.g. an ImageNet train/ or val/ folder)"
        )
    empty = sorted(set(classes) - {classes[y] for _, y in samples})
    if empty:
        logger.warning(
            "%s: %d class folder(s) without images keep their label: %s",
            root,
            len(empty),
            ", ".join(empty[:8]) + (" ..." if len(empty) > 8 else ""),
        )
    return ClassFolder(root, classes, samples)


def class_difference(a: ClassFolder, b: ClassFolder) -> str:
    """What differs between two class folders' class lists ('' when nothing), e.g. "only in
    train/: n0144 (1 of 1000); only in val/: n0999 (1 of 999)"."""
    if a.classes == b.classes:
        return ""
    parts = []
    for x, y in ((a, b), (b, a)):
        only = sorted(set(x.classes) - set(y.classes))
        if only:
            names = ", ".join(only[:5]) + (" ..." if len(only) > 5 else "")
            parts.append(f"only in {x.root}: {names} ({len(only)} of {len(x.classes)})")
    return "; ".join(parts) or "the same names with duplicates"


def load_rgb(path: str) -> Image.Image:
    """Opens and fully decodes an image as RGB; raises on corrupt or truncated files."""
    enc = open_encoded(path)
    return decode_pil(enc.pil, enc.data)  # deep images stretched to 8 bits


def read_good(
    paths: Sequence[str], i: int, bad: Set[str], loader=load_rgb, seed: int = 0
) -> Tuple[int, object, int]:
    """Decodes ``paths[i]``; when it is unreadable, another file drawn at random instead.

    The draws (distinct files, up to :data:`MAX_BAD_TRIES` in all) come from ``seed``, the
    item's own seed: the same on every run and resume. Drawn from the whole data set, not the
    neighbours, they do not make a run of bad files (a corrupt folder) count its next good
    file many times, nor fail there: 50 unreadable draws in a row need most files bad.

    Args:
        paths: the data set's files.
        i: the index asked for.
        bad: files already reported unreadable (each is logged once per process).
        loader: path -> decoded image; raises one of :data:`UNREADABLE` on a bad file.
        seed: seeds the draws.

    Returns:
        (index of the file used, the decoded image, how many unreadable files were tried).

    Raises:
        ConfigError: every file tried was unreadable (all of them, in a small data set).
    """
    n = len(paths)
    tries = min(n, MAX_BAD_TRIES)
    draws = random.Random(seed).sample(range(n), tries)  # distinct files
    order = [i] + [j for j in draws if j != i]
    for k, j in enumerate(order[:tries]):
        try:
            return j, loader(paths[j]), k
        except UNREADABLE as e:
            if paths[j] not in bad:
                bad.add(paths[j])
                logger.warning("skipping unreadable image %s: %s", paths[j], e)
    from mae_transfer.engine.config import ConfigError  # here: the engine imports this module

    if tries == n:
        what = f"all {n} image files are unreadable"
    else:
        what = (
            f"{paths[i]} and {tries - 1} other files drawn at random from the {n} were all "
            f"unreadable ({len(bad)} reported so far): most files look unreadable"
        )
    raise ConfigError(f"{what}: is the data path a folder of images? (see the warnings above)")


def collate(batch) -> tuple:
    """Batches items of the form (field, ..., skipped): tensors are stacked, numbers become a
    tensor, still-encoded images (:class:`~mae_transfer.data.device_decode.PendingCrop`) a
    :class:`~mae_transfer.data.device_decode.PendingBatch`, the skipped-file counts are summed
    into an int."""
    from .device_decode import PendingBatch, PendingCrop

    *fields, skipped = zip(*batch)
    out = []
    for f in fields:
        if isinstance(f[0], torch.Tensor):
            out.append(torch.stack(f))
        elif isinstance(f[0], PendingCrop):
            out.append(PendingBatch(f))
        else:
            out.append(torch.tensor(f))
    return (*out, int(sum(skipped)))


def collate_flags(batch) -> tuple:
    """:func:`collate`, but each item's skipped count kept, as a (B,) tensor, instead of summed:
    evaluation leaves out the items an unreadable file was replaced in."""
    return (*collate(batch)[:-1], torch.tensor([item[-1] for item in batch]))


class ClassFolderDataset(torch.utils.data.Dataset):
    """Labelled images from class folders; items are ``(image, label, skipped)``.

    Keys are ``(epoch, index)`` as the samplers of :mod:`mae_transfer.data.sampler` yield them;
    a random ``transform`` runs under :func:`~mae_transfer.data.seeded` with the sample's seed,
    so augmentation is a pure function of (seed, epoch, index). An unreadable file is replaced
    by another one drawn at random (with that one's label), logged once and counted.

    Args:
        folder: a scanned class-folder tree (:func:`find_classes`).
        transform: PIL image -> tensor.
        seed: the run's seed.
        max_images: keep a fixed random subset of this many images (0 = all).
    """

    def __init__(self, folder: ClassFolder, transform, seed: int = 0, max_images: int = 0):
        from .sampler import sample_seed

        self.classes, self.transform, self.seed = folder.classes, transform, seed
        samples = folder.samples
        if 0 < max_images < len(samples):
            g = torch.Generator().manual_seed(sample_seed(seed, -1, len(samples)))
            keep = torch.randperm(len(samples), generator=g)[:max_images].sort().values
            samples = [samples[i] for i in keep.tolist()]
        # no list of per-image Python objects: see PathList
        self.paths = PathList(p for p, _ in samples)
        self.labels = np.fromiter((label for _, label in samples), np.int64, len(samples))
        self._bad: Set[str] = set()

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key) -> Tuple[torch.Tensor, int, int]:
        from .sampler import sample_seed, seeded

        epoch, index = key
        seed = sample_seed(self.seed, epoch, index)
        used, img, skipped = read_good(self.paths, index, self._bad, seed=seed)
        with seeded(seed):
            x = self.transform(img)
        return x, int(self.labels[used]), skipped


def readable_images(paths: Sequence[str], num: int):
    """The first ``num`` of ``paths`` that open and decode as images, and the (path, error) of
    those skipped on the way (a text file or a truncated image among --images)."""
    chosen, skipped = [], []
    for path in paths:
        if len(chosen) == num:
            break
        try:
            with Image.open(path) as img:
                img.load()
        except UNREADABLE as e:
            skipped.append((path, e))
            continue
        chosen.append(path)
    return chosen, skipped
