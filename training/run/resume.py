"""``--resume``: continue the run in ``checkpoints/last.ckpt`` only if it is the same run.

Every checkpoint carries the run record it was trained under (``DPOModule.on_save_checkpoint``):
the resolved config, and a fingerprint of the data (each file's identity, and the count and
SHA-256 of the rows read, train and held-out). A resume compares them with its own and refuses,
naming every field that differs, unless ``--resume-allow-changes`` is given: then the run goes
on with the new settings (its new optimizer settings replace the restored ones), config.yaml
records the changes and metrics.csv a ``resume_changes`` column. Fields that do not change what
is trained (where outputs go, whether to evaluate, how to sample the evaluation) are not
compared.

The checkpoint is read back first (``training.run.checkpoint_check``): a damaged or foreign
``last.ckpt`` falls back to the ``previous.ckpt`` it replaced, with a note. The earlier metrics
rows are read without a torn last row (``metrics_csv.read_rows_checked``). A metrics.csv or a
checkpoint's row written before metrics.csv took trl's step count (from 0, Lightning's index) is
renumbered from 1, with a warning (``in_trl_count``, ``carried_row``): the two counts never mix.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from training.base.config import FitConfig
from training.base.errors import RunError, writing
from training.base.step_count import counts_from_zero, renumbered_from_one, step_of
from training.run.checkpoint_check import LAST_NAME, choose_checkpoint
from training.run.metrics_csv import merge_rows, read_rows_checked, write_rows
from training.run.sharded_checkpoint import check_resumable
from training.run.sharding import is_sharded

log = logging.getLogger(__name__)

# Fields a resume may change freely: they do not touch the weights, the data or the schedule.
NOT_COMPARED = {
    "trainer.resume",
    "trainer.resume_allow_changes",
    "trainer.overwrite_output_dir",
    "trainer.output_dir",
    "trainer.save_every_n_steps",
    "trainer.num_workers",
    "trainer.threads",
    "trainer.evaluate",
    "trainer.report_to",
    "trainer.logging_steps",
    "trainer.run_name",
    "data.dataset_num_proc",
    "data.dataset_cache_dir",
}
NOT_COMPARED_GROUPS = ("eval.",)


def comparable_config(cfg: FitConfig) -> dict[str, object]:
    """The resolved config as ``group.field -> value``, less the fields not compared."""
    flat = {
        f"{group}.{name}": value
        for group, values in dataclasses.asdict(cfg).items()
        for name, value in values.items()
    }
    return {
        k: v
        for k, v in flat.items()
        if k not in NOT_COMPARED and not k.startswith(NOT_COMPARED_GROUPS)
    }


def rows_digest(rows: list[dict]) -> str:
    """``N rows, sha256 <hex>`` of rows as read (keys sorted; non-JSON values as text)."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps(row, sort_keys=True, default=str).encode())
        digest.update(b"\n")
    return f"{len(rows)} rows, sha256 {digest.hexdigest()}"


def file_identity(name: str | None) -> str | None:
    """A data source's identity: a local file's resolved path, else the name (a hub id)."""
    if name is None:
        return None
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def data_fingerprint(cfg: FitConfig, inputs) -> dict[str, object]:
    """Which files the run read and a content hash of the rows it trains and evaluates on."""
    return {
        "data.dataset_file": file_identity(cfg.data.dataset),
        "data.eval_dataset_file": file_identity(cfg.data.eval_dataset),
        "data.train_rows": inputs.train_digest,
        "data.heldout_rows": inputs.heldout_digest,
    }


def run_record(cfg: FitConfig, inputs) -> dict[str, dict]:
    """What a checkpoint carries to be compared on resume."""
    return {"config": comparable_config(cfg), "data": data_fingerprint(cfg, inputs)}


def differences(saved: dict, now: dict) -> list[str]:
    """``name: old -> new`` for every compared field that differs (missing on one side too). A
    setting added since the checkpoint was written counts as its default there: the run that
    wrote it had no such option and behaved as the default does."""
    defaults = comparable_config(FitConfig())
    old = {**defaults, **saved.get("config", {}), **saved.get("data", {})}
    new = {**now.get("config", {}), **now.get("data", {})}
    missing = "(not recorded)"
    return [
        f"{name}: {old.get(name, missing)} -> {new.get(name, missing)}"
        for name in sorted(old.keys() | new.keys())
        if old.get(name, missing) != new.get(name, missing)
    ]


