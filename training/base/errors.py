"""Failures a user can fix, and how ``python -m training.fit`` reports them.

A ``RunError``'s message names the path and the cause (``--model /x: no such file or
directory``); ``main`` prints it as one ``error:`` line and exits with code 1, without a
traceback. ``--debug`` (or ``DPO_DEBUG=1``) lets the exception through, traceback and all.

Operating-system errors (a read-only directory, a full disk) are turned into the same kind of
line by ``describe_os_error``; a write that ran out of space says "no space left on device",
whatever layer (Python, torch's zip writer, safetensors) raised it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from pathlib import Path

from dpo_core.rows import DataError


class RunError(Exception):
    """A failure with a message for the user: which path, and why."""


def debug_requested(flag: bool = False) -> bool:
    """``--debug`` or ``DPO_DEBUG=1``: show full tracebacks instead of one-line errors."""
    return flag or os.environ.get("DPO_DEBUG", "").lower() in {"1", "true", "yes"}


# What torch's zip writer (``inline_container.cc``) and safetensors say when a write fails;
# the operating system's "No space left on device" is errno ENOSPC.
_NO_SPACE_TEXTS = ("no space left on device", "storagefull", "os error 28")


def is_no_space(err: BaseException) -> bool:
    """Whether ``err`` (or an exception it was raised from) is a disk-full write."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            return True
        if any(text in str(err).lower() for text in _NO_SPACE_TEXTS):
            return True
        err = err.__cause__ or err.__context__
    return False


def describe_os_error(err: OSError, what: str = "") -> str:
    """``<path>: <cause>`` for an operating-system error, with "no space left on device" for a
    full disk and "permission denied" for a read-only place; ``what`` says what was being done."""
    path = err.filename or ""
    if is_no_space(err):
        cause = "no space left on device"
    else:
        cause = (err.strerror or str(err)).lower()
    doing = f" ({what})" if what else ""
    return f"{path}: {cause}{doing}" if path else f"{cause}{doing}"


def write_failure(path: Path, err: BaseException, what: str) -> RunError:
    """A ``RunError`` for a failed write of ``path``: "no space left on device" when the disk is
    full, else the error's own first line."""
    if is_no_space(err):
        cause = "no space left on device"
    elif isinstance(err, OSError) and err.strerror:
        cause = err.strerror.lower()
    else:
        cause = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return RunError(f"{path}: {cause} while {what}")


def report_failure(err: BaseException, debug: bool = False) -> int:
    """What an entry point does with a failure: print it as one ``error:`` line and return the
    exit status 1, or re-raise it (its traceback shown) when it is unexpected or ``--debug`` /
    ``DPO_DEBUG=1`` asks for the traceback."""
    message = None if debug_requested(debug) else user_message(err)
    if message is None:
        raise err
    print(f"error: {message}", file=sys.stderr)
    return 1


def user_message(err: BaseException) -> str | None:
    """The one-line message an entry point prints for a failure the user can act on, or None for
    an unexpected one (whose traceback is then shown)."""
    if isinstance(err, RunError | DataError | FloatingPointError):
        return str(err)
    if isinstance(err, OSError):
        return describe_os_error(err) if err.errno else str(err)
    if isinstance(err, ValueError):
        return str(err)
    if is_no_space(err):
        return f"no space left on device ({str(err).strip().splitlines()[0]})"
    return None


@contextlib.contextmanager
def replaced_atomically(path: Path):
    """Yield a temporary path beside ``path``; when the block ends, rename it over ``path``
    (atomic on POSIX within one file system); when the block or the rename raises (a full
    disk, Ctrl-C), remove it: the old file stays whole and no temporary is left behind."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def writing(path: Path, what: str):
    """Turn an operating-system error raised while ``path`` is written into ``write_failure``'s
    ``RunError`` naming ``path``: a full disk reported by ``close()`` or ``flush()`` carries no
    file name of its own."""
    try:
        yield
    except OSError as err:
        raise write_failure(path, err, what) from err
