"""The uint8 input pipeline: same crops as the official transform, same pixels within decoding
tolerance, reduced-size JPEG decoding, device decoding (run here on the CPU), robustness."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from conftest import write_images
from PIL import Image
from torch.utils.data import DataLoader
from torch.utils.data._utils.pin_memory import pin_memory
from torchvision import transforms

from mae_transfer.data import ResumableDistributedSampler, collate, read_good, sample_seed
from mae_transfer.data.decode import dct_reduction, decode_reduced, decode_uint8, open_encoded
from mae_transfer.data.device_decode import PendingBatch, decode_on_device
from mae_transfer.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    RandomResizedCropFlip,
    crop_params,
    normalize,
    resized_crop_uint8,
)
from pretrain.data import PretrainDataset


def smooth_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A photograph-like test image: smooth colour gradients + mild noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([np.sin(xx / (17 + 5 * c) + yy / (23 + 3 * c)) for c in range(3)], axis=-1)
    return (127 * (base + 1) + rng.normal(0, 4, (h, w, 3))).clip(0, 255).astype(np.uint8)


def pixels(x: torch.Tensor) -> torch.Tensor:
    """Normalised float images back in 0-255 units (to state tolerances in grey levels)."""
    mean = torch.tensor(IMAGENET_MEAN).view(-1, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(-1, 1, 1)
    return (x * std + mean) * 255


@pytest.mark.parametrize("hw", [(375, 500), (40, 56), (500, 60), (60, 500)])
def test_crop_params_are_torchvision_draws_from_a_generator(hw):
    h, w = hw
    for seed in range(20):
        torch.manual_seed(seed)
        ref = transforms.RandomResizedCrop.get_params(
            torch.empty(1, h, w), (0.2, 1.0), (3 / 4, 4 / 3)
        )
        ours = crop_params(h, w, (0.2, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(seed))
        assert ours == tuple(ref), seed


def test_normalize_is_bitwise_totensor_plus_normalize():
    img = torch.randint(0, 256, (3, 17, 23), dtype=torch.uint8)
    pil = Image.fromarray(img.permute(1, 2, 0).numpy())
    ref = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)(transforms.ToTensor()(pil))
    assert torch.equal(normalize(img), ref)
    assert torch.equal(normalize(img[None])[0], ref)  # batched, as in the step


def _compare(fast, ref, keys):
    """Per key: (mean, max) absolute pixel difference, after checking draws are identical."""
    out = []
    for key in keys:
        x, noise, _ = fast[key]
        y, ref_noise, _ = ref[key]
        assert x.dtype == torch.uint8 and x.shape == (3, 64, 64)
        assert torch.equal(noise, ref_noise)
        diff = (pixels(normalize(x)) - pixels(y)).abs()
        out.append((diff.mean().item(), diff.max().item()))
    return out


def test_uint8_dataset_matches_the_official_float_pipeline(tmp_path):
    """Same keys -> same crop, flip and mask noise; pixels equal within decoding tolerance
    (JPEG: torchvision's decoder, PNG: PIL; resize: torch's antialiased bicubic vs PIL's)."""
    d = tmp_path / "imgs"
    os.makedirs(d)
    for i in range(4):  # ImageNet-like JPEGs and PNGs, some smaller than the output
        size = (375, 500) if i < 2 else (40, 56)
        Image.fromarray(smooth_image(*size, seed=i)).save(d / f"{i}.{'jpg' if i % 2 else 'png'}")
    fast = PretrainDataset(str(d), 64, num_patches=16, seed=3)
    ref = PretrainDataset(str(d), 64, num_patches=16, seed=3, pipeline="official")
    keys = [(e, i) for e in range(3) for i in range(4)]
    fast.crop.reduced_decode = False  # full-size decoding: only the resize kernels differ
    for mean, worst in _compare(fast, ref, keys):
        assert mean < 0.1 and worst <= 3.0  # a flip or another crop differs by tens of levels
    # and a wrong crop is far outside those bounds (the test can tell)
    wrong = PretrainDataset(str(d), 64, num_patches=16, seed=4)
    x, y = wrong[(0, 1)][0], ref[(0, 1)][0]
    assert (pixels(normalize(x)) - pixels(y)).abs().mean() > 8


def _official_crop(path: str, crop, size: int) -> torch.Tensor:
    pil = Image.open(path).convert("RGB")
    out = transforms.functional.resized_crop(
        pil, *crop, [size, size], transforms.InterpolationMode.BICUBIC
    )
    return torch.from_numpy(np.array(out)).permute(2, 0, 1).float()


def test_reduced_size_decoding_when_the_crop_is_four_times_the_output(tmp_path):
    from pretrain.samples import sample_images

    photo = dict(sample_images())["astronaut"]  # 512 x 512, natural edges and textures
    path = str(tmp_path / "photo.jpg")
    Image.fromarray(photo).resize((800, 600), Image.BICUBIC).save(path, quality=90)
    enc = open_encoded(path)
    crop = (21, 30, 522, 701)  # 522 x 701 -> 128: decoded at 1/4
    assert dct_reduction(crop[2:], (128, 128)) == 4
    assert dct_reduction((511, 700), (128, 128)) == 1  # 511 < 4 x 128; 1/2 is not used
    small, scale = decode_reduced(enc, 4)
    assert scale == 4 and small.size == (200, 150)
    fast = RandomResizedCropFlip(128).apply(open_encoded(path), crop, flip=False)
    full = RandomResizedCropFlip(128, reduced_decode=False).apply(enc, crop, flip=False)
    official = _official_crop(path, crop, 128)
    assert (full.float() - official).abs().max() <= 3
    # the crop itself (1.78), not one moved to whole pixels of the 1/4 image (5.21 when it
    # was, 1.74 against the official crop of the moved edges)
    err = (fast.float() - official).abs()
    assert err.mean() < 2.0, err.mean()  # DCT scaling is a slightly different low-pass


def _gradient(h: int, w: int) -> np.ndarray:
    """Smooth colour waves (~70 px period), no noise: a shift of the crop shows, a different
    low-pass hardly does."""
    yy, xx = np.mgrid[0:h, 0:w]
    waves = [np.sin(xx / 11 + yy / 17 + c) for c in range(3)]
    return (127 + 100 * np.stack(waves, axis=-1)).round().astype(np.uint8)


@pytest.mark.parametrize(
    "crop, scale, bound",
    [  # the bound: the exact region's difference (the DCT low-pass, stronger at 1/8) + margin
        ((1, 2, 262, 270), 4, 1.0),  # edges between pixels of the 1/4 image
        ((101, 203, 301, 390), 4, 1.0),
        ((3, 5, 517, 531), 8, 2.5),  # and of the 1/8 image
        ((59, 197, 522, 600), 8, 2.5),
    ],
)
def test_reduced_decoding_resizes_the_exact_crop(tmp_path, crop, scale, bound):
    """The reduced image's pixel x covers full-size pixels [x s, (x + 1) s): the crop is
    resized from that fractional region. Moving its edges to whole reduced pixels (up to half
    an output pixel) differed from the full-size path by 5.7-6.0 grey levels on average at 1/4
    and 5.8-17.0 at 1/8 here; the exact region differs by 0.6-0.7 and 1.9-2.0 (the DCT
    low-pass)."""
    path = str(tmp_path / "gradient.jpg")
    Image.fromarray(_gradient(600, 800)).save(path, quality=95)
    assert dct_reduction(crop[2:], (64, 64)) == scale
    assert decode_reduced(open_encoded(path), scale)[1] == scale
    full = RandomResizedCropFlip(64, reduced_decode=False).apply(open_encoded(path), crop, False)
    for flip in (False, True):
        fast = RandomResizedCropFlip(64).apply(open_encoded(path), crop, flip)
        assert fast.dtype == torch.uint8 and fast.shape == (3, 64, 64) and fast.is_contiguous()
        err = (fast.float() - (full.flip(-1) if flip else full).float()).abs()
        assert err.mean() < bound, err.mean()


def test_device_decoding_equals_the_loader_pipeline(tmp_path):
    d = tmp_path / "imgs"
    write_images(str(d), 6)  # JPEGs and PNGs (PNGs are cropped by the worker)
    Image.fromarray(smooth_image(120, 90)).save(d / "grey.jpg")  # RGB JPEG, odd shape
    Image.fromarray(smooth_image(120, 90)[..., 0]).save(d / "l.jpg")  # greyscale JPEG
    cpu = PretrainDataset(str(d), 32, num_patches=4, seed=5)
    cpu.crop.reduced_decode = False  # the device decodes at full size (no DCT scaling)
    dev = PretrainDataset(str(d), 32, num_patches=4, seed=5, pipeline="device")
    keys = [(1, i) for i in range(len(cpu))]
    x_cpu, noise_cpu, _ = collate([cpu[k] for k in keys])
    pending, noise_dev, _ = collate([dev[k] for k in keys])
    assert isinstance(pending, PendingBatch) and pending.to("cpu") is pending
    assert sum(p.data is not None for p in pending) == 5  # 3 JPEGs + grey + l
    x_dev, failed = decode_on_device(pending, (32, 32), torch.device("cpu"))
    assert failed == 0 and torch.equal(x_dev, x_cpu) and torch.equal(noise_dev, noise_cpu)


def test_the_loader_pins_the_crops_the_workers_decoded(tmp_path, monkeypatch):
    """PNGs (CMYK JPEGs, truncated files) reach the device as uint8 crops, each copied on its
    own: from pageable memory every copy blocked the host. The JPEG bytes stay as they are."""
    d = tmp_path / "imgs"
    write_images(str(d), 6)  # 3 JPEGs, 3 PNGs
    ds = PretrainDataset(str(d), 32, num_patches=4, seed=5, pipeline="device")
    batch = collate([ds[(1, i)] for i in range(len(ds))])
    pinned = []

    def fake_pin(self, *args, **kwargs):  # (pinning needs a GPU) a copy, remembered
        pinned.append(self.clone())
        return pinned[-1]

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    pending, _, _ = pin_memory(batch)  # as the loader's pin-memory thread calls it
    assert isinstance(pending, PendingBatch)
    crops = [p.image for p in pending if p.image is not None]
    assert len(crops) == 3 and all(any(c is x for x in pinned) for c in crops)
    assert not any(p.data is x for p in pending for x in pinned)
    cpu = torch.device("cpu")
    assert torch.equal(decode_on_device(pending, (32, 32), cpu)[0],
                       decode_on_device(batch[0], (32, 32), cpu)[0])  # fmt: skip


def test_float_resize_path_of_gpus_is_within_one_level():
    img = torch.from_numpy(smooth_image(90, 120)).permute(2, 0, 1)
    for crop in [(3, 5, 80, 100), (0, 0, 20, 30)]:  # down- and upsampling
        a = resized_crop_uint8(img, crop, (32, 32))
        b = resized_crop_uint8(img, crop, (32, 32), via_float=True)
        assert (a.int() - b.int()).abs().max() <= 1


def test_truncated_jpeg_is_skipped_and_counted(tmp_path):
    d = tmp_path / "imgs"
    write_images(str(d), 4)
    data = (d / "img_000.jpg").read_bytes()
    (d / "img_000.jpg").write_bytes(data[: len(data) // 2])  # header fine, data cut
    ds = PretrainDataset(str(d), 32, num_patches=4)
    x, _, skipped = ds[(0, 0)]
    assert skipped == 1 and ds._bad == {ds.files[0]}
    # replaced by a file drawn with the item's seed, augmented with the draws of key (0, 0)
    seed = sample_seed(0, 0, 0)
    used, _, _ = read_good(ds.files, 0, set(), lambda p: decode_uint8(open_encoded(p)), seed=seed)
    g = torch.Generator().manual_seed(seed)
    assert used != 0 and torch.equal(x, ds.crop(open_encoded(ds.files[used]), g))


def test_batches_do_not_depend_on_worker_count(image_dir):
    ds = PretrainDataset(image_dir, 32, num_patches=4, seed=2)

    def batches(workers):
        sampler = ResumableDistributedSampler(len(ds), 4, seed=2)
        loader = DataLoader(ds, 4, sampler=sampler, num_workers=workers, collate_fn=collate)
        return list(loader)

    for a, b in zip(batches(0), batches(2)):
        assert a[0].dtype == torch.uint8
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_sample_seed_is_used(image_dir):
    ds = PretrainDataset(image_dir, 32, num_patches=4, seed=2)
    g = torch.Generator().manual_seed(sample_seed(2, 0, 3))
    enc = open_encoded(ds.files[3])
    assert torch.equal(ds[(0, 3)][0], ds.crop(enc, g))


def test_training_with_device_decoding_equals_the_loader_pipeline(tmp_path, image_dir):
    import json

    from test_pretrain import tiny_cfg, train

    def losses(name, **kw):
        train(tiny_cfg(tmp_path / name, image_dir, epochs=1, **kw))
        with open(tmp_path / name / "out" / "log.jsonl") as f:
            return [r["loss"] for r in map(json.loads, f) if "loss" in r]

    ref = losses("loader")
    assert len(ref) == 3 and ref == losses("device", decode_on_device=True)


def test_normalisation_constants_are_made_once_per_device(monkeypatch):
    """Every training step normalises its batch: the mean / std tensors must not be rebuilt
    from Python numbers each time (on a GPU that is a blocking host-to-device copy)."""
    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    first = normalize(x)
    made, real = [], torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: made.append(a) or real(*a, **k))
    assert torch.equal(normalize(x), first) and not made


def test_device_decoding_allocates_on_a_side_stream_and_never_waits_on_the_host(monkeypatch):
    """nvJPEG writes its outputs without waiting for the current stream's queued kernels: they
    are allocated under a side stream from a pool of their own, marked as used by the
    caller's stream, which waits for the side stream; the host does not wait for the caller's
    stream. With another allocator backend the caller's stream is drained first (faked: no
    GPU here)."""
    import contextlib

    import torchvision.io

    from mae_transfer.data import device_decode

    events, current = [], ["caller stream, general memory"]

    class Stream:
        def __init__(self, name="side", device=None):
            self.name, self.device = name, device
            events.append(("new stream", device))

        def synchronize(self):
            events.append(("host waits for", self.name))

        def wait_stream(self, other):
            events.append((self.name, "waits for", other.name))

    class MemPool:
        pass

    caller = Stream("caller")

    @contextlib.contextmanager
    def stream(s):
        current.append(f"{s.name} stream")
        yield
        current.pop()

    @contextlib.contextmanager
    def use_mem_pool(pool, device=None):
        assert isinstance(pool, MemPool) and device == 1
        current.append(current[-1] + ", own pool")
        yield
        current.pop()

    class Decoded:
        def record_stream(self, s):
            events.append(("used by", s.name))

    def decode_jpeg(data, **kw):
        events.append(("decode on", kw["device"], "allocating on", current[-1]))
        return [Decoded() for _ in data]

    backend = ["native"]
    events.clear()
    monkeypatch.setattr(device_decode, "_DECODE_SIDE", {})
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "MemPool", MemPool)
    monkeypatch.setattr(torch.cuda, "stream", stream)
    monkeypatch.setattr(torch.cuda, "use_mem_pool", use_mem_pool)
    monkeypatch.setattr(torch.cuda, "get_allocator_backend", lambda: backend[0])
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: caller)
    monkeypatch.setattr(torchvision.io, "decode_jpeg", decode_jpeg)
    two = [torch.zeros(4, dtype=torch.uint8)] * 2
    gpu = torch.device("cuda", 1)
    device_decode.decode_jpegs(two, gpu)
    assert events == [
        ("new stream", 1),
        ("decode on", gpu, "allocating on", "side stream, own pool"),
        ("caller", "waits for", "side"),
        ("used by", "caller"),
        ("used by", "caller"),
    ]
    events.clear()
    device_decode.decode_jpegs(two, gpu)
    assert events[0] == ("decode on", gpu, "allocating on", "side stream, own pool")  # reused
    events.clear()
    device_decode.decode_jpegs(two, torch.device("cpu"))
    assert events == [("decode on", torch.device("cpu"), "allocating on", current[0])]
    # cudaMallocAsync may hand memory freed on one stream to another: drain the caller's first
    backend[0] = "cudaMallocAsync"
    monkeypatch.setattr(device_decode, "_DECODE_SIDE", {})
    events.clear()
    device_decode.decode_jpegs(two, gpu)
    assert events == [("host waits for", "caller"), ("decode on", gpu, "allocating on", current[0])]


