"""Loading every checkpoint form MAE users have, with a clear report; atomic saving.

Forms recognised (torch files read with ``torch.load(..., weights_only=True)``, safetensors
files with the ``safetensors`` package; an http(s) URL is downloaded once into torch hub's cache):

- official encoder-only ``mae_pretrain_vit_*.pth``: ``{'model': encoder state dict}``;
- official full / visualize checkpoints: ``{'model': encoder + decoder}``;
- our pretraining checkpoints: ``{'model', 'optimizer', 'epoch', 'args', ...}``;
- detectron2 / mmengine checkpoints: ``{'model': ...}`` / ``{'state_dict': ...}`` with the ViT
  under a prefix such as ``backbone.bottom_up.vit.`` or ``backbone.vit.``; a model zoo's
  ``.pkl`` (ViTDet's: ``backbone.net.``) read with numpy arrays and containers allowed only;
- plain state dicts, ``module.``-prefixed (DDP) ones included;
- any of these in OpenMMLab's names (mmseg, mmpretrain) or Hugging Face's (``ViTMAE*``,
  ``ViT*``), read as ours by the one table of :mod:`mae_transfer.checkpoint_keys`.

The ViT is found inside any of them by locating ``patch_embed.proj.weight``; the key prefix in
front of it is stripped, and what lies outside that prefix (a segmentor's rescaling and heads, a
detector's FPN) is reported as dropped. Shapes that differ only by input size (position table,
BEiT-style relative position bias tables, with or without their class-token rows) or patch size
(patch-embedding kernel, e.g. ViT-H/14 used as /16) are resized; any other mismatch is reported.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import pickle
import shutil
import sys
import tempfile
import time
import urllib.parse
import zipfile
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from .checkpoint_keys import KEY_TABLE, Renaming, to_timm_names
from .pos_embed import resize_patch_embed_kernel, resize_pos_embed, sincos_grid
from .vit import CLS_BIAS_ENTRIES, VisionTransformer, resize_1d_table, resize_bias_table

logger = logging.getLogger(__name__)

ANCHOR_KEY = "patch_embed.proj.weight"
BIAS_TABLE = "relative_position_bias_table"  # BEiT's relative position bias (mmseg's too)
DECOMPOSED_TABLES = ("rel_pos_h", "rel_pos_w")  # ViTDet's decomposed relative position
STATE_DICT_KEYS = ("model", "state_dict", "module", "model_state")
# Checkpoint keys a ViT encoder is expected not to use: the MAE decoder and its mask token
# (and a fine-tuned classifier's fc_norm / head, see _expected_unused).
DECODER_PREFIXES = ("decoder_", "mask_token")
# Buffers a checkpoint may hold that the model computes itself (mmseg's BEiT attention's), and
# heads no model here has (Hugging Face ViTModel's pooler: dense + tanh on the class token).
DERIVED_BUFFERS = ("relative_position_index",)
OTHER_HEADS = ("pooler.",)
# Keys an encoder may lack in the checkpoint and is expected to learn from scratch (the last:
# ViTDet's convolutional propagation, residual_blocks).
NEW_PARAM_MARKERS = (
    "rel_pos_h",
    "rel_pos_w",
    "relative_position_bias_table",
    ".ls1.",
    ".ls2.",
    ".residual.",
)
# A classifier's pooling norm and head: new when it starts from a pretraining checkpoint.
NEW_PARAM_PREFIXES = ("fc_norm.", "head.")
MIN_LOADED_FRACTION = 0.5


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used for the model it was given to."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint path that is not a file (both a CheckpointError and a FileNotFoundError)."""


class _UnreadableError(CheckpointError):
    """A file that is no checkpoint or a damaged one (not one whose objects weights_only
    refuses): a cached download that raises it is removed (:func:`_load_url`)."""


# The first bytes of what torch.save writes: a zip archive (torch >= 1.6) or, in the legacy
# format, a pickle (protocol 2+ starts with 0x80).
TORCH_MAGIC = (b"PK\x03\x04", b"\x80")
SAFETENSORS_MAX_HEADER = 100_000_000  # bytes (the format's own limit)
URL_SCHEMES = ("http://", "https://")


