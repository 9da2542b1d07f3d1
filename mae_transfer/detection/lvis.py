"""LVIS data sets: records and metadata from an LVIS-format file, class frequencies, evaluator.

An LVIS file is COCO's format with more to it: categories carry a ``frequency`` (r: rare,
1-10 training images; c: common, 11-100; f: frequent) and an ``image_count``; each image lists
``neg_category_ids`` (checked, absent) and ``not_exhaustive_category_ids`` (not all instances
labelled), which LVIS's evaluation reads; LVIS v1's images name their file by ``coco_url``
(``.../train2017/000000391895.jpg``: LVIS val draws on COCO's train2017 too), so the image
root is the folder holding COCO's ``train2017/`` and ``val2017/``.

detectron2 0.6 reads its builtin ``lvis_v1_*`` sets (under $DETECTRON2_DATASETS/coco) with
LVIS's 1203 categories; a file of other categories (a subset, one's own LVIS-format set) gets
them from the file here (``DATASETS.LVIS``, ``--lvis-train`` / ``--lvis-val``).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from typing import Dict, List, Sequence, Tuple, Union

import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.lvis_v1_categories import LVIS_CATEGORIES as LVIS_V1_CATEGORIES
from detectron2.structures import BoxMode

from mae_transfer.engine.config import ConfigError

logger = logging.getLogger(__name__)

# LVIS's evaluation protocol: AP over at most 300 detections per image (ViTDet's too)
LVIS_MAX_DETS = 300
FREQUENCIES = ("r", "c", "f")
_IMAGE_LISTS = ("not_exhaustive_category_ids", "neg_category_ids")


def is_lvis(name: str) -> bool:
    """Whether registered data set ``name`` is evaluated by LVIS's rules (LVISEvaluator)."""
    return MetadataCatalog.get(name).get("evaluator_type", None) == "lvis"


def builtin_lvis_categories(classes: Sequence[str]) -> Dict[int, str]:
    """{id: name} of one of detectron2's builtin LVIS sets, from its ``thing_classes`` (its
    metadata has no id map: LVIS's ids are 1..K). LVIS v1's by their names in LVIS's files
    (detectron2's classes are each category's first synonym: id 162 'bull' is 'horned_cow')."""
    if len(classes) == len(LVIS_V1_CATEGORIES):
        return {c["id"]: c["name"] for c in LVIS_V1_CATEGORIES}
    return {k + 1: name for k, name in enumerate(classes)}


def lvis_records(data: Dict, image_root: str, where: str) -> Tuple[List[Dict], Dict]:
    """detectron2 data set dicts and metadata from a parsed LVIS-format file ``data``.

    Metadata: ``thing_classes`` (category names by id), ``thing_dataset_id_to_contiguous_id``
    and ``class_image_count`` ([{"id", "image_count"}], detectron2's later name: the file's
    image counts, or, when its categories have none, images per category counted from its
    annotations).

    Raises:
        ConfigError: what the file lacks for training or LVIS evaluation, named (``where``:
            the data set and file, for the message).
    """
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise ConfigError(
                f"{where} has no {key!r} (an LVIS file has images, annotations and categories)"
            )
    categories = sorted(data["categories"], key=lambda c: c["id"])
    _check_categories(categories, where)
    ids = {c["id"]: i for i, c in enumerate(categories)}
    images = sorted(data["images"], key=lambda im: im["id"])
    lacking = [im["id"] for im in images if not all(k in im for k in _IMAGE_LISTS)]
    if lacking:
        raise ConfigError(
            f"{where}: {len(lacking)} images (ids {lacking[:5]}) lack not_exhaustive_category_ids "
            "or neg_category_ids, which LVIS's evaluation reads: give them ([] where none)"
        )
    by_image: Dict[int, List[Dict]] = {im["id"]: [] for im in images}
    for ann in data["annotations"]:
        if ann["image_id"] not in by_image or ann["category_id"] not in ids:
            raise ConfigError(
                f"{where}: annotation {ann.get('id')} refers to image {ann['image_id']} / "
                f"category {ann['category_id']}, which the file does not define"
            )
        by_image[ann["image_id"]].append(
            {
                "bbox": ann["bbox"],
                "bbox_mode": BoxMode.XYWH_ABS,
                "category_id": ids[ann["category_id"]],
                "segmentation": ann.get("segmentation"),
            }
        )
    records = [_record(im, by_image[im["id"]], image_root) for im in images]
    meta = {
        "thing_classes": [c["name"] for c in categories],
        "thing_dataset_id_to_contiguous_id": ids,
        "class_image_count": _image_counts(categories, records, where),
    }
    return records, meta


def _check_categories(categories: Sequence[Dict], where: str) -> None:
    bad = [c["id"] for c in categories if c.get("frequency") not in FREQUENCIES]
    if bad:
        raise ConfigError(
            f"{where}: categories {bad[:5]} have no 'frequency' r / c / f (rare, common, "
            "frequent), by which LVIS's evaluation groups APr / APc / APf"
        )
    counted = [c for c in categories if "image_count" in c]
    if counted and len(counted) < len(categories):
        missing = [c["id"] for c in categories if "image_count" not in c]
        raise ConfigError(
            f"{where}: {len(missing)} categories (ids {missing[:5]}) have no 'image_count' and "
            f"{len(counted)} have one: the fed loss's class frequencies would be partly missing; "
            "give every category one, or none (then they are counted from the annotations)"
        )


