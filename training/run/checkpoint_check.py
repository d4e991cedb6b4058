"""Which checkpoint ``--resume`` may trust: ``last.ckpt`` if it is whole and ours, else the one
it replaced (``previous.ckpt``, kept beside it while a run trains: ``AtomicCheckpointIO``).

A checkpoint is trusted only once it is read back: a torch zip archive, loaded with
``weights_only=True`` where its contents allow, holding a dict with the keys Lightning writes for
this trainer and an integer ``global_step``. Random bytes, a truncated file, a pickle that is not
a dict or a dict of someone else's are each named with their cause, never passed to Lightning
(whose errors advise about ``weights_only`` or raise ``AttributeError``).

A sharded checkpoint (``--strategy fsdp``: a directory, ``training.run.sharded_checkpoint``) is
trusted once its ``meta.pt`` passes the same checks (less the weights and optimizer state, which
live in the shards) and every shard file DCP's index names is there, whole.
"""

from __future__ import annotations

import logging
import pickle
import zipfile
from pathlib import Path

import torch

from training.base.errors import RunError
from training.run.callbacks import PREVIOUS_NAME, read_checkpoint
from training.run.sharded_checkpoint import META_NAME, is_sharded_checkpoint, missing_shards

log = logging.getLogger(__name__)

LAST_NAME = "last.ckpt"
# What Lightning writes into every checkpoint of a run (``DPOModule`` adds ``dpo_run``, absent
# from checkpoints written before it existed).
REQUIRED_KEYS = ("state_dict", "global_step", "loops", "optimizer_states")
# A sharded checkpoint's meta.pt: the weights and optimizer state are in the shards.
SHARDED_REQUIRED_KEYS = ("global_step", "loops")


class BadCheckpoint(ValueError):
    """A checkpoint file that cannot be trusted; the message is the cause alone."""


def _load(path: Path) -> object:
    """The file's contents: with ``weights_only=True``, or (the file holds objects of other
    classes, e.g. random-number states) as ``read_checkpoint`` reads it."""
    size = path.stat().st_size
    if size == 0:
        raise BadCheckpoint("empty file (0 bytes)")
    if not zipfile.is_zipfile(path):
        raise BadCheckpoint(f"not a PyTorch checkpoint, or a truncated one ({size} bytes)")
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError:
        pass  # readable, but holds classes the safe loader refuses: this run's own file
    except Exception as err:
        raise BadCheckpoint(f"damaged ({_first_line(err)})") from err
    try:
        return read_checkpoint(path)
    except Exception as err:
        raise BadCheckpoint(f"damaged ({_first_line(err)})") from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0].split(". ")[0][:200] if text else type(err).__name__


def verify_checkpoint(path: Path) -> dict:
    """The checkpoint at ``path`` once it is checked readable and ours (for a sharded one, its
    ``meta.pt``); ``BadCheckpoint`` (the cause) if not, ``OSError`` if it cannot be opened."""
    path = Path(path)
    if is_sharded_checkpoint(path):
        return _verify_sharded(path)
    checkpoint = _checked_dict(_load(path), REQUIRED_KEYS)
    if not isinstance(checkpoint["state_dict"], dict):
        raise BadCheckpoint("its state_dict is not a dict")
    return checkpoint


def _checked_dict(checkpoint: object, required: tuple[str, ...]) -> dict:
    """``checkpoint`` once it is a dict with the ``required`` keys and a step count."""
    if not isinstance(checkpoint, dict):
        raise BadCheckpoint(f"holds a {type(checkpoint).__name__}, not a checkpoint's dict")
    missing = [k for k in required if k not in checkpoint]
    if missing:
        raise BadCheckpoint(f"not a checkpoint of this trainer (no {', '.join(missing)})")
    step = checkpoint["global_step"]
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise BadCheckpoint(f"global_step is {step!r}, not a step count")
    return checkpoint


def _verify_sharded(path: Path) -> dict:
    """A sharded checkpoint's ``meta.pt`` once it and every shard DCP's index names check."""
    if not (path / META_NAME).is_file():
        raise BadCheckpoint(f"a directory without {META_NAME}: not a sharded checkpoint of ours")
    meta = _checked_dict(_load(path / META_NAME), SHARDED_REQUIRED_KEYS)
    try:
        missing = missing_shards(path)
    except FileNotFoundError as err:
        raise BadCheckpoint("no shard index (.metadata): not a whole sharded checkpoint") from err
    except Exception as err:
        raise BadCheckpoint(f"its shard index is damaged ({_first_line(err)})") from err
    if missing:
        raise BadCheckpoint(f"shard file(s) missing or truncated: {', '.join(missing)}")
    return meta


def _problem(path: Path) -> tuple[dict | None, str]:
    """(the verified checkpoint, "") or (None, why it cannot be used)."""
    if not path.exists():
        return None, "no such file"
    try:
        return verify_checkpoint(path), ""
    except BadCheckpoint as err:
        return None, str(err)
    except OSError as err:
        return None, (err.strerror or str(err)).lower()


def choose_checkpoint(folder: Path) -> tuple[Path, dict] | None:
    """The checkpoint in ``folder`` a resume starts from, with its contents: ``last.ckpt``, or
    ``previous.ckpt`` with a note naming both when the last cannot be used. None when neither
    file exists; a ``RunError`` naming the file(s) and the cause when none can be used."""
    last, previous = folder / LAST_NAME, folder / PREVIOUS_NAME
    if not last.exists() and not previous.exists():
        return None
    checkpoint, last_problem = _problem(last)
    if checkpoint is not None:
        return last, checkpoint
    if not previous.exists():
        raise RunError(
            f"--resume: {last}: {last_problem}; no {PREVIOUS_NAME} beside it to fall back to. "
            "Start again without --resume, or into another --output-dir."
        )
    checkpoint, previous_problem = _problem(previous)
    if checkpoint is None:
        raise RunError(
            f"--resume: {last}: {last_problem}; {previous}: {previous_problem}; no intact "
            "checkpoint to resume from. Start again without --resume, or into another --output-dir."
        )
    log.warning(
        "--resume: %s: %s; resuming from %s (step %d), the checkpoint it replaced",
        last,
        last_problem,
        previous,
        checkpoint["global_step"],
    )
    return previous, checkpoint