# -- reading ----------------------------------------------------------------------------------
def load_file(path: str, mmap: bool = False) -> Any:
    """Reads a checkpoint on CPU, never running code from it: a torch file with
    ``torch.load(..., weights_only=True)``, a safetensors file (timm's and Hugging Face's hub
    files) with the ``safetensors`` package; an http(s) URL is read from its local copy
    (:func:`download`). A clear error for unsafe or bad files.

    ``mmap``: memory-map a torch file where its format allows it (zip, torch >= 1.6): the processes
    of a node resuming the same checkpoint then share its pages in the page cache instead of
    each reading a copy (8 x 8 GB for a ViT-H run with its AdamW state); an in-place update
    copies only the page it touches, and the file is never written. Only for files that are
    replaced whole, never rewritten in place, while their tensors live (our own checkpoints,
    :func:`save_atomic`): a file truncated under a mapping kills the process (SIGBUS), and
    detectron2 and mmengine save over their checkpoints in place.
    """
    if is_url(path):
        return _load_url(path, mmap)
    return _load_local(path, mmap)


def _load_local(path: str, mmap: bool) -> Any:
    if not os.path.isfile(path):
        hint = "; only http:// and https:// URLs are downloaded" if "://" in str(path) else ""
        raise CheckpointNotFoundError(f"checkpoint not found: {path}{hint}")
    kind = file_format(path)
    if kind is None:
        raise _UnreadableError(
            f"{path} is not a PyTorch checkpoint (it starts with {_head(path)!r}, nor is it a "
            "safetensors file; an HTML page or an error message saved by a failed download?)"
        )
    if kind == "safetensors":
        return _load_safetensors(path)
    if path.endswith(".pkl") and not _head(path).startswith(TORCH_MAGIC[0]):
        return _arrays_as_tensors(load_array_pickle(path))  # a model zoo's (ViTDet's)
    return _load_torch(path, mmap)


def is_url(path: Any) -> bool:
    """True for an http(s) URL, which :func:`load_file` downloads (other ``scheme://`` paths,
    e.g. mmengine's storage backends, are not)."""
    return isinstance(path, str) and path.startswith(URL_SCHEMES)


def file_format(path: str) -> Optional[str]:
    """'safetensors', 'torch' (zip or legacy pickle) or None, from the file's first bytes."""
    head = _head(path)
    # safetensors: an 8-byte little-endian header length, then the header's JSON object (text
    # in the first 8 bytes, as an HTML or JSON page has, makes a length far above the limit)
    size = int.from_bytes(head[:8], "little")
    if len(head) > 8 and head[8:9] == b"{" and size < SAFETENSORS_MAX_HEADER:
        return "safetensors"
    return "torch" if head.startswith(TORCH_MAGIC) else None


def _head(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read(16)


def _load_safetensors(path: str) -> Dict[str, torch.Tensor]:
    """A safetensors file's tensors (a format of tensors only: nothing to unpickle)."""
    try:
        from safetensors.torch import load_file as read_safetensors
    except ImportError as e:
        raise CheckpointError(
            f"{path} is a safetensors file: reading it needs the safetensors package "
            "(pip install safetensors; timm installs it too)"
        ) from e
    try:
        return read_safetensors(path, device="cpu")
    except Exception as e:  # noqa: BLE001 - re-raised with context
        raise _UnreadableError(f"cannot read safetensors file {path}: {e}") from e


def _load_torch(path: str, mmap: bool) -> Any:
    """``torch.load`` with ``weights_only=True`` (mmengine's data containers allowed where
    mmengine is installed); a clear error for files that hold other objects."""
    try:
        try:
            return _load_safely(path, mmap)
        except Exception as e:  # noqa: BLE001 - retried or re-raised below
            if not ("mmengine" in str(e) and _allow_mmengine_objects()):
                raise
        return _load_safely(path, mmap)  # an mmengine checkpoint (iter_N.pth, epoch_N.pth)
    except Exception as e:  # noqa: BLE001 - re-raised with context
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise CheckpointError(
                f"{path} holds Python objects that weights_only=True refuses to unpickle (only "
                f"tensors, numbers, strings and containers are read). Re-save it as a plain state "
                f"dict, e.g. torch.save({{'model': sd}}, ...). Details: {e}"
            ) from e
        raise _UnreadableError(f"cannot read checkpoint {path}: {e}") from e


# what a detectron2 / Detectron model-zoo .pkl is made of: numpy arrays in dicts (Python 3
# pickles of bytes go through _codecs.encode)
PKL_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("collections", "OrderedDict"),
    ("_codecs", "encode"),
}


class _ArraysOnly(pickle.Unpickler):
    """Unpickles numpy arrays, numbers, strings and containers; anything else (a function to
    call, e.g. ``os.system``) is refused before it runs."""

    def find_class(self, module: str, name: str):
        if (module, name) in PKL_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a weights file")


