"""The one JSONL writer and reader of the project: one JSON object per line, gzipped when the
name ends in ``.gz``. A bad line raises :class:`~dpo_core.errors.DataError` naming the file and
the line, or, with ``skip_invalid``, is skipped and kept in the result (:func:`read_jsonl_rows`).
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpo_core.errors import BAD_GZIP, BAD_JSON, NOT_OBJECT, NOT_UTF8, DataError, Place


def write_jsonl(rows: Iterable[Mapping[str, Any]], path: str | Path) -> None:
    """Write one JSON object per line (UTF-8, keys in row order), gzipped when ``path`` ends in
    ``.gz``: the file :func:`read_jsonl` reads back."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read one JSON object per line from a ``.jsonl`` or ``.jsonl.gz`` file.

    Blank lines are skipped, so row ``i`` of the result is the ``i``-th non-blank line. A UTF-8 byte
    order mark at the start of the file is ignored.

    Raises:
        DataError: naming the file and the 1-based line, for bytes that are not UTF-8, malformed
            JSON, a line that is JSON but not an object, or a corrupt gzip stream.
    """
    return read_jsonl_rows(path).rows


@dataclass
class JsonlRows:
    """What :func:`read_jsonl_rows` read: the rows, the line of each, and the lines it skipped.

    Attributes:
        rows: one dict per JSON-object line, in file order.
        lines: the 1-based line of each row.
        skipped: the located error of every line skipped (``skip_invalid``), in file order.
        num_read: the non-blank lines read, rows and skipped lines together.
    """

    rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    lines: list[int] = dataclasses.field(default_factory=list)
    skipped: list[DataError] = dataclasses.field(default_factory=list)
    num_read: int = 0


def read_jsonl_rows(
    path: str | Path, *, skip_invalid: bool = False, max_rows: int | None = None
) -> JsonlRows:
    """:func:`read_jsonl`, keeping each row's line; optionally skipping bad lines.

    Args:
        path: a ``.jsonl`` or ``.jsonl.gz`` file.
        skip_invalid: skip a line that is not UTF-8, not JSON or not a JSON object (its error is
            kept in ``skipped``) instead of raising. A corrupt gzip stream still raises: nothing
            after it can be read.
        max_rows: stop reading once this many rows are read (the rest of the file is not read).
    """
    out = JsonlRows()
    for line, row in iter_valid_rows(
        path, skip_invalid=skip_invalid, max_rows=max_rows, skipped=out.skipped
    ):
        out.rows.append(row)
        out.lines.append(line)
    out.num_read = len(out.rows) + len(out.skipped)
    return out


def iter_valid_rows(
    path: str | Path, *, skip_invalid: bool, max_rows: int | None, skipped: list[DataError]
) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line, row)`` of every good line of a JSONL file, one at a time; a bad line raises, or
    with ``skip_invalid`` its error is appended to ``skipped`` (lines read = rows + skipped)."""
    for line, entry in iter_jsonl_entries(path, max_rows=max_rows):
        if not isinstance(entry, DataError):
            yield line, entry
        elif skip_invalid:
            skipped.append(entry)
        else:
            raise entry


def iter_jsonl_entries(
    path: str | Path, *, max_rows: int | None = None
) -> Iterator[tuple[int, dict[str, Any] | DataError]]:
    """``(line, row)`` for every non-blank line of a JSONL file, in order, one at a time; a bad
    line (not UTF-8, not JSON, not an object) comes as ``(line, DataError)``, not raised.

    Stops once ``max_rows`` rows (bad lines not counted) have come.

    Raises:
        DataError: a corrupt gzip stream (``bad_gzip``): nothing after it can be read.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    rows = 0
    line_no = 0
    try:
        with opener(path, "rb") as f:
            for line_no, raw in enumerate(f, start=1):
                if max_rows is not None and rows >= max_rows:
                    return
                try:
                    row = _parse_line(raw, source=str(path), line=line_no)
                except DataError as e:
                    yield line_no, e
                    continue
                if row is not None:
                    rows += 1
                    yield line_no, row
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DataError(
            f"not a readable gzip stream after line {line_no} ({e})",
            source=str(path),
            reason=BAD_GZIP,
        ) from e


def _parse_line(raw: bytes, *, source: str, line: int) -> dict[str, Any] | None:
    """One line of a JSONL file as a dict, or None for a blank line."""
    try:
        text = raw.decode("utf-8-sig" if line == 1 else "utf-8")
    except UnicodeDecodeError as e:
        bad = raw[e.start : e.end]
        raise DataError(
            f"bytes {bad!r} at byte {e.start} are not valid UTF-8",
            source=source,
            place=Place(line=line),
            reason=NOT_UTF8,
        ) from e
    if not text.strip():
        return None
    try:
        row = json.loads(text.rstrip("\r\n"))  # a column past the end is on this line
    except json.JSONDecodeError as e:
        detail = f"malformed JSON at column {e.colno}: {e.msg}"
        raise DataError(detail, source=source, place=Place(line=line), reason=BAD_JSON) from e
    if not isinstance(row, dict):
        raise DataError(
            f"expected a JSON object, got {type(row).__name__}",
            source=source,
            place=Place(line=line),
            reason=NOT_OBJECT,
        )
    return row
