"""Training and evaluation with detectron2's DefaultTrainer, for the MAE recipe.

What changes from detectron2's defaults: AdamW with layer-wise lr decay and no weight decay on
norms/biases/position tables; large-scale jitter; MAE checkpoints accepted as MODEL.WEIGHTS;
COCO and LVIS datasets registered from the config; COCOEvaluator with the Python implementation
when detectron2 has no compiled ops, LVISEvaluator for LVIS sets; the fed loss's class
frequencies (fed_loss.py) from the training set.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings
import weakref
from typing import Dict, List, Optional, Sequence

import torch
import yaml
from detectron2.config import get_cfg
from detectron2.data import (
    DatasetCatalog,
    MetadataCatalog,
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.data import transforms as T
from detectron2.data.datasets import load_coco_json
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, hooks
from detectron2.engine.train_loop import TrainerBase
from detectron2.evaluation import COCOEvaluator, LVISEvaluator
from detectron2.solver.build import maybe_add_gradient_clipping

from mae_transfer.compat.detectron2_compat import HAS_COMPILED_OPS
from mae_transfer.data.decode import ORIENTATION, SWAPS_SIDES
from mae_transfer.device import fused_adamw_supported
from mae_transfer.engine.config import ConfigError
from mae_transfer.optim import keep_optimizer_impl, param_groups

from .backbone import build_vit_part
from .checkpoint import MAECheckpointer, find_vit
from .config import add_mae_vit_config, amp_dtype, validate_config
from .data import ImageMapper, batching_workers, build_sampler, train_sampler
from .fed_loss import set_fed_loss_frequencies
from .lvis import (
    LVIS_MAX_DETS,
    LVIS_V1_CATEGORIES,
    builtin_lvis_categories,
    class_image_counts,
    is_lvis,
    lvis_records,
    note_training_counts,
)

logger = logging.getLogger(__name__)


def build_cfg(
    config_file: str, opts=(), coco_train=None, coco_val=None, lvis_train=None, lvis_val=None
):
    """The frozen-to-be config: file, then ``KEY VALUE`` overrides, then data set flags
    (``coco_*`` / ``lvis_*``: (json_file, image_root), registered as ``custom_{coco,lvis}_*``).

    Raises:
        ConfigError: a missing file, an unknown key, a bad value (named).
    """
    if not os.path.isfile(config_file):
        raise ConfigError(f"--config-file {config_file!r} does not exist")
    cfg = get_cfg()
    add_mae_vit_config(cfg)
    # yacs reports an unknown key, a value of the wrong type or an odd KEY VALUE list with
    # KeyError / ValueError / AssertionError: each names the key, but a traceback hides it
    try:
        cfg.merge_from_file(config_file)
    except (KeyError, ValueError, AssertionError, OSError, yaml.YAMLError) as e:
        raise ConfigError(f"--config-file {config_file}: {_reason(e)}") from e
    try:
        cfg.merge_from_list(list(opts))
    except (KeyError, ValueError, AssertionError) as e:
        raise ConfigError(f"KEY VALUE overrides: {_reason(e)}") from e
    flags = [("COCO", "train", coco_train), ("COCO", "val", coco_val)]
    flags += [("LVIS", "train", lvis_train), ("LVIS", "val", lvis_val)]
    for kind, split, files in flags:
        if files:
            name = f"custom_{kind.lower()}_{split}"
            entries = [e for e in cfg.DATASETS[kind] if e[0] != name] + [[name, *files]]
            cfg.DATASETS[kind] = entries
            if split == "train":
                cfg.DATASETS.TRAIN = (name,)
            else:
                cfg.DATASETS.TEST = (name,)
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        # SOLVER.AMP then follows the CPU rule (amp_dtype): bf16 autocast where the CPU has AMX
        # or AVX512-BF16, else fp32
        logger.info("MODEL.DEVICE %s -> cpu: CUDA is not available", cfg.MODEL.DEVICE)
        cfg.MODEL.DEVICE = "cpu"
    validate_config(cfg)
    check_backbone(cfg)
    return cfg


def check_backbone(cfg) -> None:
    """Builds the backbone on the meta device (no memory, no weights): what only the model
    knows (OUT_INDICES beyond the depth, a patch size, a SIZE_OVERRIDES key) is named now."""
    try:
        with torch.device("meta"):
            build_vit_part(cfg, pretrained=False)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"MODEL.VIT ({cfg.MODEL.VIT.NAME}): {e}") from e


def _reason(e: Exception) -> str:
    """yacs' message (str() of a KeyError would quote it)."""
    if isinstance(e, KeyError) and e.args:
        return str(e.args[0])
    return str(e) or type(e).__name__


_REGISTERED_HERE: set = set()  # names register_coco_datasets registered in this process


