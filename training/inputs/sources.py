"""Preference rows from where a user keeps them: a local file, a directory or a hub data set.

``read_source(source)`` is the one reader of every format; training (``--dataset``) and parity
(``--dataset``) both call it (``load_rows`` for the rows alone). Every row comes back with its
:class:`~dpo_core.errors.Place` in the file, so that an error or a skip report names the file's
own line or row, whatever happens to the rows later (a held-out split, ``--max-rows``). Local files
are read by their name, used literally (``datasets.load_dataset`` would read ``[`` or ``*`` in a
path as a glob):

- ``.jsonl`` / ``.jsonl.gz``: one object per line (``dpo_core.jsonl``), placed by line;
- ``.json`` / ``.json.gz``: a list of objects, an object of equal-length columns, one object
  (placed by data row), or JSON lines (placed by line);
- ``.parquet``: with pyarrow (the format ``datasets`` stores), placed by data row;
- ``.csv`` / ``.csv.gz``: a header row, every cell a string, placed by data row and the line it ends on.

A directory written by ``save_to_disk`` goes to ``datasets.load_from_disk`` (a ``DatasetDict``
by ``split``); another directory (of split files) or a hub id to ``datasets.load_dataset``; their
rows are placed by data row of the split. ``training.inputs.raw_sources`` reads the same sources
into Arrow, for preparation at scale.

A file is read as a stream of rows (:func:`consume_file`), in the memory of one row: JSON lines
and CSV record by record, parquet batch by batch, a JSON array element by element
(``training.inputs.json_document``). A JSON document that is an object (of columns, or one row)
is one value, parsed whole.
A file that cannot be read at all raises one ``DataError`` naming it and the cause. Rows come
back unchecked: ``training.inputs.row_checks`` validates them where they are placed.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pyarrow.parquet as pq

from dpo_core.jsonl import iter_valid_rows
from dpo_core.rows import BAD_JSON, NOT_UTF8, UNREADABLE, DataError, Place
from training.inputs.json_document import NotOneDocument, iter_document_rows

# One row of a file and its place there.
Entry = tuple[object, Place]
T = TypeVar("T")
# Rows per batch read from a parquet file.
PARQUET_BATCH_ROWS = 1000


@dataclass
class SourceRows:
    """The rows of one source, each with its place there.

    Attributes:
        source: the file path, or ``"<data set>[<split>]"``.
        rows: the rows, in file order.
        places: the :class:`Place` of each row in the file.
        num_read: entries read: the rows plus the malformed entries skipped.
        skipped: the located error of every entry skipped (``skip_invalid``), in file order.
    """

    source: str
    rows: list[dict]
    places: list[Place]
    num_read: int
    skipped: list[DataError] = dataclasses.field(default_factory=list)

    @property
    def num_valid(self) -> int:
        """The rows held (the entries read less those skipped)."""
        return len(self.rows)


def _by_row(source: str, rows: list, max_rows: int | None) -> SourceRows:
    """Rows placed by their 1-based data row, cut to ``max_rows``."""
    rows = rows[:max_rows]
    return SourceRows(source, rows, [Place(row=i + 1) for i in range(len(rows))], len(rows))


def _open_binary(path: Path):
    """``path`` opened to read bytes, decompressed when its name ends in ``.gz``."""
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


class _ReadAsJsonLines(Exception):
    """A ``.json`` file turned out to be JSON lines after rows of it were given out."""


def _iter_jsonl(path: Path, skip_invalid: bool, max_rows, skipped: list) -> Iterator[Entry]:
    for line, row in iter_valid_rows(
        path, skip_invalid=skip_invalid, max_rows=max_rows, skipped=skipped
    ):
        yield row, Place(line=line)


def _iter_json(path: Path, skip_invalid: bool, max_rows, skipped: list) -> Iterator[Entry]:
    """A JSON file: a list of objects, an object of columns, one object, or JSON lines.

    The file is read as one document (``json_document``: an array's rows one at a time, placed
    by data row; the whole file is parsed, whatever ``max_rows``). Unless it parses as one, a
    file whose first line is JSON by itself is read as JSON lines (each bad line located,
    ``skip_invalid`` applies); any other error ends the reading, reported at its line.
    """
    given = 0
    with _open_binary(path) as f:
        try:
            for n, row in enumerate(iter_document_rows(f, lambda v: _json_rows(v, path)), 1):
                if max_rows is None or n <= max_rows:
                    given += 1
                    yield row, Place(row=n)
            return
        except NotOneDocument as err:
            if not err.first_line_alone:
                raise _document_error(err, str(path)) from None
    if given:  # a first line holding a whole array, then more lines
        raise _ReadAsJsonLines
    yield from _iter_jsonl(path, skip_invalid, max_rows, skipped)


def _document_error(err: NotOneDocument, source: str) -> DataError:
    """Where and why a one-document JSON file does not parse."""
    note = "(read as one JSON document: its first line is not JSON by itself)"
    place = Place(line=err.line)
    if err.bad_bytes is not None:
        detail = f"bytes {err.bad_bytes!r} are not valid UTF-8 {note}"
        return DataError(detail, source=source, place=place, reason=NOT_UTF8)
    detail = f"malformed JSON at column {err.column}: {err.msg} {note}"
    return DataError(detail, source=source, place=place, reason=BAD_JSON)


def _json_rows(data, path: Path) -> list:
    """The rows of one JSON document that is not an array: an object of columns, or one row."""
    if not isinstance(data, dict):
        return [data]  # the row check names what it is
    chosen = data.get("chosen")
    if not (isinstance(chosen, list) and not any(isinstance(x, dict) for x in chosen)):
        return [data]  # one row (a conversational row's chosen is a list of messages)
    lengths = {len(v) if isinstance(v, list) else -1 for v in data.values()}
    if len(lengths) != 1:
        raise DataError(
            "columns of different lengths or non-list columns", source=str(path), reason=UNREADABLE
        )
    return [dict(zip(data, values)) for values in zip(*data.values())]


def _iter_parquet(path: Path, skip_invalid: bool, max_rows, skipped: list) -> Iterator[Entry]:
    """A parquet file batch by batch (pyarrow), placed by data row."""
    n = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=PARQUET_BATCH_ROWS):
        for row in batch.to_pylist():
            if max_rows is not None and n >= max_rows:
                return
            n += 1
            yield row, Place(row=n)


def _iter_csv(path: Path, skip_invalid: bool, max_rows, skipped: list) -> Iterator[Entry]:
    """A CSV file with a header, record by record. Bytes that are not UTF-8 make their record an
    error (skipped with ``skip_invalid``); every record is placed by data row and the line it
    ends on. A gzipped file is read to its end whatever is kept, so that a corrupt gzip stream
    is its error, as when it was decompressed whole."""
    failure = None
    with _open_binary(path) as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8-sig", errors="surrogateescape", newline="")
        try:
            yield from _csv_records(csv.DictReader(text), path, skip_invalid, max_rows, skipped)
        except Exception as err:  # raised below, unless a corrupt gzip stream comes first
            failure = err
        _read_to_end(raw)
    if failure is not None:
        raise failure


def _read_to_end(raw) -> None:
    """Read a gzip stream to its end (its corruption raises); a plain file needs no reading."""
    if isinstance(raw, gzip.GzipFile):
        while raw.read(1 << 16):  # a read allocates its whole size: keep it small
            pass


def _csv_records(reader, path: Path, skip_invalid: bool, max_rows, skipped: list):
    read = 0
    for row in reader:
        if max_rows is not None and read - len(skipped) >= max_rows:
            return
        read += 1
        place = Place(row=read, line=reader.line_num)
        bad = next((k for k, v in row.items() if _has_bad_bytes(k) or _has_bad_bytes(v)), None)
        if bad is None:
            yield row, place
            continue
        error = DataError(
            "bytes that are not valid UTF-8", source=str(path), reason=NOT_UTF8, field=str(bad)
        ).at(place)
        if not skip_invalid:
            raise error
        skipped.append(error)


def _has_bad_bytes(value) -> bool:
    """Whether a CSV cell holds bytes that did not decode (``surrogateescape`` keeps them)."""
    return isinstance(value, str) and any("\udc80" <= ch <= "\udcff" for ch in value)


# File name endings and their readers; a name matches at most one.
READERS = {
    ".jsonl": _iter_jsonl,
    ".jsonl.gz": _iter_jsonl,
    ".json": _iter_json,
    ".json.gz": _iter_json,
    ".parquet": _iter_parquet,
    ".csv": _iter_csv,
    ".csv.gz": _iter_csv,
}


def read_source(
    source: str | Path,
    split: str = "train",
    *,
    skip_invalid: bool = False,
    max_rows: int | None = None,
) -> SourceRows:
    """All rows of ``source`` with their places: a local file by its ending, else ``load_dataset``.

    Args:
        source: a file path (see the module docstring), a directory, or a hub data set id.
        split: the split of a directory or hub data set; a file is one split.
        skip_invalid: skip malformed entries (a JSON line that is not UTF-8, not JSON or not an
            object; a CSV record with bytes that are not UTF-8), kept in ``skipped``.
        max_rows: read at most this many rows (JSON lines, parquet and a plain CSV: the rest
            of the file is not read; a JSON document is parsed, and a gzipped file decompressed,
            to its end, so that a broken file is refused whatever ``max_rows``).

    Raises:
        FileNotFoundError: ``source`` ends like a data file (``.jsonl``, ...) but does not exist.
        DataError: an unsupported file type; a file that cannot be read (naming it and the
            cause); a malformed entry (naming its line or row) unless ``skip_invalid``.
        ValueError: a data set ``load_dataset`` cannot load.
    """
    path = Path(source)
    reader = next((r for end, r in READERS.items() if path.name.endswith(end)), None)
    if path.is_file():
        if reader is None:
            raise DataError(
                f"unsupported file type {path.suffix!r}; use " + ", ".join(READERS),
                source=str(path),
                reason=UNREADABLE,
            )
        return _read_file(path, skip_invalid, max_rows)
    if reader is not None and not path.exists():
        raise FileNotFoundError(f"preference file {path} not found")
    return _by_row(f"{source}[{split}]", _load_dataset(str(source), split), max_rows)


def _read_file(path: Path, skip_invalid: bool, max_rows: int | None) -> SourceRows:
    """All rows of the file ``path`` (:func:`consume_file` kept in lists)."""
    entries, skipped = consume_file(path, list, skip_invalid=skip_invalid, max_rows=max_rows)
    rows = [row for row, _ in entries]
    return SourceRows(str(path), rows, [p for _, p in entries], len(rows) + len(skipped), skipped)


def consume_file(
    path: Path,
    consume: Callable[[Iterator[Entry]], T],
    *,
    skip_invalid: bool = False,
    max_rows: int | None = None,
) -> tuple[T, list[DataError]]:
    """``consume`` run over the ``(row, place)`` entries of the data file ``path`` as they are
    read (one at a time, in bounded memory), and the errors of the entries skipped.

    A ``.json`` file whose first line is a whole array and whose next lines hold more is JSON
    lines after all: once that shows, ``consume`` runs again over the file read as JSON lines.

    Raises:
        As :func:`read_source` for a file: anything but a located ``DataError`` from the
        reading becomes one ``DataError`` naming the file (not what ``consume`` raises).
    """
    reader = next(r for end, r in READERS.items() if path.name.endswith(end))
    try:
        skipped: list[DataError] = []
        return consume(_named(path, reader(path, skip_invalid, max_rows, skipped))), skipped
    except _ReadAsJsonLines:
        skipped = []
        return consume(_named(path, _iter_jsonl(path, skip_invalid, max_rows, skipped))), skipped


def _named(path: Path, entries: Iterator[Entry]) -> Iterator[Entry]:
    """``entries``, with an error of the reading (pyarrow, csv, gzip, OS) made one ``DataError``
    naming the file: one clear message, no traceback."""
    try:
        yield from entries
    except (DataError, _ReadAsJsonLines):
        raise
    except Exception as err:
        raise unreadable_file(path, err) from err


def unreadable_file(path: Path, err: BaseException) -> DataError:
    """The one error of a file that cannot be read at all: its name and the cause."""
    return DataError(
        f"cannot read this file: {describe_error(err)}", source=str(path), reason=UNREADABLE
    )


def _load_dataset(source: str, split: str) -> list[dict]:
    return load_dataset_split(source, split).to_list()


def load_dataset_split(source: str, split: str):
    """One split of a data set, as ``datasets`` holds it (Arrow, memory-mapped).

    A directory written by ``save_to_disk`` is loaded with ``load_from_disk`` (a ``Dataset`` is
    the data whatever ``split``; a ``DatasetDict`` gives ``split``); anything else (a directory
    of split files, a hub id) with ``load_dataset``.

    Raises:
        ValueError: naming the data set, the split and the cause, when it cannot be loaded.
    """
    # why: datasets takes ~0.6 s to import, and only a hub id or a directory needs it
    import datasets

    path = Path(source)
    try:
        if path.is_dir() and (path / "state.json").is_file():
            return datasets.load_from_disk(source)
        if path.is_dir() and (path / "dataset_dict.json").is_file():
            saved = datasets.load_from_disk(source)
            if split not in saved:
                raise KeyError(f"no split {split!r}; it has " + ", ".join(map(repr, saved)))
            return saved[split]
        return datasets.load_dataset(source, split=split)
    except Exception as err:  # a hub/network error deep in datasets: say what was asked
        raise ValueError(
            f"could not load dataset {source!r} (split {split!r}): {describe_error(err)}"
        ) from err


def describe_error(err: BaseException) -> str:
    """``err`` with the chain of errors that caused it (``datasets`` wraps the real one)."""
    parts = []
    while err is not None and len(parts) < 4:
        text = str(err).strip()
        parts.append(f"{type(err).__name__}: {text}" if text else type(err).__name__)
        err = err.__cause__ or err.__context__
    return "; caused by ".join(parts)


def load_rows(source: str | Path, split: str = "train") -> list[dict]:
    """All rows of ``source`` as plain dicts (:func:`read_source` without the places).

    Raises:
        As :func:`read_source`.
    """
    return read_source(source, split).rows
