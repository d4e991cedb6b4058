"""Prepare one source: read it into Arrow, tokenize every row in ``--dataset-num-proc``
processes, and keep the result in the cache on disk (``training.inputs.prep_cache``).

:func:`prepare_source` returns the cached set when its key matches (a rerun, a ``--resume``),
else reads the source (``training.inputs.raw_sources``), maps ``row_prep.prepare_batch`` over it
with ``Dataset.map`` (a progress bar with rows/s and the time left) straight into the cache
entry, and records what reading skipped. Each row's record stays in Arrow on disk, memory-mapped;
``training.inputs.prepared_parts`` checks the records, splits them and accounts for them.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from dpo_core.rows import DataError
from training.inputs import prep_cache
from training.inputs.raw_sources import ROW_JSON, content_fingerprint, open_raw, source_name
from training.inputs.row_prep import COLUMN_FLAGS, FEATURES, PrepSettings, prepare_batch

log = logging.getLogger(__name__)

# Rows per process below which one more process is not worth its start.
ROWS_PER_PROCESS = 2000


@dataclass
class PreparedSource:
    """One source's records (``row_prep.FEATURES``, one per row read, in file order).

    Attributes:
        source: the name errors use.
        records: the Arrow-backed ``datasets.Dataset`` of records.
        num_read: entries read, malformed ones included.
        skipped: errors of the entries skipped while reading (``--skip-invalid``), file order.
        location: the cache entry that holds the records.
    """

    source: str
    records: object
    num_read: int
    location: Path
    skipped: list[DataError] = field(default_factory=list)


def usable_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def processes_for(requested: int | None, num_rows: int) -> int:
    """``--dataset-num-proc`` (unset: the usable cores), at most one per ``ROWS_PER_PROCESS``."""
    wanted = requested or usable_cores()
    return max(1, min(wanted, num_rows // ROWS_PER_PROCESS))


def prepare_source(
    source, split: str, tokenizer, data_cfg, *, max_rows: int | None = None
) -> PreparedSource:
    """The records of ``source`` (``split``; at most ``max_rows`` rows), from the cache when
    they are there, else prepared and cached.

    Raises:
        As ``raw_sources.open_raw``; ``DataError`` for a ``--*-column`` the source lacks.
    """
    name = source_name(source, split)
    settings = PrepSettings(
        source=name,
        max_length=data_cfg.max_length,
        truncation_mode=data_cfg.truncation_mode,
        columns=(data_cfg.prompt_column, data_cfg.chosen_column, data_cfg.rejected_column),
    )
    keyed = {
        "split": split,
        "max_rows": max_rows,
        "max_length": settings.max_length,
        "truncation_mode": settings.truncation_mode,
        "columns": list(settings.columns),
    }
    key = prep_cache.prepared_key(content_fingerprint(source, split), tokenizer, keyed)
    directory = prep_cache.cache_root(data_cfg.dataset_cache_dir) / key[:32]
    cached = _cached(directory, key, name)  # under this run's name for the source
    if cached is not None:
        return cached
    prep_cache.discard(directory)  # a run that stopped while writing it left it unfinished
    try:
        return _prepare(source, split, tokenizer, settings, data_cfg, directory, key, max_rows)
    except BaseException:
        prep_cache.discard(directory)
        raise


def _cached(directory: Path, key: str, name: str) -> PreparedSource | None:
    """The cached records, or None (none there; an unreadable entry, noted in one line)."""
    try:
        entry = prep_cache.read_entry(directory, key)
    except (ValueError, OSError) as err:
        log.warning("prepared data cache: %s; preparing %s again", err, name)
        return None
    if entry is None:
        return None
    records, meta = entry
    skipped = [prep_cache.error_from_dict(e, name) for e in meta.skipped]
    log.info("%s: tokenized rows read from the cache %s", name, directory)
    return PreparedSource(name, records, meta.num_read, directory, skipped)


def _prepare(source, split, tokenizer, settings, data_cfg, directory, key, max_rows):
    """Read, tokenize into ``directory`` and write its ``meta.json``."""
    start = time.perf_counter()
    directory.mkdir(parents=True, exist_ok=True)
    raw = open_raw(
        source,
        split,
        work_dir=directory,
        skip_invalid=data_cfg.skip_invalid,
        max_rows=max_rows,
    )
    _check_columns(raw.dataset, settings)
    num_proc = processes_for(data_cfg.dataset_num_proc, len(raw.dataset))
    records = raw.dataset.map(
        prepare_batch,
        with_indices=True,
        batched=True,
        fn_kwargs={"tokenizer": tokenizer, "settings": settings},
        remove_columns=raw.dataset.column_names,
        features=FEATURES,
        num_proc=num_proc if num_proc > 1 else None,
        cache_file_name=str(directory / "records.arrow"),
        load_from_cache_file=False,
        new_fingerprint=key[:32],  # datasets appends a shard suffix; at most 64 characters
        desc=f"Tokenizing {settings.source} ({num_proc} process{'es' if num_proc > 1 else ''})",
    )
    (directory / "raw.arrow").unlink(missing_ok=True)
    shards = [Path(f["filename"]) for f in records.cache_files]
    meta = prep_cache.CacheMeta(
        source=raw.source,
        num_read=raw.num_read,
        num_rows=len(records),
        shards=[{"file": p.name, "bytes": p.stat().st_size} for p in shards],
        skipped=[prep_cache.error_to_dict(e) for e in raw.skipped],
    )
    prep_cache.write_meta(directory, key, meta)
    log.info(
        "%s: %d rows tokenized in %.1f s (%d process%s), cached in %s",
        raw.source,
        len(records),
        time.perf_counter() - start,
        num_proc,
        "es" if num_proc > 1 else "",
        directory,
    )
    return PreparedSource(raw.source, records, raw.num_read, directory, raw.skipped)


def _check_columns(dataset, settings: PrepSettings) -> None:
    """A column named by ``--*-column`` must be one of an Arrow source's columns (a JSON row's
    missing key is that row's error instead)."""
    names = dataset.column_names
    if ROW_JSON in names:
        return
    for standard, theirs in zip(("prompt", "chosen", "rejected"), settings.columns, strict=True):
        if theirs != standard and theirs not in names:
            raise DataError(
                f"no column {theirs!r} ({COLUMN_FLAGS[standard]}); its columns: "
                + ", ".join(names),
                source=settings.source,
                reason="missing_field",
            )