def register_coco_datasets(cfg) -> List[str]:
    """Registers each ``DATASETS.COCO`` and ``DATASETS.LVIS`` entry [name, json_file,
    image_root]: once; again for other files when this function registered the name before
    (an earlier run in this process, e.g. a notebook); a name someone else registered
    (detectron2's ``coco_2017_*``, ``lvis_v1_*``) for other files is a ConfigError."""
    names = []
    entries = [("COCO", *e) for e in cfg.DATASETS.COCO] + [("LVIS", *e) for e in cfg.DATASETS.LVIS]
    for kind, name, json_file, image_root in entries:
        if name in DatasetCatalog.list():
            meta = MetadataCatalog.get(name)
            before = (meta.get("json_file", None), meta.get("image_root", None))
            if before == (json_file, image_root):
                names.append(name)
                continue
            if name not in _REGISTERED_HERE:  # detectron2's (its COCO files) or the caller's
                raise ConfigError(
                    f"DATASETS.{kind} names {name!r}, which is already registered for "
                    f"{before[0]} / {before[1]} (e.g. one of detectron2's built-in sets): "
                    f"give {json_file} another name, and use it in DATASETS.TRAIN / TEST"
                )
            DatasetCatalog.remove(name)  # ours, for other files (an earlier run in this process)
            MetadataCatalog.remove(name)
        (register_lvis if kind == "LVIS" else register_coco)(name, json_file, image_root)
        _REGISTERED_HERE.add(name)
        names.append(name)
    return names


def register_coco(name: str, json_file: str, image_root: str) -> None:
    """detectron2's ``register_coco_instances``, its loading checked (:func:`load_coco`)."""
    DatasetCatalog.register(name, lambda: load_coco(json_file, image_root, name))
    MetadataCatalog.get(name).set(json_file=json_file, image_root=image_root, evaluator_type="coco")


def load_coco(json_file: str, image_root: str, name: str) -> List[Dict]:
    """detectron2's ``load_coco_json``, with what it fails on (a file that is not JSON, one
    without a COCO key, an image file listed but absent, which training met only when it drew
    that image) named as a :class:`ConfigError`."""
    try:
        dicts = load_coco_json(json_file, image_root, name)
    except json.JSONDecodeError as e:
        raise ConfigError(f"data set {name!r}: {json_file} is not valid JSON ({e})") from e
    except KeyError as e:
        key = e.args[0] if e.args else e
        what = (
            f"has no {key!r} (a COCO file has 'images', 'annotations' and 'categories')"
            if key in ("images", "annotations", "categories")
            else f"refers to {key!r}, which it does not define (a category_id absent from "
            "'categories', an annotation's image_id absent from 'images', or a field missing)"
        )
        raise ConfigError(f"data set {name!r}: {json_file} {what}") from e
    check_images(dicts, json_file, image_root, name)
    return dicts


def register_lvis(name: str, json_file: str, image_root: str) -> None:
    """An LVIS-format data set (:mod:`.lvis`), evaluated by LVISEvaluator."""
    DatasetCatalog.register(name, lambda: load_lvis(json_file, image_root, name))
    MetadataCatalog.get(name).set(json_file=json_file, image_root=image_root, evaluator_type="lvis")


def load_lvis(json_file: str, image_root: str, name: str) -> List[Dict]:
    """The data set dicts of an LVIS-format file (:func:`.lvis.lvis_records`), its metadata
    set; what the file lacks, or images it lists that are absent, named (ConfigError)."""
    try:
        with open(json_file) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"data set {name!r}: {json_file} is not valid JSON ({e})") from e
    try:
        dicts, meta = lvis_records(data, image_root, f"data set {name!r}: {json_file}")
    except KeyError as e:
        raise ConfigError(
            f"data set {name!r}: {json_file} lacks the field {e.args[0]!r} in an image, "
            "annotation or category"
        ) from e
    MetadataCatalog.get(name).set(**meta)
    check_images(dicts, json_file, image_root, name)
    return dicts


def check_images(dicts: Sequence[Dict], json_file: str, image_root: str, name: str) -> None:
    """Every image a data set lists is a file, of the size listed (a sample): ConfigError."""
    absent = [d["file_name"] for d in dicts if not os.path.isfile(d["file_name"])]
    if absent:
        raise ConfigError(
            f"data set {name!r}: {len(absent)} of the {len(dicts)} images {json_file} lists are "
            f"not in {image_root}, e.g. {', '.join(absent[:3])}"
        )
    misfit = _misfit_sizes(dicts)
    if misfit:
        raise ConfigError(
            f"data set {name!r}: {len(misfit[0])} of {misfit[1]} sampled images are not of the "
            f"size {json_file} gives them (e.g. {', '.join(misfit[0][:3])}): the annotations "
            "were made for other images (resized since?); detectron2 stops when it draws one"
        )


SIZE_SAMPLE = 32  # images whose size (file header) is compared with the annotation file's


