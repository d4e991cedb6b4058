"""Resolve a run's inputs: model path, tokenizer, train and held-out rows, tokenized.

Unset ``--model`` / ``--dataset`` fall back to the embedded default (``training.embedded.assets``),
which is built offline and cached on disk. Each source is prepared once and cached
(``training.inputs.prepared``); its records are checked, split into train and held-out and
accounted for file by file (``training.inputs.prepared_parts``, ``row_checks.report_source``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from dpo_core.data import PROMPT_FILLS_MAX_LENGTH
from training.base.config import FitConfig
from training.embedded.assets import prepare_embedded
from training.inputs.data_module import PreferenceData, split_heldout
from training.inputs.gguf import as_model_dir
from training.inputs.model_loading import load_tokenizer
from training.inputs.prepared import prepare_source
from training.inputs.prepared_parts import (
    CheckedSource,
    check_chat_template,
    check_prepared,
    tokenized_part,
)
from training.inputs.row_checks import Part, report_source

log = logging.getLogger(__name__)


# The DPO recipe of the embedded task (``training.embedded.assets``): used by ``python -m training.fit``
# with no model and no data, for every field the user did not set. Measured on this 2-core CPU:
# see the README's "Embedded default" table.
EMBEDDED_RECIPE: dict[str, dict[str, Any]] = {
    "optim": {"learning_rate": 1e-4, "warmup_steps": 10},
    "trainer": {"max_steps": 120, "batch_size": 16, "output_dir": "runs/embedded"},
    "dpo": {"beta": 0.1},
    "data": {"eval_max_pairs": None},  # the task's whole held-out file (200 pairs)
}


def apply_embedded_recipe(cfg, explicit: set[str]):
    """A copy of ``cfg`` whose fields not in ``explicit`` take ``EMBEDDED_RECIPE``'s values
    (no warm-up under ``--lr-scheduler-type constant``, which has none)."""
    if cfg.optim.lr_scheduler_type == "constant":
        explicit = {*explicit, "warmup_steps"}
    groups = {}
    for group, values in EMBEDDED_RECIPE.items():
        current = getattr(cfg, group)
        changes = {k: v for k, v in values.items() if k not in explicit}
        groups[group] = dataclasses.replace(current, **changes)
    return dataclasses.replace(cfg, **groups)


@dataclass
class RunInputs:
    """What a run trains on.

    Attributes:
        model_path: directory or hub id of the starting policy.
        tokenizer: its tokenizer (pad token set).
        data: tokenized train and held-out features (read from Arrow on disk).
        train_digest, heldout_digest: ``N rows, sha256 <hex>`` of the rows each part keeps, for
            the data fingerprint ``--resume`` compares (``training.run.resume``).
        embedded: the embedded-default assets when used (with the task's judge), else None.
    """

    model_path: str
    tokenizer: Any
    data: PreferenceData
    train_digest: str
    heldout_digest: str
    embedded: Any = None


@dataclass
class RowSets:
    """The checked rows of the run's sources and what each part trains or evaluates on.

    Attributes:
        train_file, heldout_file: the training source's valid rows, and the held-out source's
            (None when the held-out pairs are split off the training source).
        train, heldout: each part's rows, as positions among its source's valid rows.
        heldout_note: for the "held-out: N pairs (...)" line.
    """

    train_file: CheckedSource
    heldout_file: CheckedSource | None
    train: np.ndarray
    heldout: np.ndarray
    heldout_note: str

    @property
    def heldout_source(self) -> CheckedSource:
        return self.heldout_file or self.train_file


def _read(cfg: FitConfig, tokenizer, source, split: str, max_rows=None) -> CheckedSource:
    """The valid rows of one source (``--max-rows`` read at most), tokenized: from the cache of
    prepared sources, or prepared now (``training.inputs.prepared``)."""
    prepared = prepare_source(source, split, tokenizer, cfg.data, max_rows=max_rows)
    return check_prepared(prepared, skip_invalid=cfg.data.skip_invalid)


def _rows_and_sources(cfg: FitConfig, tokenizer, embedded) -> RowSets:
    """The run's rows. ``--max-rows`` cuts the rows read before the held-out share is split off;
    ``--eval-max-pairs`` caps the held-out set (the first pairs of an eval set)."""
    d = cfg.data
    cap = d.eval_max_pairs
    limit = "" if cap is None else f", at most {cap}"
    change = "--eval-max-pairs to change"
    if d.dataset is None:
        train = _read(cfg, tokenizer, embedded.train_file, "train", d.max_rows)
        held = _read(cfg, tokenizer, embedded.eval_file, "train")
    else:
        train = _read(cfg, tokenizer, d.dataset, d.split, d.max_rows)
        if d.eval_dataset or d.eval_split:
            held = _read(cfg, tokenizer, d.eval_dataset or d.dataset, d.eval_split or d.split)
        else:
            return _split_off_heldout(cfg, train)
    n = held.num_valid
    taken = f"all {n}" if cap is None or cap >= n else f"the first {cap} of {n}"
    note = f"{taken} in {held.source}{limit}; {change}"
    every = np.arange(train.num_valid)
    return RowSets(train, held, every, np.arange(n)[:cap], note)


def _split_off_heldout(cfg: FitConfig, rows: CheckedSource) -> RowSets:
    """``--eval-fraction`` of the valid rows read, at most ``--eval-max-pairs``, held out."""
    d = cfg.data
    positions = list(range(rows.num_valid))
    train, held = split_heldout(
        positions, d.eval_fraction, cfg.trainer.seed, max_rows=d.eval_max_pairs
    )
    limit = "" if d.eval_max_pairs is None else f", at most {d.eval_max_pairs}"
    counted = (
        f"{len(positions)} valid rows of the {rows.num_read} read"
        if rows.skipped
        else f"{len(positions)} rows read"
    )
    note = (
        f"{d.eval_fraction:.0%} of the {counted}{limit}; --eval-fraction, --eval-max-pairs to "
        "change"
    )
    return RowSets(rows, None, np.asarray(train, np.int64), np.asarray(held, np.int64), note)


def prepare_inputs(cfg: FitConfig) -> RunInputs:
    """Build or load everything the run reads, and tokenize it as trl would."""
    embedded = None
    if cfg.model.model is None or cfg.data.dataset is None:
        embedded = prepare_embedded(log=log.info)
    model_path = as_model_dir(cfg.model.model) if cfg.model.model else str(embedded.model_dir)
    if not cfg.model.model:
        log.info("model: embedded default (%s)", model_path)
    tokenizer = load_tokenizer(model_path, trust_remote_code=cfg.model.trust_remote_code)
    rows = _rows_and_sources(cfg, tokenizer, embedded)
    model = cfg.model.model or model_path
    check_chat_template(rows.train_file, rows.train, model)
    check_chat_template(rows.heldout_source, rows.heldout, model)
    skip = cfg.data.skip_invalid
    train, train_part, train_digest, merged = tokenized_part(
        rows.train_file, rows.train, "train", skip_invalid=skip
    )
    _note_merges(rows.train_file.source, "train", merged)
    held, held_part, held_digest, merged = tokenized_part(
        rows.heldout_source, rows.heldout, "held-out", skip_invalid=skip
    )
    _note_merges(rows.heldout_source.source, "held-out", merged)
    _report(rows, train_part, held_part, cfg.data.max_length)
    if not len(train):
        raise ValueError(
            f"{rows.train_file.source}: no training rows left after tokenization and filtering"
        )
    log.info("held-out: %d pairs (%s)", len(held), rows.heldout_note)
    dropped = _dropped_counts(rows, train_part, held_part)
    data = PreferenceData(train=train, heldout=held, dropped=dropped)
    return RunInputs(model_path, tokenizer, data, train_digest, held_digest, embedded)


def _note_merges(source: str, name: str, merged: int) -> None:
    if merged:
        log.info(
            "%s (%s): in %d rows the prompt's last tokens merged with the completion's first; "
            "the completion starts at the merged token (as in trl)",
            source,
            name,
            merged,
        )


def _report(rows: RowSets, train: Part, held: Part, max_length: int | None) -> None:
    """One account per source file (``row_checks.report_source``)."""
    if rows.heldout_file is None:
        report_source(rows.train_file, [train, held], max_length)
    else:
        report_source(rows.train_file, [train], max_length)
        report_source(rows.heldout_file, [held], max_length)


def _dropped_counts(rows: RowSets, train: Part, held: Part) -> dict[str, int]:
    """Rows left out, per reason, for report.md: ``train/<reason>`` counts the rows of the
    training source (its held-out share included), ``heldout/<reason>`` those of a separate
    held-out source."""
    counts: Counter = Counter()
    held_prefix = "train" if rows.heldout_file is None else "heldout"
    for prefix, errors in (
        ("train", rows.train_file.skipped),
        (held_prefix, rows.heldout_file.skipped if rows.heldout_file else []),
    ):
        counts.update(f"{prefix}/{e.reason}" for e in errors)
    for prefix, part in (("train", train), ("heldout", held)):
        counts.update(f"{prefix}/{e.reason}" for e in part.skipped)
        counts.update({f"{prefix}/{PROMPT_FILLS_MAX_LENGTH}": len(part.too_long)})
    return {k: n for k, n in sorted(counts.items()) if n}
