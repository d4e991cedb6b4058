"""The records of a prepared source, checked, split into parts and accounted for, in the file's
own places, on the Arrow columns, so a source of any size costs a few bytes a row here.

- :func:`check_prepared`: the rows read validly; the first invalid one raises, named by its line
  or data row and field (unless ``--skip-invalid``: then skipped and kept for the account); a
  note when the source mixes row shapes.
- :func:`tokenized_part`: the rows one use (train, held-out) keeps after tokenization, as
  ``FeatureRows``, with a ``row_checks.Part`` account and the digest ``--resume`` compares.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dpo_core.rows import NO_ROWS, DataError, Place
from training.base.errors import RunError
from training.inputs.features import FeatureRows
from training.inputs.prepared import PreparedSource
from training.inputs.row_checks import Part, file_order, note_mixed_shapes
from training.inputs.row_prep import CHECK, NO_TEMPLATE, TOKENIZE, record_error

# Stage codes of the ``stage`` column (``row_prep``): 0 is a usable row.
STAGES = ("", CHECK, NO_TEMPLATE, TOKENIZE)


@dataclass
class CheckedSource:
    """A prepared source's valid rows.

    Attributes:
        prepared: the source's records.
        valid: record positions of the rows read validly, in file order.
        skipped: errors of the entries skipped (reading and checking), in file order.
        stages: each record's stage code (index into ``STAGES``).
    """

    prepared: PreparedSource
    valid: np.ndarray
    stages: np.ndarray
    skipped: list[DataError] = field(default_factory=list)

    @property
    def source(self) -> str:
        return self.prepared.source

    @property
    def num_read(self) -> int:
        return self.prepared.num_read

    @property
    def num_valid(self) -> int:
        return len(self.valid)


def _column(records, name: str) -> pa.ChunkedArray:
    return records.data.column(name)


def _errors_at(prepared: PreparedSource, positions: np.ndarray) -> list[DataError]:
    """The located errors of the records at ``positions``."""
    rows = prepared.records.select(positions.tolist()) if len(positions) else []
    return [record_error(r, prepared.source) for r in rows]


def check_prepared(prepared: PreparedSource, *, skip_invalid: bool) -> CheckedSource:
    """The valid rows of ``prepared``; an invalid one raises, or with ``skip_invalid`` is kept
    in ``skipped``.

    Raises:
        DataError: naming the file, the row's line or data row and the field, for the first
            malformed entry or invalid row (unless ``skip_invalid``); ``no_rows`` for a source
            with no rows, or none valid.
    """
    records = prepared.records
    if not len(records) and not prepared.skipped:
        raise DataError("no rows", source=prepared.source, reason=NO_ROWS)
    if prepared.skipped and not skip_invalid:  # cached by a run with --skip-invalid
        raise prepared.skipped[0]
    stages = pc.index_in(_column(records, "stage"), value_set=pa.array(STAGES)).to_numpy()
    invalid = np.flatnonzero(stages == STAGES.index(CHECK))
    if len(invalid) and not skip_invalid:
        raise _errors_at(prepared, invalid[:1])[0]
    skipped = sorted(prepared.skipped + _errors_at(prepared, invalid), key=file_order)
    checked = CheckedSource(prepared, np.flatnonzero(stages != STAGES.index(CHECK)), stages)
    checked.skipped = skipped
    if not checked.num_valid:
        raise DataError(
            f"no valid rows: all {prepared.num_read} rows read were skipped (--skip-invalid); "
            f"the first: {skipped[0]}",
            source=prepared.source,
            reason=NO_ROWS,
        )
    note_mixed_shapes(prepared.source, _shape_counts(prepared, checked.valid))
    return checked


def _shape_counts(prepared: PreparedSource, valid: np.ndarray) -> dict[str, tuple[int, Place]]:
    """Each shape of the valid rows: how many rows, and the place of the first."""
    shapes = _column(prepared.records, "shape").take(pa.array(valid))
    counts = {}
    for entry in pc.value_counts(shapes).to_pylist():
        first = int(valid[pc.index(shapes, entry["values"]).as_py()])
        record = prepared.records[first]
        counts[entry["values"]] = (entry["counts"], Place(line=record["line"], row=record["row"]))
    return counts


def tokenized_part(
    checked: CheckedSource, chosen: np.ndarray, name: str, *, skip_invalid: bool
) -> tuple[FeatureRows, Part, str, int]:
    """The features of one use of the source: rows ``chosen`` (positions among the valid rows).

    Returns the features, the part's account (rows skipped at tokenization, rows dropped because
    the prompt alone fills ``max_length``), the ``--resume`` digest of the rows kept
    (``N rows, sha256 <hex>``) and how many kept rows had tokens merged across the boundary.

    Raises:
        DataError: for a row that tokenizes to no completion token (unless ``skip_invalid``).
    """
    prepared = checked.prepared
    positions = checked.valid[np.asarray(chosen, dtype=np.int64)]
    stages = checked.stages[positions]
    errors = _errors_at(prepared, positions[stages == STAGES.index(TOKENIZE)])
    if errors and not skip_invalid:
        raise errors[0]
    usable = positions[stages == 0]
    too_long = _column(prepared.records, "too_long").take(pa.array(usable)).to_numpy(False)
    kept = usable[~too_long]
    dropped = _places(prepared, usable[too_long])
    merged = int(np.sum(_column(prepared.records, "merged").take(pa.array(kept)).to_numpy(False)))
    part = Part(name, len(positions), len(kept), errors, dropped)
    return FeatureRows(prepared.records, kept), part, rows_digest(prepared, kept), merged


def check_chat_template(checked: CheckedSource, chosen: np.ndarray, model: str) -> None:
    """Conversational rows are rendered by the tokenizer's chat template: a ``RunError`` naming
    the model and the file when it has none (transformers' own message names neither)."""
    stages = checked.stages[checked.valid[np.asarray(chosen, dtype=np.int64)]]
    if np.any(stages == STAGES.index(NO_TEMPLATE)):
        raise RunError(
            f"--model {model}: its tokenizer has no chat template, but {checked.source} holds "
            "conversational rows (lists of role/content messages); use a model with a chat "
            "template (an instruct model) or rows of text"
        )


def _places(prepared: PreparedSource, positions: np.ndarray) -> list[Place]:
    if not len(positions):
        return []
    table = prepared.records.data.fast_gather(positions).select(["line", "row"])
    return [Place(line=r["line"], row=r["row"]) for r in table.to_pylist()]


def rows_digest(prepared: PreparedSource, positions: np.ndarray) -> str:
    """``N rows, sha256 <hex>``: sha256 over the rows' own sha256 (of their JSON, keys sorted),
    in order: changes whenever a row read or the rows chosen change."""
    digest = hashlib.sha256()
    column = _column(prepared.records, "row_sha256")
    for start in range(0, len(positions), 65536):
        part = column.take(pa.array(positions[start : start + 65536])).combine_chunks()
        digest.update("".join(part.to_pylist()).encode())
    return f"{len(positions)} rows, sha256 {digest.hexdigest()}"
