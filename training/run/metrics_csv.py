"""The run's ``logs/metrics.csv`` across ``--resume``.

Lightning's ``CSVLogger`` deletes an existing ``metrics.csv`` when a new run starts in the same
directory, so a resumed run would keep only the steps it trained itself. ``fit`` reads the
interrupted run's rows first and, after training, puts back those from steps before the first
step the resumed run logged (they are the steps it did not redo), so the file covers the whole
run. The logger flushes every step, so the interrupted run's file holds every step it finished.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path


def read_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a metrics file as written (strings), or [] when there is none."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _step(row: dict[str, str]) -> int:
    return int(float(row["step"]))


def restore_earlier_rows(path: Path, earlier: list[dict[str, str]]) -> int:
    """Rewrite ``path`` as ``earlier``'s rows from before its first logged step, then its own
    rows; the header is the union of both. Returns how many earlier rows were put back."""
    current = read_rows(path)
    first = min((_step(r) for r in current if r.get("step")), default=None)
    kept = [r for r in earlier if r.get("step") and (first is None or _step(r) < first)]
    if not kept:
        return 0
    fields = sorted({k for r in kept + current for k in r})
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(kept + current)
    os.replace(tmp, path)
    return len(kept)
