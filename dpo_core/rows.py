"""Reading preference rows from disk, telling their shape apart, and rejecting bad ones early.

A row is a dict with ``chosen`` and ``rejected`` and, optionally, ``prompt``. Each field is either a
string (standard text) or a list of ``{"role": str, "content": str}`` messages (conversational).
Four shapes follow, as trl 1.16 accepts them (``trl/data_utils.py``):

===========================  =========================================================
shape                        fields
===========================  =========================================================
``explicit``                 ``prompt``, ``chosen``, ``rejected``: strings
``implicit``                 ``chosen``, ``rejected``: strings sharing a prompt prefix
``conversational``           ``prompt``, ``chosen``, ``rejected``: message lists
``conversational_implicit``  ``chosen``, ``rejected``: message lists sharing a prefix
===========================  =========================================================

Every problem raises :class:`DataError`, whose message names the source, the row (or the line of
the file) and the field, and whose ``reason`` is a short code a caller can count rows by.

This module holds the one JSONL writer and reader of the project (:func:`write_jsonl`,
:func:`read_jsonl`) and the one row validator (:func:`validate_row`; :func:`validate_rows` for a
whole set, which must hold one shape). Other file formats are read by ``training.inputs.sources``.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

EXPLICIT = "explicit"
IMPLICIT = "implicit"
CONVERSATIONAL = "conversational"
CONVERSATIONAL_IMPLICIT = "conversational_implicit"

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


class DataError(ValueError):
    """Bad input data, located: ``"<source>, row <index>, field '<field>': <detail>"``.

    Attributes:
        source: where the rows came from (a file path or a name such as ``"<rows>"``).
        reason: a short code (``missing_field``, ``wrong_type``, ...) to count rejected rows by.
        index: the 0-based row index, or None for file-level problems.
        field: the offending field, or None.
        line: the 1-based line of the file, for problems found while reading.
    """

    def __init__(
        self,
        detail: str,
        *,
        source: str,
        reason: str,
        index: int | None = None,
        field: str | None = None,
        line: int | None = None,
    ) -> None:
        self.source, self.reason, self.index, self.field, self.line = (
            source,
            reason,
            index,
            field,
            line,
        )
        where = [str(source)]
        if line is not None:
            where.append(f"line {line}")
        if index is not None:
            where.append(f"row {index}")
        if field is not None:
            where.append(f"field '{field}'")
        super().__init__(f"{', '.join(where)}: {detail}")


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
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    rows: list[dict[str, Any]] = []
    line_no = 0
    try:
        with opener(path, "rb") as f:
            for line_no, raw in enumerate(f, start=1):
                row = _parse_line(raw, source=str(path), line=line_no)
                if row is not None:
                    rows.append(row)
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DataError(
            f"not a readable gzip stream after line {line_no} ({e})",
            source=str(path),
            reason=BAD_GZIP,
        ) from e
    return rows


def _parse_line(raw: bytes, *, source: str, line: int) -> dict[str, Any] | None:
    """One line of a JSONL file as a dict, or None for a blank line."""
    try:
        text = raw.decode("utf-8-sig" if line == 1 else "utf-8")
    except UnicodeDecodeError as e:
        bad = raw[e.start : e.end]
        raise DataError(
            f"bytes {bad!r} at byte {e.start} are not valid UTF-8",
            source=source,
            line=line,
            reason=NOT_UTF8,
        ) from e
    if not text.strip():
        return None
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        detail = f"malformed JSON at column {e.colno}: {e.msg}"
        raise DataError(detail, source=source, line=line, reason=BAD_JSON) from e
    if not isinstance(row, dict):
        raise DataError(
            f"expected a JSON object, got {type(row).__name__}",
            source=source,
            line=line,
            reason=NOT_OBJECT,
        )
    return row


def detect_format(
    row: Mapping[str, Any], *, source: str = "<row>", index: int | None = None
) -> str:
    """The row's shape: ``"explicit"``, ``"implicit"``, ``"conversational"`` or
    ``"conversational_implicit"``.

    The ``chosen`` field decides text versus conversation (a string or a list); the presence of
    ``prompt`` decides explicit versus implicit. The other fields are checked by
    :func:`validate_row`.
    """
    if not isinstance(row, Mapping):
        raise DataError(
            f"expected a dict, got {type(row).__name__}",
            source=source,
            index=index,
            reason=NOT_OBJECT,
        )
    if "chosen" not in row:
        raise DataError(
            "missing; a preference row needs 'chosen' and 'rejected'",
            source=source,
            index=index,
            field="chosen",
            reason=MISSING_FIELD,
        )
    chosen = row["chosen"]
    if isinstance(chosen, str):
        return EXPLICIT if "prompt" in row else IMPLICIT
    if isinstance(chosen, list):
        return CONVERSATIONAL if "prompt" in row else CONVERSATIONAL_IMPLICIT
    raise DataError(
        f"expected a string or a list of {{'role', 'content'}} messages, got {type(chosen).__name__}",
        source=source,
        index=index,
        field="chosen",
        reason=WRONG_TYPE,
    )


def is_conversational_format(fmt: str) -> bool:
    """Whether a shape from :func:`detect_format` holds message lists rather than strings."""
    return fmt in (CONVERSATIONAL, CONVERSATIONAL_IMPLICIT)


def prompt_split(chosen: Sequence[Any], rejected: Sequence[Any]) -> int:
    """Where trl's ``extract_prompt`` ends the implicit prompt (du:548-632, ``trl.extract_prompt``).

    The prompt is the longest common prefix of ``chosen`` and ``rejected``: of characters for
    strings, of messages for conversations. For strings, when the character before the divergence
    is a space, the split moves back one so that the space starts the completions. When one is a
    prefix of the other, trl's loop runs out and leaves the split one element short of the shorter
    length, so the completion keeps its last element ("abc" / "abcdef" -> "ab" | "c", "cdef").

    Returns 0 where the two differ at their first element. (trl then computes ``idx - 1 = -1``
    whenever ``chosen`` ends with a space, and returns ``chosen[:-1]`` as the prompt; a row with
    no shared prefix is rejected by :func:`validate_row` before that can matter.)

    Both sequences must be non-empty and different.
    """
    for i in range(min(len(chosen), len(rejected))):
        if chosen[i] != rejected[i]:
            return i - 1 if i > 0 and chosen[i - 1] == " " else i
    return min(len(chosen), len(rejected)) - 1


def extract_prompt(chosen: Sequence[Any], rejected: Sequence[Any]) -> tuple[Any, Any, Any]:
    """Split an implicit-prompt pair into ``(prompt, chosen, rejected)`` as trl does.

    Example: ``extract_prompt("the sky is blue", "the sky is bright")`` returns
    ``("the sky is b", "lue", "right")``; see :func:`prompt_split` for the rule.
    """
    split = prompt_split(chosen, rejected)
    return chosen[:split], chosen[split:], rejected[split:]


def validate_row(row: Mapping[str, Any], *, source: str, index: int) -> Mapping[str, Any]:
    """Check one row and return it unchanged, or raise :class:`DataError`.

    Checks, each naming ``source``, ``index`` and the field:

    - ``chosen`` and ``rejected`` are present (``missing_field``);
    - every field is a string, or, for conversations, a list of dicts with string ``role`` and
      ``content``, and all fields share one kind (``wrong_type``);
    - ``chosen`` and ``rejected`` are not empty (``empty_completion``) and differ
      (``identical_completions``);
    - a conversational prompt is not an empty list (the chat template cannot render it), and an
      implicit prompt, the shared prefix, is not empty (``empty_prompt``). An explicit string
      prompt may be ``""``: the tokenizer's BOS is then the whole context.
    """
    fmt = detect_format(row, source=source, index=index)
    if "rejected" not in row:
        raise DataError(
            "missing; a preference row needs 'chosen' and 'rejected'",
            source=source,
            index=index,
            field="rejected",
            reason=MISSING_FIELD,
        )
    conversational = is_conversational_format(fmt)
    fields = (
        ("prompt", "chosen", "rejected")
        if fmt in (EXPLICIT, CONVERSATIONAL)
        else ("chosen", "rejected")
    )
    for field in fields:
        _check_type(row[field], conversational, source=source, index=index, field=field)
    for field in ("chosen", "rejected"):
        if len(row[field]) == 0:
            raise DataError(
                "is empty; a completion needs at least one "
                + ("message" if conversational else "character"),
                source=source,
                index=index,
                field=field,
                reason=EMPTY_COMPLETION,
            )
    if row["chosen"] == row["rejected"]:
        raise DataError(
            "is identical to 'chosen'; the pair carries no preference",
            source=source,
            index=index,
            field="rejected",
            reason=IDENTICAL_COMPLETIONS,
        )
    _check_prompt_not_empty(row, fmt, source=source, index=index)
    return row


def _check_type(value: Any, conversational: bool, *, source: str, index: int, field: str) -> None:
    """A string for standard rows; a list of role/content messages for conversational ones."""

    def fail(detail: str) -> DataError:
        return DataError(detail, source=source, index=index, field=field, reason=WRONG_TYPE)

    if not conversational:
        if not isinstance(value, str):
            raise fail(f"expected a string like 'chosen', got {type(value).__name__}")
        return
    if not isinstance(value, list):
        raise fail(f"expected a list of messages like 'chosen', got {type(value).__name__}")
    for k, message in enumerate(value):
        if not isinstance(message, dict):
            raise fail(f"message {k} is a {type(message).__name__}, expected a dict")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                got = type(message[key]).__name__ if key in message else "nothing"
                raise fail(f"message {k}: expected a string '{key}', got {got}")


def _check_prompt_not_empty(row: Mapping[str, Any], fmt: str, *, source: str, index: int) -> None:
    """Reject an empty conversational prompt and an implicit pair with no shared prefix."""
    if fmt == CONVERSATIONAL and len(row["prompt"]) == 0:
        raise DataError(
            "is an empty list of messages; the chat template cannot render an empty conversation",
            source=source,
            index=index,
            field="prompt",
            reason=EMPTY_PROMPT,
        )
    if (
        fmt in (IMPLICIT, CONVERSATIONAL_IMPLICIT)
        and prompt_split(row["chosen"], row["rejected"]) == 0
    ):
        unit = "message" if fmt == CONVERSATIONAL_IMPLICIT else "character"
        raise DataError(
            f"the implicit prompt, the shared prefix of 'chosen' and 'rejected', is empty: they "
            f"differ from their first {unit} (or share only a leading space); give an explicit "
            "'prompt'",
            source=source,
            index=index,
            field="prompt",
            reason=EMPTY_PROMPT,
        )


def validate_rows(rows: Sequence[Mapping[str, Any]], *, source: str) -> str:
    """Check every row (:func:`validate_row`) and that all share the first row's shape; return it.

    A data set of one shape is what trl's ``DPOTrainer`` takes (its columns have one type); our
    own tokenizer formats row by row and does not need this.

    Raises:
        DataError: for an empty set (``no_rows``), the first invalid row, or the first row of
            another shape than row 0 (``mixed_shapes``, naming ``chosen`` for text versus
            messages and ``prompt`` for explicit versus implicit).
    """
    if not rows:
        raise DataError("no rows", source=source, reason=NO_ROWS)
    shape = None
    for index, row in enumerate(rows):
        validate_row(row, source=source, index=index)
        row_shape = detect_format(row, source=source, index=index)
        shape = shape or row_shape
        if row_shape != shape:
            same_kind = is_conversational_format(row_shape) == is_conversational_format(shape)
            raise DataError(
                f"this row is {row_shape} but row 0 is {shape}; all rows need one shape",
                source=source,
                index=index,
                field="prompt" if same_kind else "chosen",
                reason=MIXED_SHAPES,
            )
    return shape