def _record(image: Dict, annotations: List[Dict], image_root: str) -> Dict:
    if "coco_url" in image:  # LVIS: the COCO split folder and file
        file_name = os.path.join(image_root, *image["coco_url"].split("/")[-2:])
    else:
        file_name = os.path.join(image_root, image["file_name"])
    return {
        "file_name": file_name,
        "height": image["height"],
        "width": image["width"],
        "image_id": image["id"],
        "not_exhaustive_category_ids": image["not_exhaustive_category_ids"],
        "neg_category_ids": image["neg_category_ids"],
        "annotations": annotations,
    }


def _image_counts(categories: Sequence[Dict], records: Sequence[Dict], where: str) -> List[Dict]:
    if all("image_count" in c for c in categories):
        return [{"id": c["id"], "image_count": int(c["image_count"])} for c in categories]
    logger.info("%s: no image_count in its categories: counted from its annotations", where)
    counts = count_images_per_class(records, len(categories))
    return [{"id": c["id"], "image_count": int(n)} for c, n in zip(categories, counts)]


def count_images_per_class(dicts: Sequence[Dict], num_classes: int) -> torch.Tensor:
    """(K,) how many of the data set dicts have an instance of each (contiguous) class."""
    counts: Counter = Counter()
    for record in dicts:
        counts.update({obj["category_id"] for obj in record.get("annotations", ())})
    return torch.tensor([counts[k] for k in range(num_classes)], dtype=torch.long)


def note_training_counts(names: Sequence[str], dicts: Sequence[Dict], num_classes: int) -> None:
    """The training set's ``class_image_count`` where its metadata has none (a COCO-format set;
    detectron2 0.6's builtin lvis_v1_train, whose metadata dropped LVIS's image counts), counted
    from its ``dicts``, as LVIS counts them: images with an instance of the class.

    Raises:
        ConfigError: several training sets of which some have none (``dicts`` merges them).
    """
    lacking = [n for n in names if MetadataCatalog.get(n).get("class_image_count", None) is None]
    if not lacking:
        return
    if len(names) > 1:
        raise ConfigError(
            f"MODEL.ROI_BOX_HEAD.USE_FED_LOSS: the training sets {lacking} have no class "
            "frequencies (image_count of an LVIS file's categories), which the fed loss draws its "
            "negative classes by; with one training set they are counted from its annotations, "
            "with several each must have them: register them as LVIS files (DATASETS.LVIS)"
        )
    counts = count_images_per_class(dicts, num_classes)
    meta = MetadataCatalog.get(names[0])
    # detectron2's builtin LVIS sets have no id map: LVIS's ids are 1..K
    ids = meta.get("thing_dataset_id_to_contiguous_id", None)
    ids = ids or {k + 1: k for k in range(num_classes)}
    by_class = {k: i for i, k in ids.items()}
    meta.set(
        class_image_count=[{"id": by_class[k], "image_count": int(n)} for k, n in enumerate(counts)]
    )
    logger.info("class frequencies of %s counted from its annotations", names[0])


def class_image_counts(names: Sequence[str], num_classes: int) -> torch.Tensor:
    """(K,) training images per class, the training sets' ``class_image_count`` summed.

    Raises:
        ConfigError: a set without them, or with another number of classes than the model's.
    """
    total = torch.zeros(num_classes, dtype=torch.long)
    for name in names:
        entries = MetadataCatalog.get(name).get("class_image_count", None)
        if entries is None:
            raise ConfigError(
                f"MODEL.ROI_BOX_HEAD.USE_FED_LOSS: training set {name!r} has no class "
                "frequencies (metadata class_image_count: an LVIS file's image_count)"
            )
        if len(entries) != num_classes:
            raise ConfigError(
                f"training set {name!r} has frequencies of {len(entries)} categories, "
                f"MODEL.ROI_HEADS.NUM_CLASSES is {num_classes}: set it to {len(entries)}"
            )
        counts = [e["image_count"] for e in sorted(entries, key=lambda e: e["id"])]
        total += torch.tensor(counts, dtype=torch.long)
    return total


def training_class_counts(names: Union[str, Sequence[str]], num_classes: int) -> torch.Tensor:
    """(K,) training images per class of the registered data sets ``names``, for a model built
    before its training loader (detectron2's LazyConfig loop builds the model first).

    A set whose metadata has no ``class_image_count`` yet is read: an LVIS file registered by
    :func:`mae_transfer.detection.train.register_lvis` sets it as it loads; detectron2 0.6's
    builtin ``lvis_v1_train`` and COCO-format sets are counted from their annotations
    (:func:`note_training_counts`). Then :func:`class_image_counts`, as the YAML path.

    Raises:
        ConfigError: a name that is not registered, or what the two helpers refuse.
    """
    names = [names] if isinstance(names, str) else list(names)
    unknown = [n for n in names if n not in DatasetCatalog.list()]
    if unknown:
        raise ConfigError(
            f"the fed loss counts its class frequencies from the training sets {names}, of "
            f"which {unknown} are not registered: register an LVIS-format file first "
            "(mae_transfer.detection.train.register_lvis(name, json_file, image_root))"
        )
    meta = [MetadataCatalog.get(n) for n in names]
    lacking = [n for n, m in zip(names, meta) if m.get("class_image_count", None) is None]
    try:
        dicts = [d for n in lacking for d in DatasetCatalog.get(n)]  # ours set it as they load
    except OSError as e:  # e.g. --eval-only on a machine without the training set
        raise ConfigError(
            f"the fed loss counts its class frequencies from the training sets {lacking}, which "
            f"could not be read ({e}); to evaluate without them, override "
            "model.roi_heads.box_predictor.fed_loss_datasets=[]"
        ) from e
    note_training_counts(names, dicts, num_classes)  # (the one set left without: counted)
    return class_image_counts(names, num_classes)