def test_data_sets_hold_their_paths_in_arrays_not_python_objects(tmp_path, image_dir):
    """Loader workers that touch a list of 1.28M str objects copy its pages, one private copy
    per worker; the paths live in two numpy arrays, and read back exactly."""
    from mae_transfer.data import ClassFolderDataset, PathList, find_classes, find_images
    from pretrain.data import PretrainDataset

    names = ["a.jpg", "dir/é b.png", "x\udcff.jpg"]  # a name that is not valid UTF-8 on disk
    paths = PathList(names)
    assert len(paths) == 3 and list(paths) == names and paths[-1] == names[-1]
    assert paths[1:] == names[1:] and not isinstance(paths, list)
    with pytest.raises(IndexError):
        paths[3]
    ds = PretrainDataset(image_dir, 32, 16)
    assert isinstance(ds.files, PathList) and list(ds.files) == find_images(image_dir)
    for name, rgb in (("red", (200, 0, 0)), ("blue", (0, 0, 200))):
        os.makedirs(tmp_path / "cls" / name)
        Image.new("RGB", (8, 8), rgb).save(tmp_path / "cls" / name / "0.png")
    folder = find_classes(str(tmp_path / "cls"))
    cls = ClassFolderDataset(folder, transforms.ToTensor())
    assert isinstance(cls.paths, PathList) and cls.labels.dtype == np.int64
    assert [cls[(0, i)][1] for i in range(2)] == [0, 1] == [label for _, label in folder.samples]


