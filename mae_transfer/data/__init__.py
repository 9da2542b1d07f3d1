"""Data pieces shared by pretraining and the evaluation protocols (torch, torchvision, PIL).

- :mod:`.folder`: image folders and class folders (the ImageNet layout), robust decoding that
  skips and counts unreadable files;
- :mod:`.transforms`: pretraining crops (the official float pipeline, and the uint8 one whose
  batches are normalised on the device by :func:`normalize`), evaluation resize + centre crop;
- :mod:`.decode`: decoding to uint8 (torchvision's ``decode_jpeg``, reduced-size JPEG decoding,
  PIL for other formats); :mod:`.device_decode`: JPEG decoding in the step (nvJPEG);
- :mod:`.sampler`: a resumable distributed sampler and per-sample seeds, so that batches and
  augmentations depend on (seed, epoch, image) only, never on process or worker counts.
"""

from .folder import (
    IMG_EXTENSIONS,
    ClassFolder,
    ClassFolderDataset,
    PathList,
    collate,
    collate_flags,
    find_classes,
    find_images,
    first_image,
    image_files,
    load_rgb,
    read_good,
    split_root,
)
from .sampler import ResumableDistributedSampler, ShardSampler, sample_seed, seeded
from .transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    RandomResizedCropFlip,
    eval_transform,
    normalize,
    pretrain_transform,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMG_EXTENSIONS",
    "ClassFolder",
    "ClassFolderDataset",
    "PathList",
    "collate",
    "collate_flags",
    "eval_transform",
    "normalize",
    "RandomResizedCropFlip",
    "pretrain_transform",
    "ResumableDistributedSampler",
    "ShardSampler",
    "find_classes",
    "find_images",
    "image_files",
    "first_image",
    "load_rgb",
    "read_good",
    "sample_seed",
    "seeded",
    "split_root",
]
