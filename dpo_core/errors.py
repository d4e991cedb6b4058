"""Bad input data: :class:`DataError`, located at a :class:`Place` of its file, and the reason
codes rows are counted by when they are skipped.

``dpo_core.rows`` (the row validator) and ``dpo_core.jsonl`` (the JSONL reader) raise it; it is a
``ValueError``, so an entry point that reports ``ValueError`` as a one-line message covers it.
"""

from __future__ import annotations

from dataclasses import dataclass

# Reasons a row or a line is rejected (DataError.reason).
NOT_UTF8 = "not_utf8"
BAD_GZIP = "bad_gzip"
BAD_JSON = "bad_json"
NOT_OBJECT = "not_object"
MISSING_FIELD = "missing_field"
WRONG_TYPE = "wrong_type"
EMPTY_COMPLETION = "empty_completion"
EMPTY_PROMPT = "empty_prompt"
IDENTICAL_COMPLETIONS = "identical_completions"
NO_ROWS = "no_rows"
MIXED_SHAPES = "mixed_shapes"
UNKNOWN_ROLE = "unknown_role"
COMPLETION_ROLE = "completion_role"  # a completion that does not start and end as the model
UNREADABLE = "unreadable"


class DataError(ValueError):
    """Bad input data, located: ``"<source>, row <index>, field '<field>': <detail>"``.

    A row of a file is located by its :class:`Place` there (``"<source>, line 20, field ..."``
    for JSON lines, ``"<source>, row 5, field ..."`` for a JSON array, parquet or CSV); a row of
    an in-memory list by its 0-based ``index``.

    Attributes:
        source: where the rows came from (a file path or a name such as ``"<rows>"``).
        reason: a short code (``missing_field``, ``wrong_type``, ...) to count rejected rows by.
        index: the 0-based row index, or None for file-level problems.
        field: the offending field, or None.
        place: where in the file (``Place``); ``line`` (1-based, for problems found while
            reading) and ``row`` (1-based data row: CSV, parquet, JSON array) read it, or None.
        detail: the message without its location.
    """

    def __init__(
        self,
        detail: str,
        *,
        source: str,
        reason: str,
        index: int | None = None,
        field: str | None = None,
        place: Place | None = None,
    ) -> None:
        self.source, self.reason, self.index, self.field = source, reason, index, field
        self.place, self.detail = place or Place(), detail
        self.line, self.row = self.place.line, self.place.row
        where = [str(source)]
        if self.line is not None or self.row is not None:
            where.append(str(self.place))
        if index is not None and self.row is None:
            where.append(f"row {index}")
        if field is not None:
            where.append(f"field '{field}'")
        super().__init__(f"{', '.join(where)}: {detail}")

    def at(self, place: Place) -> DataError:
        """The same problem, located at ``place`` in its file instead of by a list index."""
        return DataError(
            self.detail,
            source=self.source,
            reason=self.reason,
            field=self.field,
            place=place,
        )


@dataclass(frozen=True)
class Place:
    """Where a row sits in its file: its 1-based ``line`` (JSON lines), its 1-based data ``row``
    (a JSON array, parquet, a CSV record after the header), or both (CSV: the record and the line
    it ends on). Renders as ``line 20``, ``row 5`` or ``row 5 (line 6)``."""

    line: int | None = None
    row: int | None = None

    def __str__(self) -> str:
        if self.row is None:
            return f"line {self.line}"
        return f"row {self.row}" + ("" if self.line is None else f" (line {self.line})")
