"""Images as the pipelines' ``LoadImageFromFile`` (mmcv) reads them: EXIF orientation included.

mmcv's cv2 and pillow decoders turn an image by its EXIF orientation tag for ``color_type``
'color' and 'grayscale' (the default), not for 'unchanged' nor the '*_ignore_orientation'
types; turbojpeg and tifffile never turn it. PIL's ``Image.open`` does not turn it either, so
what PIL reads of a phone photo can be rotated against what training and inference see.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from mae_transfer.data.decode import ORIENTATION, SWAPS_SIDES

# what loads images as stored in every pipeline that reads them, as --cfg-options (index 0:
# LoadImageFromFile first, as in mmseg's pipelines); mmengine has copied train_pipeline and
# test_pipeline into the data loaders by then, and inference (visualize_seg) reads test_pipeline
IGNORE_ORIENTATION = " ".join(
    f"{key}.0.color_type=color_ignore_orientation"
    for key in (
        "train_dataloader.dataset.pipeline",
        "val_dataloader.dataset.pipeline",
        "test_dataloader.dataset.pipeline",
        "test_pipeline",
    )
)


# mmcv's image loader, and ours (transforms.LoadImageAnyDepth) that build_cfg puts in its place
IMAGE_LOADERS = ("LoadImageFromFile", "LoadImageAnyDepth")


def image_loader(pipeline: Optional[Sequence[Any]]) -> Dict:
    """The pipeline's image loading entry (:data:`IMAGE_LOADERS`); ``{"type":
    "LoadImageFromFile"}`` (mmcv's defaults) when it has none."""
    for t in pipeline or []:
        if type_name(t) in IMAGE_LOADERS:
            return dict(t)
    return {"type": "LoadImageFromFile"}


def stretches_deep_images(loader: Dict) -> bool:
    """Whether ``loader`` reads images of more than 8 bits per value stretched to 0..255 (as
    pretraining reads them), not cut to their high byte (mmcv's cv2), clipped (pillow) or raw
    (color_type 'unchanged'; the tifffile backend, which ignores color_type)."""
    raw = loader.get("color_type") == "unchanged" or loader.get("imdecode_backend") == "tifffile"
    return type_name(loader) == "LoadImageAnyDepth" and not raw


def type_name(transform) -> Optional[str]:
    """A pipeline entry's type without its scope ('mmseg.LoadAnnotations' -> 'LoadAnnotations'),
    also for a class (new-style configs); None for what is not a config dict."""
    kind = transform.get("type") if isinstance(transform, dict) else None
    return None if kind is None else str(getattr(kind, "__name__", kind)).split(".")[-1]


def turns_by_orientation(loader: Dict) -> bool:
    """Whether ``loader`` (a LoadImageFromFile config) applies the EXIF orientation."""
    applies = loader.get("color_type", "color") in ("color", "grayscale")
    return applies and loader.get("imdecode_backend", "cv2") in ("cv2", "pillow")


def loaded_size(image, loader: Dict) -> Tuple[Tuple[int, int], bool]:
    """``((width, height), turned)`` of an open PIL image as ``loader`` will load it, from the
    header only; ``turned``: its orientation tag swaps its sides and ``loader`` applies it."""
    turned = turns_by_orientation(loader) and image.getexif().get(ORIENTATION) in SWAPS_SIDES
    return (image.size[::-1] if turned else image.size), turned


def read_rgb(path: str, pipeline: Optional[Sequence[Any]] = None) -> np.ndarray:
    """(H, W, 3) uint8 RGB of ``path``, read by the pipeline's LoadImageFromFile (built from
    mmseg's registry): the orientation, size and colours the segmentor sees."""
    import mmcv
    from mmseg.registry import TRANSFORMS

    img = TRANSFORMS.build(image_loader(pipeline))(dict(img_path=path))["img"]
    if img.ndim == 2:  # color_type 'grayscale'
        return np.repeat(img[:, :, None], 3, axis=2)
    return mmcv.bgr2rgb(img[:, :, :3])
