"""Shared fixtures: tiny model sizes and small image folders made on the fly."""

from __future__ import annotations

import logging
import os
import pickle
import random
import shutil
import socket
import sys
import traceback

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# A MAE small enough for CPU tests: 32-d encoder of 2 blocks, 32-d decoder of 1 block.
TINY_MAE = dict(
    embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2
)
TINY_VIT = dict(embed_dim=32, depth=4, num_heads=2)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    yield


def _logger_states() -> dict:
    """{logger: (handlers, level, propagate, disabled)} of the root and every named logger."""
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    return {
        log: (list(log.handlers), log.level, log.propagate, log.disabled)
        for log in loggers
        if isinstance(log, logging.Logger)
    }


@pytest.fixture(autouse=True)
def _restore_environ_and_logging():
    """Command lines called in this process set up logging for their run (the root's handlers
    and level: engine.launch.setup_logging; file handlers on 'mae_transfer', 'detectron2', ...:
    detection's attach_logs, detectron2's setup) and export variables (LOCAL_RANK): the next
    test gets both as they were, the handlers added since closed (their log files too)."""
    environ = dict(os.environ)
    before = _logger_states()
    known = {handler for handlers, *_ in before.values() for handler in handlers}  # (pytest's)
    yield
    for log in _logger_states():  # (loggers made during the test: no handlers, default state)
        handlers, level, propagate, disabled = before.get(log, ([], logging.NOTSET, True, False))
        for handler in log.handlers:
            if handler not in known:
                handler.close()
        log.handlers[:] = handlers
        log.setLevel(level)
        log.propagate, log.disabled = propagate, disabled
    for key in set(os.environ) - set(environ):
        del os.environ[key]
    for key, value in environ.items():
        if os.environ.get(key) != value:
            os.environ[key] = value


@pytest.fixture
def fused_attention(monkeypatch):
    """Attention on torch's fused kernel whatever the device and precision, as on a GPU (on a
    CPU under bf16 the blocks write it out: mae_transfer.attention)."""
    import mae_transfer.attention

    monkeypatch.setattr(mae_transfer.attention, "explicit_attention_faster", lambda x: False)


def write_images(directory: str, n: int, size=(40, 56), seed: int = 0) -> list:
    """n random-texture RGB images (smooth blobs + noise) as PNG and JPEG files."""
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        h, w = size
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([np.sin(xx / (3 + c + i % 5) + yy / (4 + c)) for c in range(3)], axis=-1)
        img = (127 * (base + 1) + rng.normal(0, 10, (h, w, 3))).clip(0, 255).astype(np.uint8)
        ext = ".png" if i % 2 else ".jpg"
        path = os.path.join(directory, f"img_{i:03d}{ext}")
        Image.fromarray(img).save(path)
        paths.append(path)
    return paths


COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 60, 220)}


def write_deep_colour_png(path, rgb: np.ndarray, orientation: int = 1) -> None:
    """An (H, W, 3) uint16 RGB array as a 16-bit colour PNG (cv2; PIL writes 8 bits), with
    an EXIF orientation tag in an eXIf chunk after the pixels (PIL's getexif then loads the
    image to find it, as for files whose writer put the tag last)."""
    import struct
    import zlib

    import cv2

    png = cv2.imencode(".png", np.ascontiguousarray(rgb[:, :, ::-1]))[1].tobytes()
    if orientation != 1:
        exif = Image.Exif()
        exif[0x0112] = orientation
        data = exif.tobytes().removeprefix(b"Exif\x00\x00")  # a PNG's eXIf has no header
        chunk = b"eXIf" + data
        chunk = struct.pack(">I", len(data)) + chunk + struct.pack(">I", zlib.crc32(chunk))
        end = png.rindex(b"IEND") - 4  # before the IEND chunk's length
        png = png[:end] + chunk + png[end:]
    with open(path, "wb") as f:
        f.write(png)


def write_colour_classes(root, per_class: int, seed: int) -> str:
    """Class folders whose images are noisy fields of the class's colour."""
    rng = np.random.default_rng(seed)
    for name, rgb in COLOURS.items():
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(per_class):
            img = np.asarray(rgb) + rng.normal(0, 20, (40, 40, 3))
            path = os.path.join(root, name, f"{i:03d}.png")
            Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(path)
    return str(root)


