"""The run's ``logs/metrics.csv``: every trained step on disk, across kills and ``--resume``.

Lightning's ``CSVLogger`` deletes an existing ``metrics.csv`` when a run starts in the same
directory, and rewrites the file in place when a new column appears: a resumed run that dies
would lose the interrupted run's steps. ``StepCSVLogger`` writes the same file differently:

- a resumed run starts from the rows already on disk (and the row its checkpoint carries, for a
  step killed between the checkpoint and the row's write: ``DPOModule.on_save_checkpoint``);
- a step the resumed run logs again replaces the earlier row of that step, and an earlier row
  stays in the file until then, so a run killed any number of times never loses a step;
- every change that is not a plain append (a new column, a replaced row) rewrites the file
  through a temporary file and a rename, so a kill leaves the old file or the new one.

A fresh run (no ``--resume``) replaces an old file with its own rows at its first write.

Steps are trl's count (``training.base.step_count``): the row of the k-th optimizer step, and the
held-out pass after it, are step k (the first is 1), as in every logger ``--report-to`` names. A
file written before this count (from 0, Lightning's index) is renumbered when it is resumed
(``training.run.resume``), never mixed with the new count.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from training.base.errors import replaced_atomically, write_failure
from training.base.step_count import step_of, trl_step


def read_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a metrics file as written (strings), or [] when there is none; torn rows
    dropped (``read_rows_checked``)."""
    return read_rows_checked(path)[0]


def read_rows_checked(path: Path) -> tuple[list[dict[str, str]], list[str]]:
    """(the whole rows of a metrics file, a note per row dropped as torn). A kill mid-append
    leaves a last line without its line end: it is dropped even when every field parses (a step
    field cut short, ``12`` -> ``1``, would duplicate step 1). So is a row with fewer or more
    fields than the header, or without a step. ``UnicodeDecodeError`` for a file that is not
    text."""
    if not Path(path).is_file():
        return [], []
    text = Path(path).read_bytes().decode("utf-8")
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    notes = []
    if rows and not text.endswith("\n"):
        rows.pop()
        notes.append("a torn last row (no line end: a write cut short)")
    whole = [r for r in rows if None not in r.values() and None not in r and _has_step(r)]
    if len(whole) < len(rows):
        notes.append(f"{len(rows) - len(whole)} row(s) with missing fields or no step")
    return whole, notes


def _has_step(row: dict) -> bool:
    try:
        step_of(row)
    except (KeyError, TypeError, ValueError):
        return False
    return True


def merge_rows(earlier: list[dict], current: list[dict]) -> list[dict]:
    """``earlier``'s rows at steps ``current`` does not log, and ``current``'s rows, in step
    order (a step's own rows keep their order): a redone step's new rows win."""
    redone = {step_of(r) for r in current}
    kept = [r for r in earlier if step_of(r) not in redone]
    return sorted(kept + current, key=step_of)


def write_rows(path: Path, rows: list[dict], fields: list[str]) -> None:
    """Write ``rows`` under the header ``fields`` to ``path`` through a temporary file and a
    rename (atomic on POSIX)."""
    with replaced_atomically(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
        f.flush()
        os.fsync(f.fileno())


def restore_earlier_rows(path: Path, earlier: list[dict[str, str]]) -> int:
    """Rewrite ``path`` as ``merge_rows(earlier, its rows)``; the header is the union of both.
    Returns how many earlier rows were put back (0: the file is left alone)."""
    current = read_rows(path)
    merged = merge_rows([r for r in earlier if _has_step(r)], current)
    added = len(merged) - len(current)
    if added:
        write_rows(path, merged, sorted({k for r in merged for k in r}))
    return added


class MergingWriter(ExperimentWriter):
    """Lightning's experiment writer, with the file kept whole as the module docstring says.

    ``earlier``: the rows a resumed run continues (None: a fresh run, which replaces the file).
    """

    def __init__(self, log_dir: str, earlier: list[dict] | None) -> None:
        self._earlier = earlier
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        # Lightning deletes metrics.csv here; this writer keeps it until it writes a new one.
        self.logged: list[dict] = []  # every row this run logged, in order
        self.on_disk_earlier = list(self._earlier or [])  # earlier rows now in the file
        # The first save rewrites the file: a fresh run replaces another run's file, a resumed
        # one puts back the row its checkpoint carried.
        self.stale_file = True
        self.header: list[str] = sorted({k for r in self.on_disk_earlier for k in r})
        self.metrics_keys = list(self.header)

    def save(self) -> None:
        """Write the rows logged since the last save: appended when that keeps the file in step
        order under the same header, else the whole file rewritten atomically."""
        if not self.metrics:
            return
        self._record_new_keys()
        rows, self.metrics = self.metrics, []
        self.logged.extend(rows)
        first = min(step_of(r) for r in self.logged)
        path = Path(self.metrics_file_path)
        must_rewrite = (
            self.stale_file
            or not path.is_file()
            or self.metrics_keys != self.header
            or any(step_of(r) >= first for r in self.on_disk_earlier)
        )
        try:
            if must_rewrite:
                self._rewrite(path)
            else:
                with open(path, "a", newline="") as f:
                    csv.DictWriter(f, fieldnames=self.header).writerows(rows)
        except OSError as err:  # a full disk: the file keeps every row written before
            raise write_failure(path, err, "writing the metrics") from err

    def _rewrite(self, path: Path) -> None:
        """Write the earlier rows not redone and this run's rows, atomically."""
        merged = merge_rows(self.on_disk_earlier, self.logged)
        redone = {step_of(r) for r in self.logged}
        write_rows(path, merged, self.metrics_keys)
        self.on_disk_earlier = [r for r in self.on_disk_earlier if step_of(r) not in redone]
        self.header = list(self.metrics_keys)
        self.stale_file = False


class StepCSVLogger(CSVLogger):
    """``CSVLogger`` writing ``<save_dir>/<name>/metrics.csv`` with ``MergingWriter``, flushed
    every step. ``earlier``: the rows a resumed run continues (None for a fresh run)."""

    def __init__(self, save_dir: str, name: str, earlier: list[dict] | None = None) -> None:
        super().__init__(save_dir=save_dir, name=name, version="", flush_logs_every_n_steps=1)
        self._earlier_rows = earlier

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Lightning's row at trl's step (``trl_step``)."""
        super().log_metrics(metrics, trl_step(step))

    @property
    @rank_zero_experiment
    def experiment(self) -> MergingWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = MergingWriter(self.log_dir, self._earlier_rows)
        return self._experiment
