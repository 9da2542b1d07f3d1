"""Images for the detectors, read as pretraining reads them.

detectron2's ``read_image`` converts with PIL alone: a 16-bit grey PNG or TIFF is clipped to
0..255 (a 12-bit scan comes out almost white) and a 16-bit colour PNG keeps each value's high
byte. Here every image is decoded by :func:`mae_transfer.data.decode.decode_pil`, which
stretches images of more than 8 bits from their own min..max to 0..255, as the pretraining
data loader does; 8-bit images come out exactly as detectron2 reads them (EXIF orientation
applied, then converted to the model's ``INPUT.FORMAT``).
"""

from __future__ import annotations

import copy
import itertools
import logging
from typing import Dict, List, Optional, Union

import numpy as np
import torch
from detectron2.data import DatasetMapper
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.data.common import ToIterableDataset
from detectron2.data.samplers import RepeatFactorTrainingSampler, TrainingSampler
from detectron2.utils.file_io import PathManager

from mae_transfer.data.decode import EncodedImage, decode_upright
from mae_transfer.data.folder import UNREADABLE

logger = logging.getLogger(__name__)


def read_image(file_name: str, format: Optional[str] = None) -> np.ndarray:
    """(H, W, C) array of ``file_name`` in ``format`` (detectron2's: "BGR", "RGB", "L" ...),
    upright by its EXIF orientation, as ``detectron2.data.detection_utils.read_image`` returns
    it, except that images of more than 8 bits per value are stretched to 8 bits rather than
    clipped (see the module's docstring).

    Raises:
        one of ``mae_transfer.data.folder.UNREADABLE``: the file is not a readable image.
    """
    with PathManager.open(file_name, "rb") as f:
        enc = EncodedImage(bytearray(f.read()), file_name)
    return utils.convert_PIL_to_numpy(decode_upright(enc.pil, enc.data), format)


class ImageMapper(DatasetMapper):
    """detectron2's ``DatasetMapper`` (augmentations, then boxes and masks moved with the
    image) for detection data sets, with images read by :func:`read_image`.

    An image that cannot be read (or is not of its listed size) is named in a warning instead
    of stopping the run: in training it is skipped (``None``: detectron2's loader draws the
    next one); in evaluation it is scored as a blank image of its listed size, so its objects
    count as missed.
    """

    def __call__(self, dataset_dict: Dict) -> Optional[Dict]:
        record = copy.deepcopy(dataset_dict)
        try:
            image = read_image(record["file_name"], format=self.image_format)
            utils.check_image_size(record, image)
        except UNREADABLE as e:
            if self.is_train:
                logger.warning("cannot use %s (%s): skipped", record["file_name"], e)
                return None
            logger.warning(
                "cannot use %s (%s): scored as a blank image (its objects count as missed)",
                record["file_name"],
                e,
            )
            channels = 1 if self.image_format == "L" else 3
            image = np.zeros((record["height"], record["width"], channels), np.uint8)
        aug_input = T.AugInput(image)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        record["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if not self.is_train:
            record.pop("annotations", None)
        elif "annotations" in record:
            self._transform_annotations(record, transforms, image.shape[:2])
        return record


class _Skipping:
    """A detectron2 training sampler (one endless stream of indices, each process taking every
    world-size-th) that can start ``skip`` indices into the stream: a resumed run continues
    the order where its checkpoint left it (detectron2 began the stream again, training once
    more on the images just trained on, with the same ``SEED``)."""

    skip = 0

    def __iter__(self):
        stream = self._infinite_indices()
        return itertools.islice(stream, self.skip + self._rank, None, self._world_size)


class ResumableSampler(_Skipping, TrainingSampler):
    """detectron2's ``TrainingSampler`` (shuffled indices), resumable (:class:`_Skipping`)."""


class ResumableRepeatFactorSampler(_Skipping, RepeatFactorTrainingSampler):
    """detectron2's ``RepeatFactorTrainingSampler`` (each image repeated by the rarity of its
    rarest class, LVIS's usual sampler), resumable (:class:`_Skipping`)."""


Resumable = Union[ResumableSampler, ResumableRepeatFactorSampler]


def build_sampler(cfg, dicts: List[Dict]) -> Optional[Resumable]:
    """DATALOADER.SAMPLER_TRAIN over the training set's ``dicts``, resumable where we have
    that: TrainingSampler; RepeatFactorTrainingSampler (threshold DATALOADER.REPEAT_THRESHOLD);
    None for another, which detectron2 builds."""
    name = cfg.DATALOADER.SAMPLER_TRAIN
    if name == "TrainingSampler":
        return ResumableSampler(len(dicts))
    if name == "RepeatFactorTrainingSampler":
        factors = RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(
            dicts, cfg.DATALOADER.REPEAT_THRESHOLD
        )
        return ResumableRepeatFactorSampler(factors)
    return None


def train_sampler(loader) -> Optional[Resumable]:
    """The resumable sampler inside a loader built by detectron2's
    ``build_detection_train_loader`` (a DataLoader, perhaps under an aspect-ratio grouping),
    or None (another sampler)."""
    for _ in range(4):
        if isinstance(loader, ToIterableDataset):
            sampler = loader.sampler
            return sampler if isinstance(sampler, _Skipping) else None
        loader = getattr(loader, "dataset", None)
    return None


def batching_workers(loader) -> int:
    """How many loader workers each make whole batches of their own share of the sampler's
    stream (detectron2's loader without aspect-ratio grouping: worker k's batches come k-th,
    (W + k)-th, ...); 1 where batches follow the stream (grouping, or one worker)."""
    per_worker = (
        isinstance(loader, torch.utils.data.DataLoader)
        and loader.batch_size is not None
        and isinstance(loader.dataset, ToIterableDataset)
    )
    return max(loader.num_workers, 1) if per_worker else 1
