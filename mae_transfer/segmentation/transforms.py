"""Transforms for mmseg pipelines: images read as pretraining reads them, and a label check.

mmcv's ``LoadImageFromFile`` reads an image of more than 8 bits per value (a 16-bit PNG or
TIFF scan) by keeping each value's high byte (cv2: a 12-bit scan loads almost black) or by
clipping it (pillow: almost white); :class:`LoadImageAnyDepth` stretches it to 0..255 as the
pretraining loader and the detectors do. :func:`runner.build_cfg` puts it in place of every
``LoadImageFromFile``; with mmseg's own tools, name it in the config (``type=
"LoadImageAnyDepth"``, the same arguments).

Values a label should not hold fail far from their file: in training the loss indexes past
its classes ('index 39 is out of bounds for dimension 1 with size 8'), in evaluation
IoUMetric drops those pixels without a word (the mIoU is then of the other pixels).
:func:`runner.build_cfg` inserts :class:`CheckSegLabels` after every ``LoadAnnotations``.
"""

from __future__ import annotations

from typing import Optional

import mmcv
import numpy as np
from mmcv.transforms import BaseTransform, LoadImageFromFile
from mmengine import fileio
from mmseg.registry import TRANSFORMS
from PIL import UnidentifiedImageError

from mae_transfer.data.decode import decode_upright, more_than_8_bits, open_image
from mae_transfer.engine.config import ConfigError

from .loading import IGNORE_ORIENTATION, stretches_deep_images, turns_by_orientation


@TRANSFORMS.register_module()
class LoadImageAnyDepth(LoadImageFromFile):
    """mmcv's ``LoadImageFromFile`` (the same arguments and results), except that an image of
    more than 8 bits per value (16-bit PNG / TIFF, grey or colour; 32-bit int or float) is
    stretched from its own min..max to 0..255, as pretraining reads it, and then turned by its
    EXIF orientation and made grey as ``color_type`` says. Other images load exactly as mmcv
    loads them; ``color_type='unchanged'`` and the tifffile backend keep every image's raw
    values (as mmcv). ``ignore_empty`` also covers a file no decoder can read (mmcv asserts)."""

    def transform(self, results: dict) -> Optional[dict]:
        path = results["img_path"]
        try:
            data = self._read(path)
            img = self._stretched(data, path)
            if img is None:
                img = mmcv.imfrombytes(data, flag=self.color_type, backend=self.imdecode_backend)
            if img is None:  # cv2 could not decode it
                raise OSError(f"failed to load image: {path}")
        except Exception:
            if self.ignore_empty:
                return None
            raise
        if self.to_float32:
            img = img.astype(np.float32)
        results.update(img=img, img_shape=img.shape[:2], ori_shape=img.shape[:2])
        return results

    def _read(self, path: str) -> bytes:
        if self.file_client_args is not None:  # mmcv's deprecated way, still accepted
            return fileio.FileClient.infer_client(self.file_client_args, path).get(path)
        return fileio.get(path, backend_args=self.backend_args)

    def _stretched(self, data: bytes, path: str) -> Optional[np.ndarray]:
        """A deep image as mmcv would return an 8-bit one ((H, W, 3) BGR, or (H, W) grey);
        None for any other image, or where raw values are asked for (``color_type=
        'unchanged'``, ``imdecode_backend='tifffile'``)."""
        if not stretches_deep_images(dict(vars(self), type=type(self).__name__)):
            return None  # raw values asked for ('unchanged', or the tifffile backend)
        try:
            pil = open_image(data, path)  # the header only
        except UnidentifiedImageError:
            return None  # not for PIL: cv2 may know the format (mmcv raises if not)
        if not more_than_8_bits(pil):
            return None
        img = decode_upright(pil, data, turn=turns_by_orientation(vars(self)))
        bgr = np.ascontiguousarray(np.asarray(img)[:, :, ::-1])
        return mmcv.bgr2gray(bgr) if self.color_type.startswith("grayscale") else bgr


@TRANSFORMS.register_module()
class CheckSegLabels(BaseTransform):
    """Refuses a loaded label (``gt_seg_map``, after ``reduce_zero_label`` and ``label_map``,
    as mmseg applies them) that is not one class index per pixel in [0, num_classes) or the
    ignore index, or not of its image's size (as loaded). One comparison per pixel; the file
    and its bad values named.

    Args:
        num_classes: the decode head's ``num_classes``.
        ignore_index: the decode head's ``ignore_index`` (mmseg's default 255).
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index

    def transform(self, results: dict) -> dict:
        seg = results.get("gt_seg_map")
        if seg is None:  # inference: no label loaded
            return results
        path = results.get("seg_map_path", "<unknown>")
        if seg.ndim != 2:
            raise ConfigError(
                f"label {path} has {seg.shape[-1]} channels: labels are one class index per "
                "pixel (a single-channel PNG, mode L or P); convert colour-coded labels"
            )
        # the image as loaded: a test pipeline resizes it before loading the label (mmseg's
        # ADE20K one to a short side of 512), which then keeps the stored size
        img = results.get("img")
        loaded = results.get("ori_shape") or (None if img is None else img.shape[:2])
        if loaded is not None and tuple(loaded[:2]) != tuple(seg.shape[:2]):
            # (the check before training looks at a sample of the pairs only)
            raise ConfigError(
                f"image {results.get('img_path', '<unknown>')} loads as {loaded[0]}x"
                f"{loaded[1]} (height x width), its label {path} is {seg.shape[0]}x"
                f"{seg.shape[1]}: they must match; a photo whose EXIF orientation tag turns it "
                "on loading needs the tag stripped, or LoadImageFromFile(color_type="
                f"'color_ignore_orientation') in every pipeline: --cfg-options {IGNORE_ORIENTATION}"
            )
        bad = np.unique(seg[(seg >= self.num_classes) & (seg != self.ignore_index)])
        if bad.size:
            raise ConfigError(self._message(path, bad, results.get("reduce_zero_label", False)))
        return results

    def _message(self, path: str, bad: np.ndarray, reduce_zero_label: bool) -> str:
        def listed(values) -> str:
            return ", ".join(str(v) for v in values[:10]) + (", ..." if len(values) > 10 else "")

        bad = bad.astype(np.int64)
        fix = "set num_classes (model.decode_head and auxiliary_head) to the number of classes"
        if reduce_zero_label:
            stored = f" ({listed(bad + 1)} in the file, reduce_zero_label=True taking 1 from each)"
        else:
            stored = ""
            fix += ", or reduce_zero_label=True in the data set if 0 means unlabeled (ADE20K)"
        return (
            f"label {path} holds class values {listed(bad)}{stored}, outside [0, "
            f"{self.num_classes}) and not the ignore index {self.ignore_index}: {fix}"
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_classes={self.num_classes}, ignore={self.ignore_index})"
