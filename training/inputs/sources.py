"""Preference rows from where a user keeps them: a local file, a directory or a hub data set.

``load_rows(source)`` is the one reader of every format; training (``--dataset``) and parity
(``--dataset``) both call it. Local files are read by their name, used literally
(``datasets.load_dataset`` would read ``[`` or ``*`` in a path as a glob):

- ``.jsonl`` / ``.jsonl.gz``: one object per line (``dpo_core.rows.read_jsonl``: a bad line is
  reported with its number);
- ``.json`` / ``.json.gz``: a list of objects, an object of equal-length columns, one object, or
  JSON lines;
- ``.parquet``: with pyarrow (the format ``datasets`` stores);
- ``.csv``: a header row, every cell a string.

A directory or a hub id goes to ``datasets.load_dataset``.
Rows come back as plain dicts, unchecked: ``dpo_core.rows.validate_row`` checks each one where it
is formatted, ``validate_rows`` a whole set.
"""

from __future__ import annotations

import csv
import gzip
import json
import zlib
from pathlib import Path

from dpo_core.rows import read_jsonl


def _read_json(path: Path) -> list[dict]:
    """Rows of a JSON file: a list of objects, an object of columns, one object, or JSON lines."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = json.loads(f.read().decode("utf-8-sig"))
    except (ValueError, OSError, EOFError, zlib.error):
        return read_jsonl(path)  # not one JSON document: JSON lines, read with located errors
    if isinstance(data, list):
        return data
    if not isinstance(data, dict):
        return [data]  # the row check names what it is
    chosen = data.get("chosen")
    if not (isinstance(chosen, list) and not any(isinstance(x, dict) for x in chosen)):
        return [data]  # one row (a conversational row's chosen is a list of messages)
    lengths = {len(v) if isinstance(v, list) else -1 for v in data.values()}
    if len(lengths) != 1:
        raise ValueError(f"{path}: columns of different lengths or non-list columns")
    return [dict(zip(data, values)) for values in zip(*data.values())]


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# File name endings and their readers; a name matches at most one.
READERS = {
    ".jsonl": read_jsonl,
    ".jsonl.gz": read_jsonl,
    ".json": _read_json,
    ".json.gz": _read_json,
    ".parquet": _read_parquet,
    ".csv": _read_csv,
}


def load_rows(source: str | Path, split: str = "train") -> list[dict]:
    """All rows of ``source`` as plain dicts: a local file by its ending, else ``load_dataset``.

    Args:
        source: a file path (see the module docstring), a directory, or a hub data set id.
        split: the split of a directory or hub data set; a file is one split.

    Raises:
        FileNotFoundError: ``source`` ends like a data file (``.jsonl``, ...) but does not exist.
        ValueError: a file of another type, a JSON object whose columns differ in length, or a
            data set ``load_dataset`` cannot load.
        dpo_core.rows.DataError: a line of a JSON-lines file that is not a JSON object.
    """
    path = Path(source)
    reader = next((r for end, r in READERS.items() if path.name.endswith(end)), None)
    if path.is_file():
        if reader is None:
            raise ValueError(
                f"{path}: unsupported file type {path.suffix!r}; use " + ", ".join(READERS)
            )
        return reader(path)
    if reader is not None and not path.exists():
        raise FileNotFoundError(f"preference file {path} not found")
    import datasets

    try:
        ds = datasets.load_dataset(str(source), split=split)
    except Exception as err:  # a hub/network error deep in datasets: say what was asked
        raise ValueError(f"could not load dataset {source!r} (split {split!r}): {err}") from err
    return ds.to_list()