def test_sample_seeds_stay_distinct_beyond_ten_million_images():
    """ImageNet-22k has 14.2M images: in the arithmetic code, index 10,000,019 of an epoch had
    the seed of index 0 of the next. Smaller indices keep the seeds runs always had."""
    assert sample_seed(3, 5, 7) == ((3 * 1_000_003 + 5) * 10_000_019 + 7) % (2**63 - 1)
    assert sample_seed(0, 0, 10_000_019) != sample_seed(0, 1, 0)
    indices = (0, 1, 10_000_018, 10_000_019, 10_000_020, 14_197_121)
    seeds = {sample_seed(s, e, i) for s in (0, 1) for e in (-1, 0, 1) for i in indices}
    assert len(seeds) == 2 * 3 * len(indices)
    assert all(0 <= x < 2**63 - 1 for x in seeds)
    assert sample_seed(0, 2, 12_345_678) == sample_seed(0, 2, 12_345_678)  # a function


def test_reduced_decoding_can_be_turned_off_for_a_run():
    from pretrain.config import load_config

    cfg, _ = load_config(["--no-reduced_decode"])
    assert cfg.reduced_decode is False
    assert load_config([])[0].reduced_decode is True
    ds = PretrainDataset("", 32, num_patches=4, files=["a.jpg"], reduced_decode=False)
    assert ds.crop.reduced_decode is False