def load_array_pickle(path: str) -> Any:
    """A model zoo's ``.pkl`` (detectron2's, Detectron's): a pickle read with only numpy
    arrays, numbers, strings and containers allowed (detectron2's own ``pickle.load`` runs
    whatever the file asks for)."""
    try:
        with open(path, "rb") as f:
            return _ArraysOnly(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise CheckpointError(
            f"{path} is not a weights .pkl that can be read safely ({e}); a .pkl here is a "
            "pickle of numpy arrays (detectron2's model zoo); PyTorch checkpoints end in .pth"
        ) from e


def _arrays_as_tensors(obj: Any) -> Any:
    """``obj`` with the numpy arrays in its dicts as tensors (as detectron2 converts them)."""
    if isinstance(obj, Mapping):
        return {k: _arrays_as_tensors(v) for k, v in obj.items()}
    return torch.as_tensor(obj) if isinstance(obj, np.ndarray) else obj


def download(url: str) -> str:
    """The local copy of ``url`` in torch hub's cache, downloaded on first use.

    The copy is ``<torch hub dir>/checkpoints/<host>/<path of the URL>`` (``$TORCH_HOME``
    moves it): the URL's path keeps apart files of the same name from different places (every
    Hugging Face repository has a ``model.safetensors``). Each download goes into a temporary
    file of its own beside the copy (the ranks of a torchrun may all download at once), is
    checked (:func:`_check_download`), then renamed into place: the copy is always a whole
    checkpoint, never half-written. A download that is no checkpoint (a login or error page) or
    is cut short is removed, so that the next try downloads anew.
    """
    dst = cache_path(url)
    if os.path.isfile(dst):
        return dst
    directory = os.path.dirname(dst)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=".partial", dir=directory)
    os.close(fd)
    logger.info("downloading %s to %s", url, dst)
    try:
        try:
            torch.hub.download_url_to_file(url, tmp, progress=sys.stderr.isatty())
        except Exception as e:  # noqa: BLE001 - a network or HTTP error, named with the fix
            raise CheckpointError(
                f"cannot download {url}: {e}. Download it yourself and give the file's path"
            ) from e
        _check_download(url, tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # as a file torch's downloader made (mkstemp: 0600)
        os.replace(tmp, dst)  # atomic: another process reads the old copy or this one, whole
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
    return dst


def _check_download(url: str, path: str) -> None:
    """Raises when the download ``path`` of ``url`` is no checkpoint or is cut short."""
    if file_format(path) is None:
        raise CheckpointError(
            f"{url} gave no checkpoint (it starts with {_head(path)!r}: a login or error page?); "
            "nothing was kept in the cache"
        )
    short = _cut_short(path)
    if short:
        raise CheckpointError(
            f"the download of {url} is incomplete: {short} (the connection broke off?); nothing "
            "was kept in the cache, so the next load downloads it again"
        )


def _cut_short(path: str) -> Optional[str]:
    """Why the checkpoint file ``path`` is not whole, or None. torch's downloader does not
    compare the size with the Content-Length (a connection closed early ends the download
    silently), so a file's structure is checked: a safetensors file is as long as its header
    says, a torch zip (torch >= 1.6) ends with its central directory. A legacy pickle has no
    such end to check: a damaged one is removed when it fails to read (:func:`_load_url`)."""
    kind, size = file_format(path), os.path.getsize(path)
    if kind == "safetensors":
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = f.read(n)
        try:
            entries = json.loads(header)
            ends = [e["data_offsets"][1] for k, e in entries.items() if k != "__metadata__"]
            end = max(ends, default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            return f"its safetensors header ({n} bytes) is cut short or damaged"
        return f"{size} bytes, where its header needs {8 + n + end}" if size < 8 + n + end else None
    if not _head(path).startswith(TORCH_MAGIC[0]):
        return None
    try:
        with zipfile.ZipFile(path):  # reads the central directory, the archive's last part
            return None
    except (zipfile.BadZipFile, OSError) as e:
        return f"a torch zip archive without its central directory at the end ({e})"


def _load_url(url: str, mmap: bool) -> Any:
    """Reads ``url``'s copy in torch hub's cache, downloaded if need be (:func:`download`).

    A copy that cannot be read (damaged on disk, or cut short where :func:`_cut_short` cannot
    tell, e.g. by an older version of this code) is removed and the error names the URL, so
    that the next load downloads it anew. A copy that another process (a rank) removed or
    replaced while this one read it is read once more.
    """
    for last in (False, True):  # the second pass returns or raises
        path = download(url)
        seen = _identity(path)
        try:
            return _load_local(path, mmap)
        except (OSError, CheckpointError) as e:
            changed = seen is None or _identity(path) != seen
            if changed and not last:
                logger.info(
                    "%s: its copy %s changed while it was read; reading it again", url, path
                )
                continue
            if changed:
                raise CheckpointError(
                    f"cannot read {url}: its copy {path} was removed or replaced by another "
                    f"process while it was read, twice; try again ({e})"
                ) from e
            if isinstance(e, _UnreadableError):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
                raise CheckpointError(
                    f"cannot read {url}: its copy in torch hub's cache ({path}) is damaged and was "
                    "removed, so the next load downloads it again (or download it yourself and "
                    f"give the file's path). Details: {e}"
                ) from e
            if isinstance(e, CheckpointError):  # e.g. objects weights_only refuses: kept
                raise
            raise CheckpointError(f"cannot read {url} from its copy {path}: {e}") from e


def _identity(path: str) -> Optional[Tuple[int, ...]]:
    """What tells one file at ``path`` from another put there since (None: no file)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def cache_path(url: str) -> str:
    """Where :func:`download` keeps ``url``: ``<hub dir>/checkpoints/<host>/<path>`` (a query
    string adds its hash to the file name)."""
    parts = urllib.parse.urlsplit(url)
    names = [n for n in parts.path.split("/") if n not in ("", ".", "..")] or ["index"]
    if parts.query:
        stem, ext = os.path.splitext(names[-1])
        names[-1] = f"{stem}-{hashlib.sha256(parts.query.encode()).hexdigest()[:8]}{ext}"
    host = parts.netloc.rsplit("@", 1)[-1].replace(":", "_")
    return os.path.join(torch.hub.get_dir(), "checkpoints", host, *names)


def _load_safely(path: str, mmap: bool) -> Any:
    # argparse.Namespace: the official MAE training loop stores its args as one; it is a
    # plain attribute container, safe to allow.
    with torch.serialization.safe_globals([argparse.Namespace]):
        if not mmap:
            return torch.load(path, map_location="cpu", weights_only=True)
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except (RuntimeError, OSError) as e:  # a legacy (non-zip) file, or a filesystem
            logger.info("%s: not memory-mapped (%s); reading it whole", path, e)
            return torch.load(path, map_location="cpu", weights_only=True)


def _allow_mmengine_objects() -> bool:
    """Allow-lists the data containers mmengine stores in its checkpoints (its message hub's
    ``HistoryBuffer`` and numpy arrays; :mod:`mae_transfer.compat.mmengine_compat`), where
    mmengine is installed; True if that was possible."""
    try:
        from mmengine.logging.history_buffer import HistoryBuffer

        from mae_transfer.compat import mmengine_compat
    except ImportError:
        return False
    mmengine_compat.apply()
    return HistoryBuffer in torch.serialization.get_safe_globals()


def find_state_dict(obj: Any) -> Dict[str, torch.Tensor]:
    """The tensor dictionary inside a checkpoint object (see module docstring for the forms)."""
    if isinstance(obj, Mapping):
        for key in STATE_DICT_KEYS:
            if key in obj and isinstance(obj[key], Mapping):
                return find_state_dict(obj[key])
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
    raise CheckpointError(
        f"no state dict found in checkpoint (a {type(obj).__name__}"
        + (f" with keys {sorted(obj)[:10]}" if isinstance(obj, Mapping) else "")
        + f"); expected one of {STATE_DICT_KEYS} or a dict of tensors"
    )


def strip_to_vit(state: Mapping[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], str]:
    """Keeps the ViT's keys, in our names (another codebase's read by
    :func:`~mae_transfer.checkpoint_keys.to_timm_names`) and without the prefix found in front
    of ``patch_embed.proj.weight``.

    Returns:
        (state dict with bare ViT names, the stripped prefix).
    """
    state, _ = to_timm_names(state)
    anchors = [k for k in state if k.endswith(ANCHOR_KEY)]
    if not anchors:
        return dict(state), ""
    prefix = min(anchors, key=len)[: -len(ANCHOR_KEY)]
    if not prefix:
        return dict(state), ""
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}, prefix


def load_vit_state_dict(path: str) -> Tuple[Dict[str, torch.Tensor], str]:
    """Reads ``path`` and returns the ViT (or MAE) state dict with bare names and its prefix."""
    return strip_to_vit(find_state_dict(load_file(path)))


# -- the report -------------------------------------------------------------------------------
@dataclass
class LoadReport:
    """What a load did: every model and checkpoint key ends up in exactly one list (after the
    checkpoint's names are read as ours; ``fused`` lists what was made of several of its
    tensors, e.g. a qkv from Hugging Face's query, key and value, which then loaded or not as
    the other tensors do)."""

    source: str = ""
    target: str = ""  # the submodule loaded into, when the model holds the ViT (e.g. 'vit')
    loaded: List[str] = field(default_factory=list)
    resized: List[str] = field(default_factory=list)
    new: List[str] = field(default_factory=list)  # in the model, expected to be absent
    missing: List[str] = field(default_factory=list)  # in the model, unexpectedly absent
    dropped: List[str] = field(default_factory=list)  # in the checkpoint, expected unused
    unexpected: List[str] = field(default_factory=list)
    mismatched: List[str] = field(default_factory=list)
    fused: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self) -> str:
        into = f" into the model's ViT '{self.target}'" if self.target else ""
        lines = [f"loaded {len(self.loaded)} tensors from {self.source or 'checkpoint'}{into}"]
        groups = [
            ("fused from the checkpoint's parts", self.fused),
            ("resized", self.resized),
            ("new (initialised here)", self.new),
            ("dropped from checkpoint (not used by this model)", self.dropped),
            ("MISSING from checkpoint", self.missing),
            ("UNEXPECTED in checkpoint", self.unexpected),
            ("SHAPE MISMATCH, not loaded", self.mismatched),
        ]
        for title, keys in groups:
            if keys:
                lines.append(f"  {title} ({len(keys)}): {_abbreviate(keys)}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def _abbreviate(keys: List[str], limit: int = 8) -> str:
    """Collapses ``blocks.{i}.x`` into ``blocks.*.x`` and lists at most ``limit`` names."""
    collapsed: List[str] = []
    for k in keys:
        parts = k.split(".")
        parts = ["*" if p.isdigit() else p for p in parts]
        name = ".".join(parts)
        if name not in collapsed:
            collapsed.append(name)
    more = f", ... (+{len(collapsed) - limit})" if len(collapsed) > limit else ""
    return ", ".join(collapsed[:limit]) + more


# -- adapting and loading ---------------------------------------------------------------------
def _grid_of(model: nn.Module) -> Optional[Tuple[int, int]]:
    """The grid of the model's position table: its patch grid, unless it holds the table at
    another (a ViT's ``pos_grid``: ViTDet's, at the pretraining's size)."""
    if getattr(model, "pos_grid", None) is not None:
        return tuple(model.pos_grid)
    pe = getattr(model, "patch_embed", None)
    return tuple(pe.grid_size) if pe is not None and hasattr(pe, "grid_size") else None


def _adapt_pos_embed(value: torch.Tensor, param: torch.Tensor, model: nn.Module):
    """Fits a (1, P + L, D) position table to the model's, or returns None when impossible.

    A frozen table (MAE's fixed sin-cos) keeps the model's own values, built for its grid; a
    learned one is interpolated bicubically, and its class-token row added or dropped.
    """
    grid = _grid_of(model)
    if value.ndim != 3 or value.shape[-1] != param.shape[-1] or grid is None:
        return None
    if not param.requires_grad:
        return param.detach().clone()
    n_grid = grid[0] * grid[1]
    n_prefix = param.shape[1] - n_grid
    for src_prefix in (1, 0):  # a class-token row first, as MAE's tables have
        patches = value[:, src_prefix:]
        old_grid = _source_grid(patches, grid) if patches.shape[1] else None
        if old_grid is not None:
            break
    else:
        return None
    out = resize_pos_embed(patches, grid, num_prefix_tokens=0, old_grid=old_grid)
    if n_prefix:
        cls = value[:, :1] if src_prefix else torch.zeros_like(value[:, :1])
        out = torch.cat([cls, out], dim=1)
    return out


def _adapt_bias_table(
    value: torch.Tensor, target: torch.Tensor, attn: nn.Module
) -> Optional[torch.Tensor]:
    """Fits a BEiT / mmseg relative position bias table to the model's, or returns None.

    A table holds (2h-1) * (2w-1) offsets of an h x w grid (an odd count), followed by BEiT's
    :data:`~mae_transfer.vit.CLS_BIAS_ENTRIES` class-token rows when its model had a class token
    (an even count). The offsets are resized bicubically to the grid of ``attn`` (as the model
    does for another input size; mmseg's BEiT interpolates them by a geometric sequence instead),
    and the class rows dropped, kept, or taken from ``target`` (the model's own, initialised
    here) when the checkpoint has none.
    """
    grid = getattr(attn, "rel_pos_size", None)
    if value.ndim != 2 or value.shape[1:] != target.shape[1:] or grid is None:
        return None
    has_cls = value.shape[0] % 2 == 0
    old_grid = _offset_grid(value.shape[0] - (CLS_BIAS_ENTRIES if has_cls else 0), grid)
    if old_grid is None:
        return None
    table = resize_bias_table(value, old_grid, tuple(grid), class_token=has_cls)
    wants_cls = bool(getattr(attn, "class_token", False))
    if has_cls and not wants_cls:
        return table[:-CLS_BIAS_ENTRIES]
    if wants_cls and not has_cls:
        return torch.cat([table, target[-CLS_BIAS_ENTRIES:]], dim=0)
    return table


def _offset_grid(n: int, grid: Sequence[int]) -> Optional[Tuple[int, int]]:
    """The h x w grid whose (2h-1) * (2w-1) offsets are ``n``: the model's ``grid`` when the
    count matches, else square; None when none fits."""
    h, w = grid
    if n == (2 * h - 1) * (2 * w - 1):
        return h, w
    side = math.isqrt(n)
    return ((side + 1) // 2,) * 2 if side * side == n and side % 2 else None


def _source_grid(patches: torch.Tensor, grid: Tuple[int, int]) -> Optional[Tuple[int, int]]:
    """The grid of a table's patch rows: read from MAE's fixed sin-cos values (any shape, e.g.
    a 12 x 14 pretraining at 192 x 224), else the model's grid when the count matches, else
    square; None when none fits."""
    found = sincos_grid(patches)
    if found is not None:
        return found
    n = patches.shape[1]
    if n == grid[0] * grid[1]:
        return grid
    side = math.isqrt(n)
    return (side, side) if side * side == n else None


def adapt_state_dict(
    state: Mapping[str, torch.Tensor], model: nn.Module, report: LoadReport
) -> Dict[str, torch.Tensor]:
    """Resizes position tables and patch kernels to the model, and sorts keys into the report.

    Returns:
        the tensors to load into ``model`` (everything loadable, shapes matching).
    """
    own = model.state_dict()
    out: Dict[str, torch.Tensor] = {}
    for name, value in state.items():
        if name not in own:
            unused = _expected_unused(name, own) or name.startswith(
                tuple(getattr(model, "unused_checkpoint_prefixes", ()))
            )
            (report.dropped if unused else report.unexpected).append(name)
            continue
        target = own[name]
        if value.shape == target.shape:
            out[name] = value
            report.loaded.append(name)
            continue
        fixed = _fix_shape(name, value, target, model)
        if fixed is not None and fixed.shape == target.shape:
            out[name] = fixed
            report.loaded.append(name)
            report.resized.append(f"{name} {tuple(value.shape)}->{tuple(target.shape)}")
        else:
            report.mismatched.append(f"{name} {tuple(value.shape)} vs model {tuple(target.shape)}")
    for name in own:
        if name not in state:
            (report.new if _expected_new(name) else report.missing).append(name)
    return out


def _fix_shape(name, value, target, model) -> Optional[torch.Tensor]:
    if name.endswith("pos_embed"):
        return _adapt_pos_embed(value, getattr_path(model, name), model)
    if name.endswith(BIAS_TABLE):
        return _adapt_bias_table(value, target, getattr_path(model, name[: -len(BIAS_TABLE) - 1]))
    if name.endswith(DECOMPOSED_TABLES) and value.shape[1:] == target.shape[1:]:
        # ViTDet's (2 * size - 1, head_dim) offsets of another window or grid: resized as its
        # forward resizes them to the grid it sees (linearly)
        return resize_1d_table(value, target.shape[0])
    if name.endswith(ANCHOR_KEY) and value.shape[:2] == target.shape[:2]:
        have, want = tuple(value.shape[-2:]), tuple(target.shape[-2:])
        if (have, want) != ((14, 14), (16, 16)):  # (ViT-H/14 run as /16, as ViTDet: expected)
            logger.warning(
                "the checkpoint's patch size is %s, the model's %s: its patch kernel is resized "
                "to fit, so the encoder no longer computes what it was pretrained to; to use it "
                "as trained, give the model patch size %d",
                "x".join(map(str, have)),
                "x".join(map(str, want)),
                have[0],
            )
        return resize_patch_embed_kernel(value, target.shape[-2:])
    return None


def getattr_path(module: nn.Module, name: str):
    for part in name.split("."):
        module = getattr(module, part)
    return module


def _expected_unused(name: str, own: Mapping[str, torch.Tensor]) -> bool:
    if name.startswith(DECODER_PREFIXES + OTHER_HEADS) or name.endswith(DERIVED_BUFFERS):
        return True
    if name.startswith("norm.") and "norm.weight" not in own:  # a classifier pooling to fc_norm
        return True
    if name.startswith(NEW_PARAM_PREFIXES):  # a classifier's head, loaded into an encoder
        return True
    return name == "cls_token" and "cls_token" not in own


def _expected_new(name: str) -> bool:
    return name.startswith(NEW_PARAM_PREFIXES) or any(m in name for m in NEW_PARAM_MARKERS)


def load_pretrained(
    model: nn.Module,
    path_or_state,
    min_loaded_fraction: float = MIN_LOADED_FRACTION,
    log: bool = True,
    source: str = "",
) -> LoadReport:
    """Loads an MAE / ViT checkpoint (any form, see module docstring) into ``model``.

    Args:
        model: a ``MaskedAutoencoderViT`` or ``VisionTransformer`` (or anything with their
            names), or a module holding one ``VisionTransformer`` (a pyramid, a detector), into
            which the weights then go (the report's ``target`` names it).
        path_or_state: a file path or an http(s) URL (downloaded once into torch hub's
            cache), or an already-read state dict; in our names or another codebase's
            (OpenMMLab, Hugging Face: :mod:`mae_transfer.checkpoint_keys`).
        min_loaded_fraction: below this fraction of the model's tensors loaded, raise.
        source: where a state dict was read from (for the report).

    Returns:
        the :class:`LoadReport` (also logged).

    Raises:
        CheckpointError: when (almost) nothing matches, naming the likely cause, or when the
            model holds several ViTs.
    """
    target, model = load_target(model)
    if isinstance(path_or_state, (str, os.PathLike)):
        source = str(path_or_state)
        whole = find_state_dict(load_file(source))
    else:
        source = source or "state dict"
        whole = find_state_dict(path_or_state)
    whole, renaming = to_timm_names(whole)
    state, prefix = strip_to_vit(whole)
    fused = [k[len(prefix) :] if k.startswith(prefix) else k for k in renaming.fused]
    report = LoadReport(
        source=_describe_source(source, prefix, renaming), target=target, fused=fused
    )
    to_load = adapt_state_dict(state, model, report)
    # the rest of a bigger model (a segmentor's rescaling and heads), outside the prefix: listed
    report.dropped += [k for k in whole if not k.startswith(prefix)]
    n_model = len(model.state_dict())
    if len(to_load) < min_loaded_fraction * n_model:
        raise CheckpointError(
            f"only {len(to_load)} of the model's {n_model} tensors match {source}. "
            + diagnose(state, model)
            + "\n"
            + report.summary()
        )
    model.load_state_dict(to_load, strict=False)
    if log:
        (logger.info if report.ok else logger.warning)("%s", report.summary())
    return report


def _describe_source(source: str, prefix: str, renaming: Renaming) -> str:
    """'x.pth (Hugging Face names read as ours; prefix 'vit.' stripped)' for the report."""
    notes = [f"{renaming.scheme} names read as ours"] if renaming.scheme else []
    notes += [f"prefix '{prefix}' stripped"] if prefix else []
    return source + (f" ({'; '.join(notes)})" if notes else "")


def load_target(model: nn.Module) -> Tuple[str, nn.Module]:
    """(name, module) that a checkpoint loads into: ``model`` itself ('') when it is a ViT or
    has ViT names at its top level, else the one ``VisionTransformer`` it holds."""
    if isinstance(model, VisionTransformer) or _has_param(model, ANCHOR_KEY):
        return "", model
    vits = [(n, m) for n, m in model.named_modules() if isinstance(m, VisionTransformer)]
    if len(vits) > 1:
        raise CheckpointError(
            f"the model ({type(model).__name__}) holds {len(vits)} ViTs "
            f"({', '.join(n for n, _ in vits)}): pass the one to load into (e.g. "
            f"model.{vits[0][0]})"
        )
    return vits[0] if vits else ("", model)


def _has_param(module: nn.Module, name: str) -> bool:
    try:
        getattr_path(module, name)
    except AttributeError:
        return False
    return True


def mismatch_phrases(
    missing: Sequence[str],
    shapes: Sequence[Tuple[str, Sequence[int], Sequence[int]]],
    unexpected: Sequence[str],
    groups: Callable[[Sequence[str]], str],
    total: Optional[int] = None,
) -> List[str]:
    """What keeps a checkpoint from filling a whole model, one phrase per kind: tensors
    missing, of another shape ((key, checkpoint shape, model shape), the first three shown),
    unexpected; keys summarised by ``groups``; ``total``: the model's tensor count, if known.
    [] when it fits."""
    out = []
    if missing:
        of = f" of the model's {total}" if total is not None else ""
        out.append(f"{len(missing)}{of} tensors missing ({groups(missing)})")
    if shapes:
        shown = [f"{k} {tuple(a)} vs model {tuple(b)}" for k, a, b in shapes[:3]]
        more = f", ... (+{len(shapes) - 3})" if len(shapes) > 3 else ""
        out.append(f"{len(shapes)} of another shape ({', '.join(shown)}{more})")
    if unexpected:
        out.append(f"{len(unexpected)} unexpected ({groups(unexpected)})")
    return out


def describe_vit(state: Mapping[str, torch.Tensor]) -> str:
    """'ViT with 12 blocks of width 768, patch 16' from a state dict, or what is known of it."""
    if ANCHOR_KEY not in state:
        return "no ViT (no patch_embed.proj.weight)"
    w = state[ANCHOR_KEY]
    blocks = {int(k.split(".")[1]) for k in state if k.startswith("blocks.")}
    depth = max(blocks) + 1 if blocks else 0
    return f"ViT with {depth} blocks of width {w.shape[0]}, patch {w.shape[-1]}"


def diagnose(state: Mapping[str, torch.Tensor], model: nn.Module) -> str:
    """A sentence on why a checkpoint does not fit: size, patch, or not a ViT at all."""
    mine = describe_vit(model.state_dict())
    theirs = describe_vit(state)
    if ANCHOR_KEY not in state:
        sample = ", ".join(list(state)[:5])
        return (
            "The checkpoint holds no ViT under the names of the official MAE / timm, "
            f"{' or '.join(KEY_TABLE)} (keys start with: {sample}); is it the right file? "
            f"The model is a {mine}."
        )
    if ANCHOR_KEY not in model.state_dict():
        return (
            f"The checkpoint is a {theirs}, but the model ({type(model).__name__}) is not a ViT "
            "(no patch_embed.proj.weight) and holds no mae_transfer VisionTransformer: pass the "
            "ViT itself (e.g. a pyramid's .vit), or call the module's own load_pretrained."
        )
    if theirs != mine:
        return (
            f"The checkpoint is a {theirs} but the model is a {mine}: wrong model size? Build the "
            "model that matches the checkpoint (e.g. vit_large_patch16 for mae_pretrain_vit_large)."
        )
    return f"Both are a {mine}, but names differ; is it a ViT checkpoint from another codebase?"


# -- writing ----------------------------------------------------------------------------------
def save_atomic(obj: Any, path: str) -> None:
    """``torch.save`` to a temporary file in the same directory, then rename over ``path``.

    A crash mid-write leaves the previous file intact; readers never see a partial file.
    """
    _replace_atomically(path, lambda f: torch.save(obj, f))


def copy_atomic(src: str, dst: str) -> None:
    """``dst`` becomes a byte copy of ``src``, atomically (temporary file, fsync, rename): a
    checkpoint's extra names (``checkpoint-N.pth``, the best copy) without serialising the
    state again. A copy, not a hard link: a file rewritten in place under one name (say, a
    ``torch.save`` that strips the optimizer from the best copy) must not change the others."""

    def copy(f) -> None:
        with open(src, "rb") as source:
            shutil.copyfileobj(source, f, 16 << 20)

    _replace_atomically(dst, copy)


def write_text_atomic(text: str, path: str) -> None:
    """Writes ``text`` (UTF-8) to ``path`` atomically, as :func:`save_atomic` does."""
    _replace_atomically(path, lambda f: f.write(text.encode("utf-8")))


def _replace_atomically(path: str, write: Callable[[Any], None]) -> None:
    """``write(f)`` into a temporary file beside ``path``, fsync, then rename it over ``path``
    and fsync the directory: a crash mid-write leaves the previous file intact, readers never
    see a partial one, and a failed write leaves no temporary file behind."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    suffix = os.path.splitext(path)[1] or ".tmp"  # its kind: a .pth (cleaned when stale), .json
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=suffix, dir=directory)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # as open() would create it (mkstemp makes it 0600)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(directory)


TMP_PREFIX = ".tmp-"


def _umask() -> int:
    """This process's umask, read without changing it (Linux), else by setting it back."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def remove_stale_temporaries(directory: str, older_than_s: float = 3600) -> List[str]:
    """Removes what a process killed mid-write left in ``directory`` (temporary checkpoint
    files of :func:`save_atomic` / :func:`copy_atomic`, whole checkpoints in size) when older
    than ``older_than_s`` (a write in progress is minutes old at most); returns their paths."""
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    now = time.time()
    for name in names:
        path = os.path.join(directory, name)
        if not (name.startswith(TMP_PREFIX) and name.endswith(".pth")):
            continue
        try:
            if now - os.path.getmtime(path) > older_than_s:
                os.remove(path)
                removed.append(path)
        except OSError:
            continue
    return removed


def _fsync_dir(directory: str) -> None:
    """Makes a rename in ``directory`` durable (best effort: not every platform allows it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
