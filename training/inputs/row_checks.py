"""The rows of one source, checked where they sit in their file, and an account of what became of
them.

Rows are validated where they are prepared (``training.inputs.row_prep``, checked by
``training.inputs.prepared_parts``), each error located at the row's place in its file (line or
data row, never a position after a split). A source that mixes row shapes (explicit,
implicit-prompt, conversational) gets a note with the count of each (:func:`note_mixed_shapes`):
each row is formatted by its own shape, which trl's ``DPOTrainer`` (one shape per data set) would
not take.

:func:`report_source` logs one account per source file, in the file's own counts: rows read,
kept (train / held-out), skipped (each with its line or row and why) and dropped because the
prompt alone fills ``--max-length`` (as trl drops them).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

from dpo_core.rows import DataError, Place

log = logging.getLogger(__name__)

# Skipped rows listed one per line in the account; the rest are counted.
MAX_LISTED = 20


def file_order(err: DataError) -> tuple[int, int]:
    """Sort key of located errors: their place in the file."""
    return (err.row or 0, err.line or 0)


def note_mixed_shapes(source: str, shapes: dict[str, tuple[int, Place]]) -> None:
    """A note, not an error: our tokenizer formats row by row, so mixed shapes train, but a mix
    is often a data mistake, and trl would refuse it."""
    if len(shapes) < 2:
        return
    counts = ", ".join(
        f"{count} {shape} (first at {first})" for shape, (count, first) in shapes.items()
    )
    log.warning(
        "note: %s mixes row shapes: %s. Each row is formatted by its own shape; trl's "
        "DPOTrainer takes one shape per data set.",
        source,
        counts,
    )


@dataclass
class Part:
    """The rows of a source that went to one use (``"train"``, ``"held-out"``), tokenized.

    Attributes:
        name: the use.
        given: rows of the source given to this use.
        kept: rows kept after tokenization.
        skipped: rows left out at tokenization under ``--skip-invalid``, located.
        too_long: places of the rows dropped because the prompt alone fills ``max_length``.
    """

    name: str
    given: int
    kept: int
    skipped: list[DataError]
    too_long: list[Place]


def report_source(src, parts: list[Part], max_length: int | None) -> None:
    """Log what became of the rows of ``src`` (a ``SourceRows`` or a ``CheckedSource``: its
    ``source``, ``num_read``, ``num_valid`` and ``skipped``) (WARNING when some were left out, else INFO):

    ``prefs.jsonl: 40 rows read, 37 kept (35 train, 2 held-out); skipped 2 (--skip-invalid:
    1 bad_json, 1 wrong_type); dropped 1 (prompt_fills_max_length)``, then one line per skipped
    row, naming its line or row, its field and why.
    """
    skipped = sorted(src.skipped + [e for p in parts for e in p.skipped], key=file_order)
    too_long = sorted((pl for p in parts for pl in p.too_long), key=_place_order)
    kept = ", ".join(f"{p.kept} {p.name}" for p in parts)
    head = f"{src.source}: {src.num_read} rows read, {sum(p.kept for p in parts)} kept ({kept})"
    if skipped:
        reasons = Counter(e.reason for e in skipped)
        head += f"; skipped {len(skipped)} (--skip-invalid: " + _counts(reasons) + ")"
    if too_long:
        head += f"; dropped {len(too_long)} (prompt_fills_max_length)"
    unused = src.num_valid - sum(p.given for p in parts)
    if unused:
        head += f"; {unused} valid rows not used (--eval-max-pairs)"
    if not skipped and not too_long:
        log.info(head)
        return
    lines = [head] + [f"  skipped {e}" for e in skipped[:MAX_LISTED]]
    if len(skipped) > MAX_LISTED:
        lines.append(f"  ... and {len(skipped) - MAX_LISTED} more skipped")
    if too_long:
        where = ", ".join(str(p) for p in too_long[:MAX_LISTED])
        more = f" and {len(too_long) - MAX_LISTED} more" if len(too_long) > MAX_LISTED else ""
        lines.append(
            f"  dropped, the prompt alone has >= {max_length} tokens (trl drops these too): "
            f"{where}{more}"
        )
    log.warning("\n".join(lines))


def _place_order(place: Place) -> tuple[int, int]:
    return (place.row or 0, place.line or 0)


def _counts(counter: Counter) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in counter.most_common())
