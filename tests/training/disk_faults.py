"""Shared by the catalogue tests of damaged files and full disks: a one-line failure, no
temporary file left, and full disks (a real small tmpfs as root, simulated otherwise)."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
from pathlib import Path

from training.fit import main


def fails(argv: list[str], capsys) -> str:
    """Run ``main(argv)``; assert exit code 1 and a one-line error without traceback."""
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    return errors[0]


def no_temporaries(folder: Path) -> None:
    left = [p for p in Path(folder).rglob("*") if p.name.endswith(".tmp")]
    assert left == [], left


def filled(folder: Path, pages_left: int = 0) -> None:
    """Fill the file system of ``folder`` up, then free ``pages_left`` pages of 4 KiB."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 4096)
    size = filler.stat().st_size
    os.truncate(filler, max(0, size - size % 4096 - 4096 * pages_left))


@contextlib.contextmanager
def small_tmpfs(folder: Path, size: str):
    """A real tmpfs of ``size`` mounted at ``folder`` while the block runs (as root); yields
    False where it cannot be mounted (not root, no permission): the caller simulates."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or not shutil.which("mount"):
        yield False
        return
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
        capture_output=True,
    )
    if done.returncode != 0:
        yield False
        return
    try:
        yield True
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def no_space(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


class FullFile:
    """A file opened for writing on a disk that fills up after 100 bytes."""

    def __init__(self, path, mode="r", *args, **kwargs):
        self.file = open(path, mode, *args, **kwargs)  # noqa: SIM115 - closed by __exit__

    def __enter__(self):
        return self

    def __exit__(self, *_exc):
        self.file.close()

    def write(self, data) -> int:
        self.file.write(bytes(data[:100]))
        no_space()
