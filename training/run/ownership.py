"""An output directory belongs to one run.

- While a run writes ``--output-dir`` it holds ``<output-dir>/run.lock`` (its pid and host); a
  second run into the same directory is refused, naming the holder. A lock whose process is gone
  (same host, pid not running: a run killed with SIGKILL) is taken over, with a note.
- A fresh run (no ``--resume``) into a directory that holds another run's checkpoints or model
  is refused unless ``--overwrite-output-dir``, which removes them first: Lightning then never
  writes ``last-v1.ckpt`` beside an old ``last.ckpt`` for a later ``--resume`` to confuse.

Only the first process of a multi-process run takes the lock (the others write no outputs).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

from training.base.config import FitConfig
from training.base.errors import RunError

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
# What a finished or stopped run leaves that a fresh run would mix with its own.
RUN_OUTPUTS = ("checkpoints", "model", "model-merged")


def is_first_process() -> bool:
    """Whether this is global rank zero, from the launcher's variables (Lightning, torchrun,
    SLURM), before Lightning has started."""
    names = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")
    return all(os.environ.get(name, "0") in ("", "0") for name in names)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _read_holder(lock: Path) -> tuple[int | None, str]:
    """(pid, host) written in ``lock``; (None, "") if it cannot be read."""
    try:
        fields = dict(part.split("=", 1) for part in lock.read_text().split() if "=" in part)
        return int(fields["pid"]), fields.get("host", "")
    except (OSError, ValueError, KeyError):
        return None, ""


def _create(lock: Path) -> bool:
    """Create ``lock`` holding this process's pid and host; False if it exists."""
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(f"pid={os.getpid()} host={socket.gethostname()}\n")
    return True


def acquire(out: Path) -> Path:
    """Take ``<out>/run.lock``; a ``RunError`` naming the holder if a live run has it."""
    lock = out / LOCK_NAME
    if _create(lock):
        return lock
    pid, host = _read_holder(lock)
    here = socket.gethostname()
    if pid is not None and host == here and not _alive(pid):
        log.warning(
            "note: %s was left by process %d on %s, which has ended; taken over", lock, pid, host
        )
        lock.unlink(missing_ok=True)
        if _create(lock):
            return lock
        pid, host = _read_holder(lock)  # another run took it in between
    holder = f"process {pid} on {host or 'an unknown host'}" if pid else "another run"
    raise RunError(
        f"--output-dir {out}: in use by {holder} (lock {lock}); wait for it to end, or use "
        f"another --output-dir (remove the lock only if no run is writing there)"
    )


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold ``<out>/run.lock`` for the block (first process only)."""
    if not is_first_process():
        yield
        return
    lock = acquire(out)
    try:
        yield
    finally:
        if _read_holder(lock)[0] == os.getpid():
            lock.unlink(missing_ok=True)


def earlier_run(out: Path) -> list[str]:
    """What an earlier run left in ``out`` that a fresh run must not mix with its own."""
    found = []
    for name in RUN_OUTPUTS:
        folder = out / name
        if folder.is_dir() and any(folder.iterdir()):
            found.append(f"{name}/")
    return found


def claim_output_dir(cfg: FitConfig) -> None:
    """Refuse a fresh run into another run's directory unless ``--overwrite-output-dir``, which
    removes that run's checkpoints and model first. A ``--resume`` continues what is there."""
    out = Path(cfg.trainer.output_dir)
    found = earlier_run(out)
    if cfg.trainer.resume or not found or not is_first_process():
        return
    if not cfg.trainer.overwrite_output_dir:
        raise RunError(
            f"--output-dir {out} holds another run ({', '.join(found)}): pass --resume to "
            "continue it, --overwrite-output-dir to replace it, or another --output-dir"
        )
    for name in RUN_OUTPUTS:
        shutil.rmtree(out / name, ignore_errors=True)
    log.warning("--overwrite-output-dir: removed %s from %s", ", ".join(found), out)