def test_16_bit_and_float_images_are_stretched_not_clipped_to_white(tmp_path, caplog):
    from mae_transfer.data import load_rgb
    from mae_transfer.data.decode import _note_high_depth, stretch_to_uint8

    _note_high_depth.cache_clear()  # said once per process: perhaps by an earlier test
    # a 12-bit scan in a 16-bit PNG (medical data): convert("RGB") alone makes it ~all white
    ramp = np.linspace(100, 4000, 48 * 48).reshape(48, 48)
    Image.fromarray(ramp.astype(np.uint16)).save(tmp_path / "scan.png")
    Image.fromarray((ramp / 4000 - 0.5).astype(np.float32)).save(tmp_path / "map.tif")
    assert Image.open(tmp_path / "scan.png").mode == "I;16"
    expected = np.rint((ramp - 100) * 255 / 3900)
    for name in ("scan.png", "map.tif"):
        path = str(tmp_path / name)
        with caplog.at_level("WARNING"):
            rgb = np.asarray(load_rgb(path)).astype(float)
        assert np.abs(rgb - expected[..., None]).max() <= 1, name  # all three channels
        img = decode_uint8(open_encoded(path))  # the pretraining pipeline's decoder
        assert torch.equal(img, torch.from_numpy(np.array(load_rgb(path))).permute(2, 0, 1))
    assert "stretched" in caplog.text
    ds = PretrainDataset(str(tmp_path), 32, num_patches=4)
    x, _, skipped = ds[(0, 0)]
    assert skipped == 0 and 0 < x.float().mean() < 255 and x.float().std() > 20
    # constant, NaN and infinite values: no division by zero, no crash
    # constant images keep their level: floats read on 0..1, 16-bit on 0..65535
    assert (stretch_to_uint8(np.full((2, 2), 0.5)) == 128).all()
    assert (stretch_to_uint8(np.full((2, 2), 65535, np.uint16)) == 255).all()
    odd = stretch_to_uint8(np.array([np.nan, -np.inf, 1.0, 3.0, np.inf]))
    assert odd.tolist() == [0, 0, 0, 255, 255]


