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

Every problem raises :class:`DataError` (``dpo_core.errors``), whose message names the source, the
row (or its :class:`Place` in the file: line or data row) and the field, and whose ``reason`` is a
short code a caller can count rows by.

This module holds the one row validator (:func:`validate_row`; :func:`validate_rows` for a whole
set, which must hold one shape) and re-exports the one JSONL writer and reader
(``dpo_core.jsonl``: :func:`write_jsonl`, :func:`read_jsonl`, :func:`read_jsonl_rows`). Other file
formats are read by ``training.inputs.sources``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from dpo_core.errors import (
    BAD_GZIP,
    BAD_JSON,
    COMPLETION_ROLE,
    EMPTY_COMPLETION,
    EMPTY_PROMPT,
    IDENTICAL_COMPLETIONS,
    MISSING_FIELD,
    MIXED_SHAPES,
    NO_ROWS,
    NOT_OBJECT,
    NOT_UTF8,
    UNKNOWN_ROLE,
    UNREADABLE,
    WRONG_TYPE,
    DataError,
    Place,
)
from dpo_core.jsonl import JsonlRows, read_jsonl, read_jsonl_rows, write_jsonl

# The errors and the JSONL reader are re-exported: callers find them here, next to the validator.
__all__ = [
    "CONVERSATIONAL",
    "CONVERSATIONAL_IMPLICIT",
    "EXPLICIT",
    "IMPLICIT",
    "ROLES",
    "detect_format",
    "extract_prompt",
    "is_conversational_format",
    "prompt_split",
    "common_prefix",
    "validate_row",
    "validate_rows",
    "BAD_GZIP",
    "BAD_JSON",
    "EMPTY_COMPLETION",
    "EMPTY_PROMPT",
    "IDENTICAL_COMPLETIONS",
    "MISSING_FIELD",
    "MIXED_SHAPES",
    "NOT_OBJECT",
    "NOT_UTF8",
    "NO_ROWS",
    "UNKNOWN_ROLE",
    "UNREADABLE",
    "WRONG_TYPE",
    "DataError",
    "JsonlRows",
    "Place",
    "read_jsonl",
    "read_jsonl_rows",
    "write_jsonl",
]

EXPLICIT = "explicit"
IMPLICIT = "implicit"
CONVERSATIONAL = "conversational"
CONVERSATIONAL_IMPLICIT = "conversational_implicit"

# The message roles trl 1.16 accepts (``trl.data_utils.prepare_multimodal_messages``); a chat
# template renders any other role as it is (``<|robot|>``), a turn the model never saw.
ROLES = ("system", "user", "assistant", "tool")


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
    shorter = min(len(chosen), len(rejected))
    i = common_prefix(chosen, rejected)
    if i == shorter:  # one is a prefix of the other
        return shorter - 1
    return i - 1 if i > 0 and chosen[i - 1] == " " else i


def common_prefix(a: Sequence[Any], b: Sequence[Any]) -> int:
    """The length of the longest common prefix of ``a`` and ``b``: the first index where they
    differ, or the shorter length. Strings, lists and tuples by bisection on slices (each
    comparison runs in C: O(n log n) there instead of n Python steps), other sequences (whose
    ``==`` may not be one bool, e.g. arrays) element by element."""
    n = min(len(a), len(b))
    if type(a) is type(b) and isinstance(a, (str, list, tuple)):
        lo, hi = 0, n  # a[:lo] == b[:lo], and they differ before hi + 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if a[lo:mid] == b[lo:mid]:
                lo = mid
            else:
                hi = mid - 1
        return lo
    return next((i for i in range(n) if a[i] != b[i]), n)


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
      ``content``, and all fields share the kind of ``chosen`` (``wrong_type``);
    - every message's role is one trl accepts, :data:`ROLES` (``unknown_role``), and each
      completion starts and ends with an ``assistant`` message: it is the model's reply
      (``completion_role``);
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
    # 'chosen' first: its kind (text or messages) is the one the other fields are held to.
    fields = ("chosen", "rejected", "prompt") if "prompt" in row else ("chosen", "rejected")
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
    if conversational:
        _check_completion_roles(row, fmt, source=source, index=index)
    return row


def _check_completion_roles(row: Mapping[str, Any], fmt: str, *, source: str, index: int) -> None:
    """Each completion of a conversational row (after the implicit prompt, if any) is the model's
    reply: its first and last messages are ``assistant`` turns (turns between them may be
    anything, a multi-turn completion as trl trains it)."""
    start = 0 if fmt == CONVERSATIONAL else prompt_split(row["chosen"], row["rejected"])
    for field in ("chosen", "rejected"):
        last = len(row[field]) - 1
        for k in dict.fromkeys((start, last)):
            role = row[field][k]["role"]
            if role != "assistant":
                raise DataError(
                    f"message {k} has role {role!r}; a completion is the model's reply: it "
                    "starts and ends with an 'assistant' message",
                    source=source,
                    index=index,
                    field=field,
                    reason=COMPLETION_ROLE,
                )


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
            raise fail(
                f"message {k} is a {type(message).__name__}, expected a {{'role', 'content'}} dict"
            )
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                got = type(message[key]).__name__ if key in message else "nothing"
                raise fail(f"message {k}: expected a string '{key}', got {got}")
        if message["role"] not in ROLES:
            raise DataError(
                f"message {k} has role {message['role']!r}; expected one of "
                + ", ".join(repr(r) for r in ROLES),
                source=source,
                index=index,
                field=field,
                reason=UNKNOWN_ROLE,
            )


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