def _misfit_sizes(dicts: Sequence[Dict]):
    """([file (its width x height vs the file's)], sampled) for a sample of ``dicts`` whose
    image, as detectron2 reads it (EXIF orientation applied), is not the listed width x height
    (detectron2's SizeMismatchError came when training drew it, hours in); None if all fit."""
    from PIL import Image

    step = max(1, len(dicts) // SIZE_SAMPLE)
    sample = [d for d in dicts[::step] if "width" in d and "height" in d]
    bad = []
    for d in sample:
        try:
            with Image.open(d["file_name"]) as img:
                w, h = img.size
                if img.getexif().get(ORIENTATION) in SWAPS_SIDES:  # turned a quarter on loading
                    w, h = h, w
        except OSError:
            continue  # unreadable: the loader skips or names it
        if (w, h) != (d["width"], d["height"]):
            bad.append(f"{d['file_name']} ({w}x{h} vs {d['width']}x{d['height']})")
    return (bad, len(sample)) if bad else None


def check_weights(cfg, resume: bool, eval_only: bool = False) -> None:
    """A missing MODEL.WEIGHTS file (or none at all with ``eval_only``: a random detector) is
    named (:class:`ConfigError`) before the model and data are built, unless ``--resume`` will
    continue from OUTPUT_DIR's last checkpoint instead."""
    weights = cfg.MODEL.WEIGHTS
    if "://" in weights or os.path.isfile(weights) or not (weights or eval_only):
        return
    last = os.path.join(cfg.OUTPUT_DIR, "last_checkpoint")
    if resume and os.path.isfile(last):
        return
    # with --resume, say why it did not apply: no checkpoint to continue from
    why = f" (and --resume found no {last} to continue from)" if resume else ""
    if not weights:
        raise ConfigError(f"--eval-only needs MODEL.WEIGHTS: the trained detector to evaluate{why}")
    raise ConfigError(f"MODEL.WEIGHTS {weights!r} does not exist{why}")


def check_pretrained(cfg) -> None:
    """A missing MODEL.VIT.PRETRAINED file named with its key (:class:`ConfigError`) before the
    run is set up; it failed as the model was built, as 'checkpoint not found', naming no key."""
    path = cfg.MODEL.VIT.PRETRAINED
    if path and "://" not in path and not os.path.isfile(path):
        raise ConfigError(f"MODEL.VIT.PRETRAINED {path!r} does not exist")


def check_detector_weights(cfg) -> None:
    """``--eval-only``: MODEL.WEIGHTS (a local file) must fill the whole detector, checked in
    the launching process on a model built on the meta device (no memory), so that a bad file
    is named before worker processes start (an error inside them is a traceback)."""
    weights = cfg.MODEL.WEIGHTS
    if not weights or "://" in weights or not os.path.isfile(weights):
        return  # URLs and model-zoo paths: checked on every rank when they load
    meta_cfg = cfg.clone()
    meta_cfg.defrost()
    meta_cfg.MODEL.DEVICE = "meta"
    meta_cfg.MODEL.VIT.PRETRAINED = ""
    with torch.device("meta"):
        model = Trainer.build_model(meta_cfg)
    MAECheckpointer(model, whole_model=True).load(weights)


def check_datasets(cfg, eval_only: bool = False) -> None:
    """Every data set the run reads is registered and its files exist, checked before the model
    is built (a test set that is not registered would otherwise fail after the whole training).

    DATASETS.TEST ``()`` trains without evaluating, as in detectron2.
    """
    needed = [("DATASETS.TEST", "--coco-val", name) for name in cfg.DATASETS.TEST]
    errors = []
    if eval_only and not needed:
        errors.append(
            "DATASETS.TEST is empty, nothing to evaluate: give --coco-val JSON ROOT (or "
            "--lvis-val for an LVIS file)"
        )
    if not eval_only:
        needed = [("DATASETS.TRAIN", "--coco-train", name) for name in cfg.DATASETS.TRAIN] + needed
        if not cfg.DATASETS.TRAIN:
            errors.append(
                "DATASETS.TRAIN is empty: give --coco-train JSON IMAGE_ROOT (or --lvis-train "
                "for an LVIS file)"
            )
    registered = set(DatasetCatalog.list())
    for key, flag, name in needed:
        if name not in registered:
            hint = "; DATASETS.TEST '()' trains without evaluating" if key.endswith("TEST") else ""
            errors.append(
                f"{key} {name!r} is not registered: give {flag} JSON IMAGE_ROOT (an LVIS "
                f"file: {flag.replace('coco', 'lvis')}), or add [{name!r}, json_file, "
                f"image_root] to DATASETS.COCO (an LVIS file: DATASETS.LVIS){hint}"
            )
            continue
        meta = MetadataCatalog.get(name)
        json_file, image_root = meta.get("json_file", None), meta.get("image_root", None)
        if json_file and "://" not in json_file and not os.path.isfile(json_file):
            errors.append(f"{key} {name!r}: annotation file {json_file} does not exist")
        if image_root and "://" not in image_root and not os.path.isdir(image_root):
            errors.append(f"{key} {name!r}: image folder {image_root} does not exist")
    if errors:
        raise ConfigError("invalid detectron2 data sets:\n  - " + "\n  - ".join(errors))


class _LevelFormatter(logging.Formatter):
    """detectron2's layout, with warnings and errors marked as detectron2 marks its own
    ('WARNING [time name]: ...'): ours read as information among its lines."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.levelno < logging.WARNING else f"{record.levelname} {text}"


def _import_lvis_quietly() -> None:
    """Imports the ``lvis`` package (if installed) with the root logger given a handler for
    the while: its ``__init__`` calls ``logging.basicConfig``, which, at the first LVIS
    evaluation, gave the root logger a console handler, and every record of ours printed
    twice from then on. With a handler there, that call does nothing."""
    if "lvis" in sys.modules:
        return
    root, guard = logging.getLogger(), logging.NullHandler()
    root.addHandler(guard)
    try:
        import lvis  # noqa: F401
    except ImportError:
        pass
    finally:
        root.removeHandler(guard)


def attach_logs(names: Sequence[str], output_dir: str, rank: int = 0) -> None:
    """Our loggers next to detectron2's (``default_setup`` configures only its own and
    fvcore's): INFO on rank 0, warnings elsewhere; to the console unless the root logger
    already prints, and to ``output_dir/log.txt`` on rank 0. Propagation is left on (logging
    set up by a caller still sees the records); calling again adds nothing."""
    _import_lvis_quietly()
    fmt = _LevelFormatter("[%(asctime)s %(name)s]: %(message)s", "%m/%d %H:%M:%S")
    targets = [("console", None)] if not logging.getLogger().handlers else []
    if rank == 0 and output_dir:
        targets.append(("file", os.path.join(output_dir, "log.txt")))
    for name in names:
        log = logging.getLogger(name)
        log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
        have = {getattr(h, "_mae_target", None) for h in log.handlers}
        for kind, path in targets:
            if (kind, path) in have:
                continue
            if kind == "file":
                os.makedirs(output_dir, exist_ok=True)
                handler: logging.Handler = logging.FileHandler(path)
            else:
                handler = logging.StreamHandler(sys.stdout)
            handler._mae_target = (kind, path)
            handler.setFormatter(fmt)
            log.addHandler(handler)


def thing_classes(name: str) -> Optional[List[str]]:
    """Data set ``name``'s category names (None if unknown). A registered COCO-format set
    learns them when its file is read: read here if that has not happened yet (detectron2's
    built-in sets know them without reading)."""
    metadata = MetadataCatalog.get(name)
    if "thing_classes" not in metadata.as_dict() and name in DatasetCatalog.list():
        DatasetCatalog.get(name)  # sets thing_classes
    return metadata.get("thing_classes", None)


def check_num_classes(cfg, names: Sequence[str]) -> None:
    """MODEL.ROI_HEADS.NUM_CLASSES against the categories of data sets ``names``
    (:func:`thing_classes`): fewer classes than the data fails at the first iteration deep in
    the box head (a device-side assert on a GPU), more leaves outputs no image can teach and
    fails COCO evaluation when one is predicted."""
    want = cfg.MODEL.ROI_HEADS.NUM_CLASSES
    for name in names:
        classes = thing_classes(name)
        if classes is None or len(classes) == want:
            continue
        if len(classes) > want:
            raise ConfigError(
                f"data set {name!r} has {len(classes)} categories but MODEL.ROI_HEADS.NUM_CLASSES "
                f"is {want}: add MODEL.ROI_HEADS.NUM_CLASSES {len(classes)} to the command"
            )
        logger.warning(
            "data set %r has %d categories, MODEL.ROI_HEADS.NUM_CLASSES is %d: the extra outputs "
            "are never trained; set MODEL.ROI_HEADS.NUM_CLASSES %d",
            name,
            len(classes),
            want,
            len(classes),
        )


def categories(name: str) -> Optional[Dict[int, str]]:
    """Data set ``name``'s categories as {id in its file: name}; None if unknown."""
    classes = thing_classes(name)
    ids = MetadataCatalog.get(name).get("thing_dataset_id_to_contiguous_id", None)
    if ids is None and classes is not None and is_lvis(name):
        return builtin_lvis_categories(classes)  # detectron2's builtin LVIS sets: no id map
    if classes is None or ids is None:
        return None
    return {int(dataset_id): classes[i] for dataset_id, i in ids.items()}


def _some(entries: Dict, n: int = 8) -> str:
    """The first ``n`` entries of a dict as text, and how many there are in all (LVIS's 1203
    category names made a 40 kB message)."""
    text = ", ".join(f"{k}: {v!r}" for k, v in list(entries.items())[:n])
    return "{" + text + (f", ... ({len(entries)} in all)" if len(entries) > n else "") + "}"


def align_test_categories(cfg) -> None:
    """A test set of ``DATASETS.COCO`` or ``DATASETS.LVIS`` whose file lists only some of the
    training set's categories is evaluated with the training set's: detectron2 numbers a
    set's classes from its own list, so the detector's class 1 was another class there (wrong
    AP, or a crash in the evaluation after the whole training). Its file is written again
    with the training set's category list (annotations unchanged; an LVIS set's missing
    entries taken from the training file, which has their frequencies) in OUTPUT_DIR and
    registered under the same name. A category the training set lacks is a
    :class:`ConfigError`."""
    ours = {name: (register_coco, json_file, root) for name, json_file, root in cfg.DATASETS.COCO}
    ours.update(
        (name, (register_lvis, json_file, root)) for name, json_file, root in cfg.DATASETS.LVIS
    )
    tests = [name for name in cfg.DATASETS.TEST if name in ours]
    if not tests or not cfg.DATASETS.TRAIN or cfg.DATASETS.TRAIN[0] not in DatasetCatalog.list():
        return
    train_name = cfg.DATASETS.TRAIN[0]
    train = categories(train_name)
    for name in tests:
        test = categories(name) if train else None
        if test is None or test == train:
            continue
        foreign = {i: c for i, c in test.items() if train.get(i) != c}
        if foreign:
            raise ConfigError(
                f"DATASETS.TEST {name!r} has categories (id: name) that the training set "
                f"{train_name!r} does not: {_some(foreign)}; its categories are {_some(train)}. "
                "A detector predicts only the classes it is trained on: give both files the "
                f"same list. If the detector was not trained on {train_name!r} (the config's "
                "DATASETS.TRAIN, e.g. with --eval-only), name the set it was trained on: "
                "--coco-train / --lvis-train JSON IMAGE_ROOT, or the run's OUTPUT_DIR/config.yaml"
            )
        register, json_file, image_root = ours[name]
        with open(json_file) as f:
            data = json.load(f)
        own = {c["id"]: c for c in data["categories"]}
        if register is register_lvis:
            own = {**_lvis_category_entries(ours.get(train_name)), **own}
        data["categories"] = [own.get(i, {"id": i, "name": c}) for i, c in sorted(train.items())]
        if register is register_lvis:  # a test set's image counts are never read: none, or
            for entry in data["categories"]:  # some from each file would be refused
                entry.pop("image_count", None)
        path = os.path.join(cfg.OUTPUT_DIR, f"{name}.categories_of_{train_name}.json")
        os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"  # every process writes the same file: atomically
        with open(tmp, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
        register(name, path, image_root)
        logger.info(
            "DATASETS.TEST %r lists %d of the %d categories of %r: evaluated with all of them, "
            "numbered as in training (the classes it lacks get no AP); %s",
            name,
            len(test),
            len(train),
            train_name,
            path,
        )


def _lvis_category_entries(train) -> Dict[int, Dict]:
    """The training set's LVIS category entries by id (with their ``frequency``, which LVIS's
    evaluation groups by): from its file (``train``: its DATASETS.LVIS registration), or
    LVIS v1's, which detectron2 ships, for its builtin sets."""
    if train is not None:
        with open(train[1]) as f:
            return {c["id"]: c for c in json.load(f)["categories"]}
    return {c["id"]: dict(c) for c in LVIS_V1_CATEGORIES}


def count_masks(dicts: Sequence[Dict]) -> Dict[str, int]:
    """Instances of detectron2 data set dicts by mask: ``polygon``, ``rle`` (a dict) or
    ``none`` (no ``segmentation``: a box-only annotation); crowd regions, which training
    drops and evaluation reads, counted apart (``crowd``, ``crowd_none``)."""
    counts = dict(polygon=0, rle=0, none=0, crowd=0, crowd_none=0)
    for record in dicts:
        for obj in record.get("annotations", ()):
            segm = obj.get("segmentation")
            if obj.get("iscrowd", 0):
                counts["crowd"] += 1
                counts["crowd_none"] += not segm
            else:
                counts["none" if not segm else "rle" if isinstance(segm, dict) else "polygon"] += 1
    return counts


def check_train_masks(cfg, dicts: Sequence[Dict]) -> None:
    """With MODEL.MASK_ON every training instance needs a mask that INPUT.MASK_FORMAT can
    read; otherwise the first iteration fails inside detectron2 (a KeyError, "Instances has
    no field gt_masks", or "Failed to use mask_format=='polygon'"). ConfigError naming the
    key to set."""
    if not cfg.MODEL.MASK_ON:
        return
    c = count_masks(dicts)
    total = c["polygon"] + c["rle"] + c["none"]
    names = ", ".join(cfg.DATASETS.TRAIN)
    if c["none"] == total and total:
        raise ConfigError(
            f"DATASETS.TRAIN ({names}) has boxes only, no 'segmentation' in its {total} "
            "instances: add MODEL.MASK_ON False to train a box-only detector"
        )
    if c["none"]:
        raise ConfigError(
            f"DATASETS.TRAIN ({names}): {c['none']} of {total} instances have no "
            "'segmentation' and Mask R-CNN needs a mask for each: give them masks, drop them "
            "from the JSON, or add MODEL.MASK_ON False"
        )
    if c["rle"] and cfg.INPUT.MASK_FORMAT == "polygon":
        raise ConfigError(
            f"DATASETS.TRAIN ({names}): {c['rle']} of {total} instances have RLE masks, which "
            "INPUT.MASK_FORMAT polygon cannot read: add INPUT.MASK_FORMAT bitmask"
        )


_SEGM_EVALUABLE: Dict[tuple, bool] = {}  # (name, json_file, image_root) -> masks everywhere


def eval_tasks(cfg, name: str) -> tuple:
    """COCOEvaluator's tasks for data set ``name``: masks too when the model predicts them
    and every annotation of the set, crowd regions included, has one (pycocotools fails on an
    annotation without, after the whole training); a box-only set gets box AP and a warning.
    The set is read once per process and file."""
    if not cfg.MODEL.MASK_ON:
        return ("bbox",)
    meta = MetadataCatalog.get(name)
    key = (name, meta.get("json_file", None), meta.get("image_root", None))
    if key not in _SEGM_EVALUABLE:
        c = count_masks(DatasetCatalog.get(name))
        if not sum(c.values()):
            logger.warning("data set %r has no annotations: its AP will be nan", name)
        _SEGM_EVALUABLE[key] = not (c["none"] or c["crowd_none"])
        if not _SEGM_EVALUABLE[key]:
            logger.warning(
                "data set %r: %d annotations have no 'segmentation', so mask AP cannot be "
                "computed on it: box AP only",
                name,
                c["none"] + c["crowd_none"],
            )
    return ("bbox", "segm") if _SEGM_EVALUABLE[key] else ("bbox",)


def build_augmentations(cfg, is_train: bool) -> List[T.Augmentation]:
    """LSJ (ResizeScale 0.1-2.0 + FixedSizeCrop + flip) for training when INPUT.LSJ.ENABLED;
    detectron2's resize otherwise."""
    lsj = cfg.INPUT.LSJ
    if not lsj.ENABLED:
        from detectron2.data.detection_utils import build_augmentation

        return build_augmentation(cfg, is_train)
    size = lsj.IMAGE_SIZE
    if not is_train:
        return [T.ResizeShortestEdge(short_edge_length=size, max_size=size)]
    return [
        T.RandomFlip(horizontal=True),
        T.ResizeScale(lsj.MIN_SCALE, lsj.MAX_SCALE, target_height=size, target_width=size),
        # not padded here (detectron2 would fill with grey 128): the model pads with zeros
        # after normalisation, i.e. the mean pixel, as it pads test images (ViTDet's way)
        T.FixedSizeCrop(crop_size=(size, size), pad=False),
    ]


def build_mapper(cfg, is_train: bool) -> ImageMapper:
    return ImageMapper(
        cfg,
        is_train=is_train,
        augmentations=build_augmentations(cfg, is_train),
        recompute_boxes=is_train and cfg.INPUT.LSJ.ENABLED and cfg.MODEL.MASK_ON,
    )


def layer_decay_groups(
    model: torch.nn.Module, base_lr: float, weight_decay: float, layer_decay: float
) -> List[Dict]:
    """Parameter groups with lr = base_lr x layer scale, weight decay off for norms/biases/
    position tables (see :mod:`mae_transfer.optim`); also usable from a LazyConfig."""
    _, vit = find_vit(model)
    groups = param_groups(model.named_parameters(), weight_decay, layer_decay, depth=vit.depth)
    for g in groups:
        g["lr"] = base_lr * g["lr_scale"]
    return groups


def build_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW (or SGD) with layer-wise lr decay over the ViT blocks; gradient clipping per cfg."""
    s = cfg.SOLVER
    groups = layer_decay_groups(model, s.BASE_LR, s.WEIGHT_DECAY, s.LAYER_DECAY)
    if s.OPTIMIZER.upper() == "SGD":
        opt = torch.optim.SGD(groups, lr=s.BASE_LR, momentum=s.MOMENTUM)
    else:
        device = next(model.parameters()).device
        # a fused AdamW unscales AMP gradients inside its own step, after detectron2's clipping
        # wrapper has clipped them: clipping would then see scaled gradients
        clip_scaled = amp_dtype(cfg) == torch.float16 and s.CLIP_GRADIENTS.ENABLED
        fused = {"fused": True} if fused_adamw_supported(device) and not clip_scaled else {}
        opt = torch.optim.AdamW(groups, lr=s.BASE_LR, betas=tuple(s.BETAS), **fused)
    return maybe_add_gradient_clipping(cfg, opt)


class PrecisionAMPTrainer(AMPTrainer):
    """detectron2 0.6's AMPTrainer with a chosen autocast dtype and device: bf16 runs without
    loss scaling (the grad scaler is disabled), fp16 with it, on CUDA or CPU."""

    def __init__(self, model, data_loader, optimizer, dtype: torch.dtype, device_type="cuda"):
        scaler = torch.amp.GradScaler(device_type, enabled=dtype == torch.float16)
        super().__init__(model, data_loader, optimizer, grad_scaler=scaler)
        self.dtype, self.device_type = dtype, device_type

    def run_step(self):
        assert self.model.training, "[PrecisionAMPTrainer] the model is in eval mode"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        with torch.autocast(self.device_type, dtype=self.dtype):
            loss_dict = self.model(data)
            if isinstance(loss_dict, torch.Tensor):
                loss_dict = {"total_loss": loss_dict}
            losses = sum(loss_dict.values())
        self.optimizer.zero_grad()
        self.grad_scaler.scale(losses).backward()
        self._write_metrics(loss_dict, data_time)
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()

    def load_state_dict(self, state_dict):
        """Also from a run in another precision: a bf16 or fp32 checkpoint has no (or an empty)
        loss-scaler state, which an enabled GradScaler refuses; fp16 scaling then starts afresh."""
        SimpleTrainer.load_state_dict(self, state_dict)
        scaler_state = state_dict.get("grad_scaler") or {}
        if scaler_state:
            self.grad_scaler.load_state_dict(scaler_state)  # a disabled (bf16) scaler ignores it
        elif self.grad_scaler.is_enabled():
            logger.info("no loss-scaler state in the checkpoint (bf16 / fp32 run): starts afresh")


class Trainer(DefaultTrainer):
    """detectron2's DefaultTrainer with the pieces above."""

    def __init__(self, cfg):
        # detectron2 builds its CUDA-only AMPTrainer (and GradScaler) first; replaced below
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*GradScaler")
            super().__init__(cfg)
        self._trainer = self._precision_trainer(cfg, amp_dtype(cfg))
        # MODEL.WEIGHTS may be an MAE checkpoint: swap in the checkpointer that understands it.
        self.checkpointer = MAECheckpointer(
            self._trainer.model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self)
        )
        for h in self._hooks:
            if isinstance(h, hooks.PeriodicCheckpointer):
                h.checkpointer = self.checkpointer
        if cfg.MODEL.ROI_BOX_HEAD.USE_FED_LOSS:  # the training set is read: its frequencies
            counts = class_image_counts(cfg.DATASETS.TRAIN, cfg.MODEL.ROI_HEADS.NUM_CLASSES)
            set_fed_loss_frequencies(self._trainer.model, counts)

    def _precision_trainer(self, cfg, dtype: Optional[torch.dtype]) -> SimpleTrainer:
        """SOLVER.AMP resolved (:func:`amp_dtype`): fp32 -> SimpleTrainer, bf16 / fp16 ->
        PrecisionAMPTrainer on MODEL.DEVICE's type (detectron2 0.6 knows CUDA fp16 only)."""
        t = self._trainer
        if dtype is None and type(t) is SimpleTrainer:
            return t
        if dtype is None:
            return SimpleTrainer(t.model, t.data_loader, t.optimizer)
        device_type = torch.device(cfg.MODEL.DEVICE).type
        return PrecisionAMPTrainer(t.model, t.data_loader, t.optimizer, dtype, device_type)

    def resume_or_load(self, resume: bool = True) -> None:
        """detectron2's, except that a checkpoint of OUTPUT_DIR that ``resume`` continues from
        must fill the whole detector (:class:`MAECheckpointer`'s ``whole_model``): resumed
        under another config (NUM_CLASSES, an FPN width, MODEL.VIT.*), detectron2 skipped each
        tensor of another shape with a warning and trained it from scratch at the resumed
        iteration, writing over the run's model_final.pth at the end."""
        self.checkpointer.whole_model = resume and self.checkpointer.has_checkpoint()
        try:
            super().resume_or_load(resume)
        finally:
            self.checkpointer.whole_model = False

    def state_dict(self):
        """Iteration, hooks (lr scheduler), the inner trainer's optimizer and loss scaler (the
        registry's detectron2 0.6 saves no optimizer state; newer releases save it this way)
        and the data order's seed."""
        ret = TrainerBase.state_dict(self)
        ret["_trainer"] = self._trainer.state_dict()
        loader = self._trainer.data_loader
        sampler = train_sampler(loader)
        if sampler is not None:
            ret["data_order"] = {"seed": sampler._seed, "workers": batching_workers(loader)}
        return ret

    def load_state_dict(self, state_dict):
        TrainerBase.load_state_dict(self, state_dict)
        self._continue_data_order(state_dict)
        if "_trainer" not in state_dict:
            logger.warning("the checkpoint holds no optimizer state: AdamW moments start afresh")
            return
        with keep_optimizer_impl(self.optimizer):
            self._trainer.load_state_dict(state_dict["_trainer"])

    def _continue_data_order(self, state_dict) -> None:
        """Resuming: the training images continue in the checkpointed run's order, after the
        (iteration + 1) x SOLVER.IMS_PER_BATCH images its iterations drew, whatever the number
        of processes now. Without aspect-ratio grouping each of W loader workers makes whole
        batches (detectron2 0.6: from every W-th image; later releases: from W-th chunks of a
        batch): the run continues after the last full round of workers and drops the batches
        of the round's workers that the checkpoint had trained, so that the batches are those
        of the uninterrupted run too (with the same number of workers; with another, as many
        images as were drawn are skipped). Not exact to the image: images waiting in an
        aspect-ratio group's unfinished batch are not drawn again."""
        t = self._trainer
        sampler = train_sampler(t.data_loader)
        order = state_dict.get("data_order")
        if sampler is None:
            return
        if order is None:
            logger.warning(
                "the checkpoint does not record its data order (an older one): the training "
                "images start a new order"
            )
            return
        done = state_dict["iteration"] + 1  # batches drawn
        workers = batching_workers(t.data_loader)
        trained = done % workers if order.get("workers", 1) == workers else 0  # of this round
        sampler._seed = int(order["seed"])
        sampler.skip = (done - trained) * self.cfg.SOLVER.IMS_PER_BATCH
        # its iterator, made from the old start, is made again
        if isinstance(getattr(type(t), "_data_loader_iter", None), property):
            t._data_loader_iter_obj = None  # newer detectron2: made when first read
        else:
            t._data_loader_iter = iter(t.data_loader)
        for _ in range(trained):
            next(t._data_loader_iter)

    def train(self):
        """Trains, then returns the final evaluation results (detectron2 0.6 returns None)."""
        super().train()
        return getattr(self, "_last_eval_results", None)

    def build_hooks(self):
        """detectron2's, and with TEST.AUG.ENABLED an evaluation with test-time augmentation
        after training (detectron2's tools/train_net.py), its results added to train()'s."""
        ret = super().build_hooks()
        if not (self.cfg.TEST.AUG.ENABLED and self.cfg.DATASETS.TEST):
            return ret

        def test_with_tta_and_save():
            results = self.test_with_TTA(self.cfg, self.model)
            self._last_eval_results = {
                **(getattr(self, "_last_eval_results", None) or {}),
                **results,
            }
            return results

        last_eval = max(i for i, h in enumerate(ret) if isinstance(h, hooks.EvalHook))
        ret.insert(last_eval + 1, hooks.EvalHook(0, test_with_tta_and_save))  # before the writers
        return ret

    @classmethod
    def test_with_TTA(cls, cfg, model):
        """Evaluation with test-time augmentation (TEST.AUG), results under names ending in
        ``_TTA`` (:func:`mae_transfer.detection.tta.evaluate_with_tta`)."""
        from .tta import evaluate_with_tta

        return evaluate_with_tta(cls, cfg, model)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_train_loader(cls, cfg):
        # the arguments detectron2's own loader reads them with; checked before training
        try:
            dicts = get_detection_dataset_dicts(
                cfg.DATASETS.TRAIN,
                filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
                min_keypoints=cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE
                if cfg.MODEL.KEYPOINT_ON
                else 0,
                proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN
                if cfg.MODEL.LOAD_PROPOSALS
                else None,
            )
        except AssertionError as e:  # detectron2's "No valid data found in ..."
            if "No valid data" not in str(e):
                raise
            raise ConfigError(
                f"DATASETS.TRAIN ({', '.join(cfg.DATASETS.TRAIN)}) has no image with an "
                "annotation (DATALOADER.FILTER_EMPTY_ANNOTATIONS leaves out those without)"
            ) from e
        except ValueError as e:  # detectron2's "Datasets have different metadata ..."
            if "different metadata" not in str(e):
                raise
            lists = "; ".join(f"{n}: {categories(n)}" for n in cfg.DATASETS.TRAIN)
            raise ConfigError(
                f"the training sets list different categories (id: name), which detectron2 "
                f"cannot train together: {lists}. Give their files one category list (the "
                "same ids and names, in the same order)"
            ) from e
        check_train_masks(cfg, dicts)
        if cfg.MODEL.ROI_BOX_HEAD.USE_FED_LOSS:
            note_training_counts(cfg.DATASETS.TRAIN, dicts, cfg.MODEL.ROI_HEADS.NUM_CLASSES)
        sampler = build_sampler(cfg, dicts)  # None: detectron2 builds it
        mapper = build_mapper(cfg, True)
        return build_detection_train_loader(cfg, mapper=mapper, dataset=dicts, sampler=sampler)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(cfg, dataset_name, mapper=build_mapper(cfg, False))

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if output_folder is None:  # several test sets: a folder each (the same file name)
            several = len(cfg.DATASETS.TEST) > 1
            output_folder = (
                os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
                if several
                else cfg.OUTPUT_DIR
            )
        if is_lvis(dataset_name):  # AP at LVIS's 300 detections per image; APr / APc / APf
            return LVISEvaluator(
                dataset_name,
                tasks=eval_tasks(cfg, dataset_name),
                output_dir=output_folder,
                max_dets_per_image=LVIS_MAX_DETS,
            )
        return COCOEvaluator(
            dataset_name,
            tasks=eval_tasks(cfg, dataset_name),  # given: even with no detections
            output_dir=output_folder,
            use_fast_impl=HAS_COMPILED_OPS,
        )


def summarize(results: Dict) -> Dict[str, float]:
    """{'bbox_AP': .., 'bbox_AP50': .., 'segm_AP': .., ...} from COCOEvaluator results (and
    'bbox_APr' / 'APc' / 'APf', rare, common, frequent classes, from LVISEvaluator's); with
    several test sets (detectron2 then returns {name: results}) each key is prefixed by the
    set's name: {'setA/bbox_AP': .., 'setB/bbox_AP': .., ...}. Results of test-time
    augmentation (``bbox_TTA``, or ``setA_TTA``) give keys ending in ``_TTA``: 'bbox_AP_TTA'."""
    tasks = ("bbox", "segm")
    several = not any(_untagged(k)[0] in tasks for k in results)
    out = {}
    for name, dataset_results in results.items() if several else [("", results)]:
        name, tag = _untagged(name)
        for task_name, task_results in dataset_results.items():
            task, task_tag = _untagged(task_name)
            for k in ("AP", "AP50", "AP75", "APr", "APc", "APf") if task in tasks else ():
                if k in task_results:
                    key = f"{name}/{task}_{k}" if several else f"{task}_{k}"
                    out[key + (tag or task_tag)] = float(task_results[k])
    return out


def _untagged(key: str):
    """('bbox', '_TTA') for 'bbox_TTA'; (key, '') for a key without the suffix."""
    if key.endswith("_TTA"):
        return key[: -len("_TTA")], "_TTA"
    return key, ""
