"""One row read -> its token ids, or why it cannot be used: the function ``Dataset.map`` runs.

:func:`prepare_batch` is pure (its output depends only on its rows and settings), so it runs in
any number of processes (``--dataset-num-proc``) and its result can be cached. It never raises
for a bad row: every row gets a record (:data:`FEATURES`) with its token ids, its place in its
file, its shape, and, when it cannot be used, the stage, reason, field and detail of its error.
``training.inputs.prepared`` then raises or reports those errors in file order, each named by
its line or data row, as ``training.inputs.row_checks`` does for rows in memory.

Stages of a row's error:

- ``check``: ``dpo_core.rows.validate_row`` refused it (it does not count as a row read validly);
- ``no_template``: a conversational row, and the tokenizer has no chat template;
- ``tokenize``: it tokenizes to no completion token (``dpo_core.data.tokenize_row``).

Tokenization is ``dpo_core.data``'s, token for token as trl's ``DPOTrainer``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import datasets

from dpo_core.data import encode_formatted, format_row, prompt_fills_max_length, split_prompt
from dpo_core.rows import DataError, Place, detect_format, is_conversational_format, validate_row
from training.inputs.raw_sources import LINE, ROW, ROW_JSON

CHECK, NO_TEMPLATE, TOKENIZE = "check", "no_template", "tokenize"
TOKEN_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")

# The prepared set's columns: one record per row read.
FEATURES = datasets.Features(
    {
        **{name: datasets.Sequence(datasets.Value("int32")) for name in TOKEN_COLUMNS},
        "line": datasets.Value("int64"),
        "row": datasets.Value("int64"),
        "shape": datasets.Value("string"),
        "stage": datasets.Value("string"),
        "reason": datasets.Value("string"),
        "field": datasets.Value("string"),
        "detail": datasets.Value("string"),
        "too_long": datasets.Value("bool"),
        "merged": datasets.Value("bool"),
        "row_sha256": datasets.Value("string"),
    }
)


@dataclass(frozen=True)
class PrepSettings:
    """Everything besides the tokenizer that decides a row's record.

    Attributes:
        source: the name errors use.
        max_length, truncation_mode: trl's; rows whose prompt alone fills ``max_length`` are
            marked ``too_long`` (trl drops them).
        columns: the source's names for (prompt, chosen, rejected).
    """

    source: str
    max_length: int | None
    truncation_mode: str
    columns: tuple[str, str, str] = ("prompt", "chosen", "rejected")


STANDARD_COLUMNS = ("prompt", "chosen", "rejected")
COLUMN_FLAGS = dict(
    zip(STANDARD_COLUMNS, ("--prompt-column", "--chosen-column", "--rejected-column"), strict=True)
)


def rename_columns(row: Any, columns: tuple[str, str, str]) -> Any:
    """``row`` with its ``columns`` named prompt / chosen / rejected. Other keys are kept, except
    those with a standard name that another column now fills."""
    if not isinstance(row, dict) or columns == STANDARD_COLUMNS:
        return row
    renamed = {k: v for k, v in row.items() if k not in columns and k not in STANDARD_COLUMNS}
    for standard, theirs in zip(STANDARD_COLUMNS, columns, strict=True):
        if theirs in row:
            renamed[standard] = row[theirs]
    return renamed


def source_field(name: str | None, columns: tuple[str, str, str]) -> str | None:
    """The source's own name of a standard field, with its flag when it was mapped."""
    if name not in STANDARD_COLUMNS:
        return name
    theirs = columns[STANDARD_COLUMNS.index(name)]
    return name if theirs == name else f"{theirs} ({COLUMN_FLAGS[name]})"


def prepare_batch(
    batch: dict[str, list], indices: list[int], *, tokenizer, settings: PrepSettings
) -> dict[str, list]:
    """The records (:data:`FEATURES`) of a batch of raw rows (``raw_sources`` layout)."""
    records, pending = [], []
    for row, place, index in zip(*_rows_and_places(batch, indices), indices, strict=True):
        record, formatted = checked_row(row, place, index, tokenizer, settings)
        records.append(record)
        if formatted is not None:
            pending.append((len(records) - 1, formatted, index))
    encoded = encode_formatted([row for _, row, _ in pending], tokenizer)  # one batched call
    for (i, _, index), ids in zip(pending, encoded, strict=True):
        records[i] = tokenized_record(records[i], ids, index, settings)
    return {name: [r[name] for r in records] for name in FEATURES}


def _rows_and_places(batch: dict[str, list], indices: list[int]) -> tuple[list, list[Place]]:
    """The rows of a batch as dicts, and their places (JSON-text rows carry theirs)."""
    if ROW_JSON in batch:
        rows = [json.loads(text) for text in batch[ROW_JSON]]
        places = [Place(line=ln, row=r) for ln, r in zip(batch[LINE], batch[ROW], strict=True)]
        return rows, places
    names = list(batch)
    rows = [dict(zip(names, values)) for values in zip(*batch.values())]
    return rows, [Place(row=i + 1) for i in indices]


def checked_row(
    row: Any, place: Place, index: int, tokenizer, settings: PrepSettings
) -> tuple[dict, dict | None]:
    """A row's record so far and the row formatted for tokenizing, or its record with the stage
    and located cause of its error and None."""
    digest = hashlib.sha256(json.dumps(row, sort_keys=True, default=str).encode()).hexdigest()
    record = {**_empty_record(), "line": place.line, "row": place.row, "row_sha256": digest}
    row = rename_columns(row, settings.columns)
    try:
        validate_row(row, source=settings.source, index=index)
        record["shape"] = detect_format(row)
    except DataError as err:
        return {**record, **_error(CHECK, err, settings)}, None
    if is_conversational_format(record["shape"]) and not getattr(tokenizer, "chat_template", None):
        return {**record, "stage": NO_TEMPLATE}, None
    try:
        eos = tokenizer.eos_token
        return record, format_row(row, eos_token=eos, source=settings.source, index=index)
    except DataError as err:
        return {**record, **_error(TOKENIZE, err, settings)}, None


def tokenized_record(record: dict, ids: tuple, index: int, settings: PrepSettings) -> dict:
    """``record`` with the row's ids split at the prompt (``dpo_core.data.split_prompt``), or
    the tokenize-stage error of a completion with no token."""
    try:
        split, merged = split_prompt(*ids, source=settings.source, index=index)
    except DataError as err:
        return {**record, **_error(TOKENIZE, err, settings)}
    too_long = prompt_fills_max_length(
        split["prompt_ids"], settings.max_length, settings.truncation_mode
    )
    return {**record, **split, "too_long": too_long, "merged": merged > 0}


def _empty_record() -> dict:
    return {
        **{name: [] for name in TOKEN_COLUMNS},
        **{name: "" for name in ("shape", "stage", "reason", "field", "detail")},
        "too_long": False,
        "merged": False,
    }


def _error(stage: str, err: DataError, settings: PrepSettings) -> dict:
    field = source_field(err.field, settings.columns)
    return {"stage": stage, "reason": err.reason, "field": field or "", "detail": err.detail}


def record_error(record: dict, source: str) -> DataError:
    """The located ``DataError`` a record with an error stands for."""
    place = Place(line=record["line"], row=record["row"])
    return DataError(
        record["detail"],
        source=source,
        reason=record["reason"],
        field=record["field"] or None,
        place=place,
    )