@dataclass
class ResumePlan:
    """How a run starts: from which checkpoint (None: from the beginning), with which earlier
    metrics rows (None: a fresh run, whose file replaces any old one), after which changes."""

    checkpoint: Path | None = None
    earlier_rows: list[dict] | None = None
    changes: list[str] = field(default_factory=list)
    step: int = 0

    def config_note(self) -> str:
        """YAML comment lines for config.yaml that record a resume's allowed changes."""
        if not self.changes:
            return ""
        lines = [f"# resumed at step {self.step} with --resume-allow-changes; changed:"]
        return "\n".join(lines + [f"#   {c}" for c in self.changes]) + "\n"


def plan_resume(cfg: FitConfig, record: dict) -> ResumePlan:
    """Check ``--resume`` against ``checkpoints/last.ckpt`` (or, when that file is damaged or
    foreign, the ``previous.ckpt`` it replaced: ``training.run.checkpoint_check``): a
    ``RunError`` naming every difference unless ``--resume-allow-changes``; the earlier metrics
    rows to continue, less a torn last row, in trl's step count (``in_trl_count``, once the
    resume is accepted: a refused one leaves every file as it was)."""
    out = Path(cfg.trainer.output_dir)
    if not cfg.trainer.resume:
        return ResumePlan()
    metrics = out / "logs" / "metrics.csv"
    on_disk = read_earlier_rows(metrics)
    chosen = choose_checkpoint(out / "checkpoints")
    if chosen is None:
        last = out / "checkpoints" / LAST_NAME
        log.warning("--resume: no checkpoint at %s; starting from the beginning", last)
        return ResumePlan(earlier_rows=in_trl_count(metrics, on_disk))
    path, checkpoint = chosen
    check_resumable(path, sharded_run=is_sharded(cfg))
    saved = checkpoint.get("dpo_run") or {}
    step = checkpoint["global_step"]
    if "config" not in saved:  # written before checkpoints carried a run record
        log.warning("--resume: %s has no run record; settings and data not compared", path)
        return ResumePlan(path, in_trl_count(metrics, on_disk), [], step)
    changes = differences(saved, record)
    if changes and not cfg.trainer.resume_allow_changes:
        raise RunError(refusal(path, step, changes))
    if changes:
        log.warning("--resume-allow-changes: resuming at step %d with %s", step, "; ".join(changes))
    earlier = merge_rows(carried_row(saved, step), in_trl_count(metrics, on_disk))
    return ResumePlan(path, earlier, changes, step)


def read_earlier_rows(path: Path) -> list[dict]:
    """The metrics rows a resumed run continues: a torn last row is dropped with a note; a file
    that is not text is a ``RunError`` naming it."""
    try:
        rows, dropped = read_rows_checked(path)
    except UnicodeDecodeError as err:
        raise RunError(
            f"--resume: {path}: not a metrics file (byte {err.object[err.start]:#04x} at offset "
            f"{err.start} is not UTF-8 text); move it aside to resume without the earlier rows"
        ) from err
    except OSError as err:
        raise RunError(f"--resume: {path}: {(err.strerror or str(err)).lower()}") from err
    for note in dropped:
        log.warning("--resume: %s: dropped %s", path, note)
    return rows


def in_trl_count(path: Path, rows: list[dict]) -> list[dict]:
    """``rows``, read from ``path``, in trl's step count. A file written in Lightning's count
    (``step_count.counts_from_zero``: before metrics.csv took trl's) is renumbered from 1, on
    disk too (atomically), with a warning, before the resumed run adds its rows in trl's count.
    A renumbered file has no step 0, so a second call (another process of the run) leaves it."""
    if not counts_from_zero(rows):
        return rows
    renumbered = renumbered_from_one(rows)
    with writing(path, "renumbering the metrics"):
        write_rows(path, renumbered, list(rows[0]))
    log.warning(
        "--resume: %s counted steps from 0 (written before metrics.csv took trl's count); its "
        "%d rows are renumbered from 1, train and held-out alike",
        path,
        len(rows),
    )
    return renumbered


def carried_row(saved: dict, step: int) -> list[dict]:
    """The metrics row the checkpoint of step ``step`` carries (``DPOModule.on_save_checkpoint``;
    [] when none), at trl's count: that row is the ``step``-th step's, which a checkpoint written
    before trl's count numbered ``step - 1``."""
    row = saved.get("last_row")
    if not row:
        return []
    if step_of(row) == step - 1:  # Lightning's count
        row = {**row, "step": step}
    return [row]


def refusal(last: Path, step: int, changes: list[str]) -> str:
    """The message of a refused resume: the checkpoint, each difference, the two ways on."""
    listed = "\n".join(f"  {c}" for c in changes)
    return (
        f"--resume: {last} (step {step}) was trained with other settings or data; "
        f"{len(changes)} difference(s), checkpoint -> now:\n{listed}\n"
        "Pass the checkpoint's values to continue it, --resume-allow-changes to continue with "
        "the new ones (recorded in config.yaml and metrics.csv), or another --output-dir to "
        "start a new run."
    )
