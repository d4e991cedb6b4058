"""A preference source as an Arrow data set on disk, read once and memory-mapped.

:func:`open_raw` turns any source ``training.inputs.sources`` reads into a ``datasets.Dataset``
whose rows can be mapped over in several processes without being held in memory:

- ``.jsonl``, ``.json`` and ``.csv`` (also gzipped): streamed row by row
  (``training.inputs.sources.consume_file``) into an Arrow file, each row kept as its JSON text
  (so rows of any mix of types survive) with its place (line, data row); a bad entry raises,
  or with ``skip_invalid`` joins ``skipped``, exactly as ``read_source`` reads it;
- ``.parquet``: streamed batch by batch into an Arrow file, its own columns;
- a directory written by ``Dataset.save_to_disk`` (a ``Dataset``, or a ``DatasetDict`` and its
  ``split``), a directory of split files or a hub id: the Arrow data ``datasets`` already holds.

Rows whose place is not written (the Arrow-native sources) are placed by their 1-based data row.
:func:`content_fingerprint` identifies a source by its bytes (local files and directories) or by
``datasets``' own fingerprint (a hub id), for the cache of tokenized rows.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq

from dpo_core.rows import UNREADABLE, DataError
from training.inputs.sources import READERS, consume_file, load_dataset_split, read_source

# The columns of a source stored as JSON text: the row, its line and its 1-based data row.
ROW_JSON, LINE, ROW = "__row_json", "__line", "__row"
JSON_SCHEMA = pa.schema([(ROW_JSON, pa.string()), (LINE, pa.int64()), (ROW, pa.int64())])
# Rows per Arrow record batch written.
BATCH_ROWS = 1000


@dataclass
class RawSource:
    """The rows of one source, in an Arrow data set, with what reading them skipped.

    Attributes:
        source: the name errors use: the file path, ``<dir>[<split>]`` or ``<hub id>[<split>]``.
        dataset: one row per entry read, in file order (JSON-text sources: ``ROW_JSON``,
            ``LINE``, ``ROW``; Arrow-native ones: their own columns).
        num_read: entries read: the rows plus the malformed entries skipped.
        skipped: the located error of every entry skipped while reading (``skip_invalid``).
    """

    source: str
    dataset: object
    num_read: int
    skipped: list[DataError] = field(default_factory=list)


def is_saved_dataset(path: Path) -> bool:
    """Whether ``path`` is a directory written by ``Dataset(Dict).save_to_disk``."""
    names = ("state.json", "dataset_dict.json")
    return path.is_dir() and any((path / name).is_file() for name in names)


def source_name(source: str | Path, split: str) -> str:
    """How errors name ``source``: a file by its path, a data set by ``<name>[<split>]``."""
    path = Path(source)
    if path.is_file() or (path.is_dir() and (path / "state.json").is_file()):
        return str(path)
    return f"{source}[{split}]"


def content_fingerprint(source: str | Path, split: str) -> str:
    """What identifies the rows of ``source``: sha256 of a local file's bytes, or of every file
    of a local directory (names and bytes); ``datasets``' fingerprint of a hub data set."""
    path = Path(source)
    digest = hashlib.sha256()
    if path.is_file():
        _hash_file(digest, path)
        return f"file:{path.name}:{digest.hexdigest()}"
    if path.is_dir():
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(str(file.relative_to(path)).encode() + b"\0")
            _hash_file(digest, file)
        return f"dir:{digest.hexdigest()}"
    return f"hub:{source}:{split}:{load_dataset_split(str(source), split)._fingerprint}"


def _hash_file(digest, path: Path) -> None:
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)


def open_raw(
    source: str | Path,
    split: str,
    *,
    work_dir: Path,
    skip_invalid: bool = False,
    max_rows: int | None = None,
) -> RawSource:
    """``source``'s rows as an Arrow data set; files converted are written under ``work_dir``.

    Raises:
        As ``training.inputs.sources.read_source``: ``FileNotFoundError``, a located
        ``DataError`` (unless ``skip_invalid`` for a malformed entry), ``ValueError`` for a data
        set ``datasets`` cannot load.
    """
    path = Path(source)
    if path.is_file() and path.name.endswith(".parquet"):
        return _from_parquet(path, work_dir, max_rows)
    if path.is_file() and path.name.endswith(tuple(READERS)):
        return _from_file(path, work_dir, skip_invalid, max_rows)
    if path.is_file() or (path.name.endswith(tuple(READERS)) and not path.exists()):
        read_source(source)  # its error: an unsupported file type, or not found
    dataset = load_dataset_split(str(source), split)
    if max_rows is not None and max_rows < len(dataset):
        dataset = dataset.select(range(max_rows))
    return RawSource(source_name(source, split), dataset, len(dataset))


def _from_file(path: Path, work_dir: Path, skip_invalid: bool, max_rows: int | None) -> RawSource:
    """A JSON lines, JSON or CSV file streamed into ``work_dir/raw.arrow``: one JSON text per row,
    with its line and data row (those its place has)."""

    def write(entries) -> object:
        texts = (
            (json.dumps(row, ensure_ascii=False, default=str), place.line, place.row)
            for row, place in entries
        )
        return _write_json_rows(texts, work_dir / "raw.arrow")

    dataset, skipped = consume_file(path, write, skip_invalid=skip_invalid, max_rows=max_rows)
    return RawSource(str(path), dataset, len(dataset) + len(skipped), skipped)


def _write_json_rows(entries: Iterator[tuple], path: Path):
    """``(json, line, row)`` entries written to the Arrow file ``path``, read back mapped."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, JSON_SCHEMA) as writer:
        batch: list[tuple] = []
        for entry in entries:
            batch.append(entry)
            if len(batch) == BATCH_ROWS:
                writer.write_batch(_json_batch(batch))
                batch = []
        writer.write_batch(_json_batch(batch))
    return datasets.Dataset.from_file(str(path))


def _json_batch(entries: list[tuple]) -> pa.RecordBatch:
    columns = list(zip(*entries)) if entries else [[], [], []]
    return pa.RecordBatch.from_arrays(
        [pa.array(list(c), type=f.type) for c, f in zip(columns, JSON_SCHEMA, strict=True)],
        schema=JSON_SCHEMA,
    )


def _from_parquet(path: Path, work_dir: Path, max_rows: int | None) -> RawSource:
    """A parquet file streamed batch by batch into ``work_dir/raw.arrow`` (its own columns)."""
    target = work_dir / "raw.arrow"
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        _parquet_to_arrow(path, target, max_rows)
    except Exception:  # pyarrow's errors: the one message read_source gives, not chained
        failed = True
    else:
        failed = False
    if failed:
        read_source(path)
        raise DataError("cannot read this file", source=str(path), reason=UNREADABLE)
    dataset = datasets.Dataset.from_file(str(target))
    return RawSource(str(path), dataset, len(dataset))


def _parquet_to_arrow(path: Path, target: Path, max_rows: int | None) -> None:
    """Copy the first ``max_rows`` rows (all: None) of a parquet file, batch by batch."""
    parquet = pq.ParquetFile(path)
    left = max_rows
    with (
        pa.OSFile(str(target), "wb") as sink,
        pa.ipc.new_stream(sink, parquet.schema_arrow) as writer,
    ):
        for batch in parquet.iter_batches(batch_size=BATCH_ROWS):
            if left is not None:
                batch, left = batch.slice(0, left), left - min(left, batch.num_rows)
            writer.write_batch(batch)
            if left == 0:
                break