def save_mae_checkpoints(directory, img_size=32, patch_size=16, depth=4) -> tuple:
    """A tiny MAE saved in the official encoder-only form and as our training checkpoint.

    Returns:
        (encoder state dict, {"official": path, "ours": path}).
    """
    from mae_transfer import create_model

    mae = create_model(
        "mae_vit_base_patch16",
        img_size=img_size,
        patch_size=patch_size,
        **{**TINY_MAE, "depth": depth},
    )
    enc = {k: v for k, v in mae.state_dict().items() if not k.startswith(("decoder", "mask"))}
    official = os.path.join(str(directory), "mae_pretrain_vit_tiny.pth")
    torch.save({"model": enc}, official)
    ours = os.path.join(str(directory), "checkpoint-last.pth")
    torch.save({"model": mae.state_dict(), "optimizer": {}, "epoch": 5, "args": {}}, ours)
    return enc, {"official": official, "ours": ours}


@pytest.fixture
def image_dir(tmp_path):
    d = tmp_path / "images"
    write_images(str(d), 12)
    return str(d)


# -- several ranks (gloo) -------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, fn, args, queue):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)
    from mae_transfer.engine.distributed import cleanup, init_distributed

    info = init_distributed("cpu")
    try:
        # as bytes: queue.put shares tensors through file descriptors that this process serves,
        # and a rank that exits before the parent reads them fails the read (FileNotFoundError)
        queue.put((rank, "ok", pickle.dumps(fn(info, *args))))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        queue.put((rank, "error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    finally:
        cleanup(info)


def run_ranks(fn, *args, world: int = 2, timeout: float = 240) -> dict:
    """Runs ``fn(dist_info, *args)`` in ``world`` gloo processes; {rank: (status, result)}."""
    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), _free_port()
    procs = [
        ctx.Process(target=_rank_main, args=(r, world, port, fn, args, queue)) for r in range(world)
    ]
    for p in procs:
        p.start()
    results = {}
    for _ in procs:
        rank, status, value = queue.get(timeout=timeout)
        results[rank] = (status, pickle.loads(value) if status == "ok" else value)
    for p in procs:
        p.join(timeout=30)
    return results


# -- host syncs ----------------------------------------------------------------------------
_HOST_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__")


def count_host_reads(trainer, monkeypatch) -> list:
    """Wraps ``trainer._step`` so that every value read from a tensor to the host inside a
    step (a sync on a GPU) is recorded, by name; returns the list it fills, which starts
    with the number of steps run."""
    reads, inside = [0], [False]
    for name in _HOST_READS:
        real = getattr(torch.Tensor, name)

        def wrapper(self, *a, _real=real, _name=name, **k):
            if inside[0]:
                reads.append(_name)
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    step = trainer._step

    def counted(*args, **kwargs):
        reads[0] += 1
        inside[0] = True
        try:
            return step(*args, **kwargs)
        finally:
            inside[0] = False

    trainer._step = counted
    return reads


def train_until_killed(trainer, epoch: int, iteration: int) -> None:
    """Trains ``trainer`` until the step at (``epoch``, ``iteration``) begins, then stops it as
    a kill there would (KeyboardInterrupt), and closes it."""
    compute = trainer.compute_loss

    def killed(*a):
        if (trainer.epoch, trainer.iter) == (epoch, iteration):
            raise KeyboardInterrupt
        return compute(*a)

    trainer.compute_loss = killed
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    trainer.close()


def record_evaluations(trainer) -> list:
    """The epochs at which ``trainer`` evaluates from now on (its ``epoch`` at each call)."""
    epochs, evaluate = [], trainer._evaluate
    trainer._evaluate = lambda: epochs.append(trainer.epoch) or evaluate()
    return epochs


@pytest.fixture
def fake_download(tmp_path, monkeypatch):
    """torch hub's downloader replaced by a copy from ``served`` (URL -> bytes or a file's
    path); the hub directory in tmp_path. Yields (served, the URLs fetched)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    served, fetched = {}, []

    def download(url, dst, hash_prefix=None, progress=True):
        fetched.append(url)
        if url not in served:
            raise OSError(f"HTTP Error 404: Not Found ({url})")
        if isinstance(served[url], bytes):
            with open(dst, "wb") as f:
                f.write(served[url])
        else:
            shutil.copyfile(served[url], dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    return served, fetched


class RunsCode:
    """What a hostile pickle holds: unpickled without restriction, it creates ``path`` (a
    function call of the file's choosing)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))