def test_listing_skips_hidden_files_walks_each_folder_once_and_says_what_it_left_out(
    tmp_path, caplog
):
    from mae_transfer.data import find_classes, first_image
    from mae_transfer.data.folder import list_images

    root = tmp_path / "photos"
    write_images(str(root / "a"), 3)
    for f in sorted((root / "a").iterdir()):  # macOS copies: a '._' file beside every image
        (root / "a" / f"._{f.name}").write_bytes(b"\0\5\26\7 resource fork")
    write_images(str(root / ".ipynb_checkpoints"), 2)
    (root / "a" / "loop").symlink_to(root)  # a link to a parent: not followed (endless)
    (root / "b").symlink_to(root / "a")  # another name for a folder: a class of its own
    (root / "a" / "notes.txt").write_text("x")
    (root / "a" / "anim.gif").write_bytes(b"GIF89a")
    files = list_images(str(root / "a"))
    assert [os.path.basename(f) for f in files] == ["img_000.jpg", "img_001.png", "img_002.jpg"]
    assert "2 symlink(s) to a folder they are in (a loop) were not followed" in caplog.text
    assert "left out 1 image file(s) of other types (.gif 1)" in caplog.text  # not notes.txt
    assert os.path.basename(first_image(str(root))) == "img_000.jpg"
    # class folders: hidden ones are no class; an empty class keeps its label, with a warning
    (root / "c_empty").mkdir()
    folder = find_classes(str(root))
    assert folder.classes == ["a", "b", "c_empty"] and "c_empty" in caplog.text
    assert [y for _, y in folder.samples] == [0, 0, 0, 1, 1, 1]  # a/loop/... not walked


