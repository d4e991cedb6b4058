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
A file that cannot be read at all raises one ``DataError`` naming it and the cause. Rows come
back unchecked: ``training.inputs.row_checks`` validates them where they are placed.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from dpo_core.rows import (
    BAD_JSON,
    NOT_UTF8,
    UNREADABLE,
    DataError,
    Place,
    read_jsonl_rows,
)


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


def _read_jsonl(path: Path, skip_invalid: bool, max_rows: int | None) -> SourceRows:
    read = read_jsonl_rows(path, skip_invalid=skip_invalid, max_rows=max_rows)
    places = [Place(line=n) for n in read.lines]
    return SourceRows(str(path), read.rows, places, read.num_read, read.skipped)


def _read_json(path: Path, skip_invalid: bool, max_rows: int | None) -> SourceRows:
    """A JSON file: a list of objects, an object of columns, one object, or JSON lines.

    A file whose first line is JSON by itself may be JSON lines: unless it parses as one
    document, it is read line by line (each bad line located, ``skip_invalid`` applies). Any other
    file is one document (an array, a pretty-printed object): an error in it ends the reading,
    reported at its line.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    try:
        data = json.loads(raw.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        if _first_line_is_json(raw):
            return _read_jsonl(path, skip_invalid, max_rows)
        raise _document_error(e, raw, str(path)) from e
    return _by_row(str(path), _json_rows(data, str(path)), max_rows)


def _document_error(
    err: UnicodeDecodeError | json.JSONDecodeError, raw: bytes, source: str
) -> DataError:
    """Where and why a one-document JSON file does not parse."""
    note = "(read as one JSON document: its first line is not JSON by itself)"
    if isinstance(err, UnicodeDecodeError):
        line = raw[: err.start].count(b"\n") + 1
        bad = raw[err.start : err.end]
        detail = f"bytes {bad!r} are not valid UTF-8 {note}"
        return DataError(detail, source=source, place=Place(line=line), reason=NOT_UTF8)
    detail = f"malformed JSON at column {err.colno}: {err.msg} {note}"
    return DataError(detail, source=source, place=Place(line=err.lineno), reason=BAD_JSON)


def _first_line_is_json(raw: bytes) -> bool:
    """Whether the first non-blank line parses alone: the file may be JSON lines."""
    first = next((line for line in raw.splitlines() if line.strip()), b"")
    try:
        json.loads(first.decode("utf-8-sig"))
    except ValueError:
        return False
    return True


def _json_rows(data, source: str) -> list:
    """The rows of one JSON document: a list, an object of columns, or one row."""
    if isinstance(data, list):
        return data
    if not isinstance(data, dict):
        return [data]  # the row check names what it is
    chosen = data.get("chosen")
    if not (isinstance(chosen, list) and not any(isinstance(x, dict) for x in chosen)):
        return [data]  # one row (a conversational row's chosen is a list of messages)
    lengths = {len(v) if isinstance(v, list) else -1 for v in data.values()}
    if len(lengths) != 1:
        raise DataError(
            "columns of different lengths or non-list columns", source=source, reason=UNREADABLE
        )
    return [dict(zip(data, values)) for values in zip(*data.values())]


def _read_parquet(path: Path, skip_invalid: bool, max_rows: int | None) -> SourceRows:
    return _by_row(str(path), pq.read_table(path).to_pylist(), max_rows)


def _read_csv(path: Path, skip_invalid: bool, max_rows: int | None) -> SourceRows:
    """A CSV file with a header. Bytes that are not UTF-8 make their record an error (skipped
    with ``skip_invalid``); every record is placed by data row and the line it ends on."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    text = raw.decode("utf-8-sig", errors="surrogateescape")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    out = SourceRows(str(path), [], [], 0)
    for row in reader:
        if max_rows is not None and len(out.rows) >= max_rows:
            break
        place = Place(row=out.num_read + 1, line=reader.line_num)
        out.num_read += 1
        bad = next((k for k, v in row.items() if _has_bad_bytes(k) or _has_bad_bytes(v)), None)
        if bad is None:
            out.rows.append(row)
            out.places.append(place)
            continue
        error = DataError(
            "bytes that are not valid UTF-8", source=str(path), reason=NOT_UTF8, field=str(bad)
        ).at(place)
        if not skip_invalid:
            raise error
        out.skipped.append(error)
    return out


def _has_bad_bytes(value) -> bool:
    """Whether a CSV cell holds bytes that did not decode (``surrogateescape`` keeps them)."""
    return isinstance(value, str) and any("\udc80" <= ch <= "\udcff" for ch in value)


# File name endings and their readers; a name matches at most one.
READERS = {
    ".jsonl": _read_jsonl,
    ".jsonl.gz": _read_jsonl,
    ".json": _read_json,
    ".json.gz": _read_json,
    ".parquet": _read_parquet,
    ".csv": _read_csv,
    ".csv.gz": _read_csv,
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
        max_rows: read at most this many rows (JSON lines: the rest of the file is not read).

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
        return _read_file(reader, path, skip_invalid, max_rows)
    if reader is not None and not path.exists():
        raise FileNotFoundError(f"preference file {path} not found")
    return _by_row(f"{source}[{split}]", _load_dataset(str(source), split), max_rows)


def _read_file(reader, path: Path, skip_invalid: bool, max_rows: int | None) -> SourceRows:
    """``reader``'s rows; anything but a located ``DataError`` becomes one naming the file."""
    try:
        return reader(path, skip_invalid, max_rows)
    except DataError:
        raise
    except Exception as err:  # pyarrow, csv, gzip, OS errors: one clear message, no traceback
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
