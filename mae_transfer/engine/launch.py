"""Running a protocol: logging set-up, validation, devices and process group, the trainer.

The entry points (``python -m pretrain``, ``tools/finetune.py``, ``tools/linprobe.py``) are a
config class, a ``validate`` function and an :class:`EpochTrainer` subclass handed to
:func:`run_training`, and :func:`exit_code` around it. The drawing tools share
:func:`picture_path`.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Type

from mae_transfer.checkpoint import CheckpointError
from mae_transfer.device import resolve_device

from .config import ConfigError, TrainConfig, file_in_the_way
from .distributed import cleanup, init_distributed, own_device
from .trainer import EpochTrainer, NonFiniteLossError

logger = logging.getLogger(__name__)


def setup_logging(rank: int = 0) -> None:
    """INFO on rank 0, warnings only elsewhere (64 ranks repeating every line helps nobody)."""
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(
        level=level, format="[%(asctime)s %(name)s] %(message)s", datefmt="%H:%M:%S", force=True
    )


def run_training(
    cfg: TrainConfig,
    validate: Callable[[TrainConfig], None],
    trainer_cls: Type[EpochTrainer],
    finish: Optional[Callable[[EpochTrainer], None]] = None,
) -> Dict[str, float]:
    """Validates ``cfg`` (before anything is built), joins the process group when launched by
    torchrun / srun, trains, then calls ``finish(trainer)`` on rank 0; returns the last stats."""
    validate(cfg)
    device = resolve_device(cfg.device)
    info = init_distributed(device.type, cfg.dist_url)
    device = own_device(device, info)
    setup_logging(info.rank)
    try:
        trainer = trainer_cls(cfg, device, info)
        stats = trainer.train()
        trainer.close()
        if info.is_main and finish is not None:
            finish(trainer)
        return stats
    finally:
        cleanup(info)


# what an interrupted run of the engine's trainers does next (auto_resume is on by default)
RESUME_HINT = "the same command continues from the last checkpoint in its output_dir"


def exit_code(fn: Callable[[], object], log: logging.Logger = logger, resume: str = "") -> int:
    """Runs a CLI body: 0 when it returns, 2 for a bad config or a checkpoint that does not fit
    the model, 1 for a non-finite stop, 130 for Ctrl-C (said in one line, with ``resume``: how
    a training tool continues, instead of a traceback)."""
    try:
        fn()
    except (ConfigError, CheckpointError) as e:
        log.error("%s", e)
        return 2
    except NonFiniteLossError as e:
        log.error("%s", e)
        return 1
    except KeyboardInterrupt:
        log.warning("interrupted%s", f": {resume}" if resume else "")
        return 130
    return 0


def picture_path(output: str, name: str, suffixes: Optional[Iterable[str]] = None) -> str:
    """The PNG a drawing tool writes for ``--output``: ``name`` inside it when it is a folder
    (or ends with a slash: one to make), ``.png`` added when it has no suffix its writer knows
    (PIL refused 'x.v1' and matplotlib 'recon_mask0.9' once the model had run; without a
    suffix PIL refused the name and matplotlib added one unsaid). Its folder is made now, not
    found missing once the model has run.

    Args:
        suffixes: those the writer takes ('.pdf', ...; lower case); None: PIL's.

    Raises:
        ConfigError: the folder cannot be made.
    """
    if suffixes is None:
        from PIL import Image

        suffixes = {e for e, f in Image.registered_extensions().items() if f in Image.SAVE}
    path = output
    if os.path.isdir(path) or path.endswith(("/", os.sep)):  # a folder (perhaps still to make)
        path = os.path.join(path, name)
    elif os.path.splitext(path)[1].lower() not in set(suffixes):
        path += ".png"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--output {output}: cannot make its folder: {e}") from e
    return path


def pick_images(
    listed: Sequence[str], num: int, log: logging.Logger, say_beyond: bool = True
) -> List[str]:
    """The first ``num`` of ``listed`` that can be read, for a drawing tool: those skipped on
    the way (a text file, a truncated image) said in one warning, and (``say_beyond``: the
    user listed them) the images beyond ``num`` said too, before the model is built (a bad
    file was a traceback after it ran).

    Raises:
        ConfigError: none of them can be read.
    """
    from mae_transfer.data.folder import readable_images

    paths, skipped = readable_images(listed, num)
    if skipped:
        path, error = skipped[0]
        log.warning("skipped %d unreadable file(s), e.g. %s: %s", len(skipped), path, error)
    if not paths:
        raise ConfigError(f"none of the {len(skipped)} images can be read (above)")
    if say_beyond and len(listed) > num:
        log.warning(
            "%d images given: drawing the first %d that can be read (--num %d)",
            len(listed),
            len(paths),
            num,
        )
    return paths


def refuse_folder(output: str, what: str, example: str) -> None:
    """A file to write named by ``output`` (the flag ``what``) must not be a folder, existing
    or still to make (a trailing slash), nor lie where a file keeps its folder from being
    made: checked before the work, which failed at its end.

    Raises:
        ConfigError: naming the flag (and an ``example`` file name, or the file in the way).
    """
    if os.path.isdir(output) or output.endswith(("/", os.sep)):
        raise ConfigError(f"{what} {output} names a folder: name the file (e.g. {example})")
    blocked = file_in_the_way(os.path.dirname(os.path.abspath(output)))
    if blocked:
        raise ConfigError(f"{what} {output}: its folder cannot be made, {blocked} is a file")