def test_unreadable_files_are_replaced_by_files_spread_over_the_data_set(tmp_path):
    from mae_transfer.data import read_good
    from mae_transfer.engine.config import ConfigError

    # 30 bad files in a row, then 30 good ones: "the next good file" used one of them 31 times
    paths = [f"bad_{i:02d}" for i in range(30)] + [f"good_{i:02d}" for i in range(30)]

    def load(path):
        if path.startswith("bad"):
            raise OSError("corrupt")
        return path

    used = [read_good(paths, i, set(), load, seed=sample_seed(0, 0, i))[0] for i in range(60)]
    counts = np.bincount(used, minlength=60)
    assert counts[:30].sum() == 0 and counts[30:].min() >= 1 and counts.max() <= 6
    again = [read_good(paths, i, set(), load, seed=sample_seed(0, 0, i))[0] for i in range(60)]
    assert used == again  # the same replacement on every run and resume
    # a large corrupt block (1,300 of 2,000 files, a class folder of ImageNet in a small set):
    # draws from the whole set never run out of tries there
    paths = [f"bad_{i}" for i in range(1300)] + [f"good_{i}" for i in range(700)]
    for epoch in range(3):
        for i in range(1300):
            read_good(paths, i, set(), load, seed=sample_seed(0, epoch, i))
    with pytest.raises(ConfigError, match="all 3 image files are unreadable"):
        read_good(["x", "y", "z"], 1, set(), lambda p: load("bad"), seed=5)


def test_non_square_evaluation_crops_inside_the_image_and_square_is_the_official_resize():
    from mae_transfer.data import eval_transform

    photo = Image.fromarray(smooth_image(200, 300))
    for size in ((32, 64), (64, 32)):
        x = eval_transform(size)(photo)
        assert x.shape[1:] == size and (x.amax(0) > -1.5).all()  # no black (padded) column
    official = transforms.Compose(
        [
            transforms.Resize(int(96 / 0.875), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(96),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    assert torch.equal(eval_transform(96)(photo), official(photo))  # 109 px, truncated


def _png16(path, pixels: np.ndarray) -> None:
    """A 16-bit PNG written by hand (PIL writes none in colour): grey + alpha or RGB."""
    import struct
    import zlib

    h, w, c = pixels.shape
    colour_type = {2: 4, 3: 2}[c]

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + crc

    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in pixels)
    head = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", head) + chunk(b"IDAT", zlib.compress(rows))
    path.write_bytes(data + chunk(b"IEND", b""))


def _stretched(values: np.ndarray) -> np.ndarray:
    lo, hi = values.min(), values.max()
    return np.rint((values.astype(float) - lo) * 255 / (hi - lo))


def _both_decoders(path: str) -> np.ndarray:
    from mae_transfer.data import load_rgb

    got = np.asarray(load_rgb(path))
    img = decode_uint8(open_encoded(path))  # the pretraining pipeline's decoder
    assert torch.equal(img, torch.from_numpy(got.copy()).permute(2, 0, 1))
    return got.astype(float)


def test_16_bit_colour_and_grey_alpha_pngs_keep_all_their_bits(tmp_path):
    # 12-bit data in 16-bit files: PIL keeps the high byte (max 15, almost black)
    rgb = (smooth_image(40, 30).astype(np.uint16) * 16).clip(0, 4095)
    _png16(tmp_path / "rgb.png", rgb)
    assert np.abs(_both_decoders(str(tmp_path / "rgb.png")) - _stretched(rgb)).max() <= 1
    grey = np.stack([rgb[..., 0], np.full_like(rgb[..., 0], 65535)], -1)  # + opaque alpha
    _png16(tmp_path / "la.png", grey)
    got = _both_decoders(str(tmp_path / "la.png"))
    assert np.abs(got - _stretched(rgb[..., 0])[..., None]).max() <= 1


def test_16_bit_colour_tiffs_keep_all_their_bits_or_fall_back_with_a_warning(
    tmp_path, monkeypatch, caplog
):
    tifffile = pytest.importorskip("tifffile")
    from mae_transfer.data import decode

    rgb = (smooth_image(40, 30).astype(np.uint16) * 16).clip(0, 4095)
    tifffile.imwrite(tmp_path / "b.tif", rgb, photometric="rgb")
    planar = rgb.transpose(2, 0, 1)  # PIL reads planar 16-bit TIFFs garbled
    tifffile.imwrite(tmp_path / "c.tif", planar, photometric="rgb", planarconfig="separate")
    for name in ("b.tif", "c.tif"):
        assert np.abs(_both_decoders(str(tmp_path / name)) - _stretched(rgb)).max() <= 1, name

    # tifffile without a codec (e.g. LZW without imagecodecs): PIL's 8 bits, said once
    def no_codec(img, data):
        raise ValueError("<COMPRESSION.LZW: 5> requires the 'imagecodecs' package")

    monkeypatch.setattr(decode, "_read_deep", no_codec)
    got = _both_decoders(str(tmp_path / "b.tif"))
    assert got.max() <= 16 and "keeps each value's high byte" in caplog.text


def test_string_settings_given_a_list_are_named(tmp_path):
    from mae_transfer.engine.config import ConfigError
    from pretrain.config import load_config, validate

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("data_path: [a, b]\noutput_dir: 1.10\n")
    cfg = load_config(["--config", str(cfg_file)])[0]
    with pytest.raises(ConfigError, match=r"data_path must be a string, got \['a', 'b'\]") as e:
        validate(cfg)
    assert "output_dir must be a string, got 1.1 (in YAML, quote it" in str(e.value)


def test_seeded_draws_leave_the_gpus_generators_alone(tmp_path, monkeypatch):
    """Mixup (every fine-tuning step) and the official pipeline in the main process seed the
    CPU generator only: torch.manual_seed reseeded every GPU's, so dropout and drop path on
    the GPU followed the mixup seed instead of the run's stream."""
    from mae_transfer.data import seeded

    gpu_seeds = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", gpu_seeds.append)
    monkeypatch.setattr(torch.cuda, "manual_seed", gpu_seeds.append)
    with seeded(5):
        a = torch.rand(3)
    with seeded(5):
        assert torch.equal(torch.rand(3), a)  # still a pure function of the seed
    d = tmp_path / "imgs"
    os.makedirs(d)
    Image.fromarray(smooth_image(40, 56)).save(d / "0.png")
    PretrainDataset(str(d), 32, num_patches=16, seed=3, pipeline="official")[(0, 0)]
    assert gpu_seeds == []


def test_device_decoding_survives_bad_jpegs(tmp_path, monkeypatch, caplog):
    """One bad JPEG failed the whole batched nvJPEG call: a traceback on one rank while the
    others waited in the all-reduce. Truncated files are now left to the worker (which skips
    and counts them), a JPEG the device cannot decode is decoded on the CPU, and one nobody
    can decode is replaced by another image of the batch and counted."""
    import torchvision

    from mae_transfer.data import device_decode

    d = tmp_path / "imgs"
    write_images(str(d), 4)
    jpegs = sorted(str(p) for p in d.rglob("*.jpg"))
    with open(jpegs[0], "rb") as f:
        data = f.read()
    with open(jpegs[0], "wb") as f:
        f.write(data[: len(data) // 2])  # truncated: no end-of-image marker
    dev = PretrainDataset(str(d), 32, num_patches=4, seed=5, pipeline="device")
    items = [dev[(0, i)] for i in range(len(dev))]
    assert sum(skipped for *_, skipped in items) == 1  # the worker met it and replaced it
    pending, _, _ = collate(items)
    assert all(p.data is None or device_decode.JPEG_EOI in bytes(p.data[-32:]) for p in pending)

    ref, failed = device_decode.decode_on_device(pending, (32, 32), torch.device("cpu"))
    assert failed == 0

    monkeypatch.setattr(device_decode, "_CPU_ONLY", set())
    device_calls = []

    def failing_device_decoder(data, **kw):
        device_calls.append(len(data))
        raise RuntimeError("nvjpeg: unsupported")

    monkeypatch.setattr(torchvision.io, "decode_jpeg", failing_device_decoder)
    with caplog.at_level("WARNING"):
        out, failed = device_decode.decode_on_device(pending, (32, 32), torch.device("cpu"))
    assert failed == 0 and (out.float() - ref.float()).abs().max() <= 1  # PIL's decode
    assert "the device decoder failed (nvjpeg: unsupported): decoded on the CPU" in caplog.text
    n = sum(p.data is not None for p in pending)
    assert device_calls == [n] + [1] * n  # the batch, then each file once
    device_calls.clear()
    out, failed = device_decode.decode_on_device(pending, (32, 32), torch.device("cpu"))
    assert device_calls == [] and (out.float() - ref.float()).abs().max() <= 1  # remembered

    first = next(i for i, p in enumerate(pending) if p.data is not None)
    pending[first].data = torch.frombuffer(
        bytearray(b"\xff\xd8" + bytes(99) + b"\xff\xd9"), dtype=torch.uint8
    )
    out, failed = device_decode.decode_on_device(pending, (32, 32), torch.device("cpu"))
    assert failed == 1 and any(
        torch.equal(out[first], out[j]) for j in range(len(out)) if j != first
    )
    assert "cannot decode" in caplog.text and "replaced by another image" in caplog.text
    # no image readable: zeros, counted (raising would leave the other ranks waiting)
    nothing = [device_decode.PendingCrop(pending[first].data, (0, 0, 8, 8), False, path="x.jpg")]
    out, failed = device_decode.decode_on_device(nothing * 2, (32, 32), torch.device("cpu"))
    assert failed == 2 and not out.any()

    def out_of_memory(data, **kw):
        raise RuntimeError("Error while decoding JPEG images: CUDA out of memory. Tried to ...")

    monkeypatch.setattr(device_decode, "_CPU_ONLY", set())
    monkeypatch.setattr(torchvision.io, "decode_jpeg", out_of_memory)
    with pytest.raises(RuntimeError, match="out of memory"):  # not a bad file: not hidden
        device_decode.decode_on_device(pending, (32, 32), torch.device("cpu"))
