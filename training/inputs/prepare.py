"""Resolve a run's inputs: model path, tokenizer, train and held-out rows, tokenized.

Unset ``--model`` / ``--dataset`` fall back to the embedded default (``training.embedded.assets``),
which is built offline and cached on disk.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

from dpo_core.data import PROMPT_FILLS_MAX_LENGTH
from dpo_core.rows import detect_format, is_conversational_format
from training.base.config import FitConfig
from training.base.errors import RunError
from training.embedded.assets import prepare_embedded
from training.inputs.data_module import PreferenceData, split_heldout, tokenize_source
from training.inputs.gguf import as_model_dir
from training.inputs.model_loading import load_tokenizer
from training.inputs.row_checks import Part, check_rows, report_source
from training.inputs.sources import SourceRows, read_source

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
        data: tokenized train and held-out features.
        train_rows, heldout_rows: the raw rows (held-out rows feed generation-based evaluation).
        embedded: the embedded-default assets when used (with the task's judge), else None.
    """

    model_path: str
    tokenizer: Any
    data: PreferenceData
    train_rows: list[dict]
    heldout_rows: list[dict]
    embedded: Any = None


@dataclass
class RowSets:
    """The checked rows of the run's sources and what each part trains or evaluates on.

    Attributes:
        train_file, heldout_file: every valid row of the training source, and of the held-out
            source (None when the held-out pairs are split off the training source).
        train, heldout: the rows of each part, each with its place in its file.
        heldout_note: for the "held-out: N pairs (...)" line.
    """

    train_file: SourceRows
    heldout_file: SourceRows | None
    train: SourceRows
    heldout: SourceRows
    heldout_note: str


def _read(cfg: FitConfig, source, split: str, max_rows: int | None = None) -> SourceRows:
    """The valid rows of one source (``--max-rows`` read at most), each with its place."""
    skip = cfg.data.skip_invalid
    rows = read_source(source, split, skip_invalid=skip, max_rows=max_rows)
    return check_rows(rows, skip_invalid=skip)


def _rows_and_sources(cfg: FitConfig, embedded) -> RowSets:
    """The run's rows. ``--max-rows`` cuts the rows read before the held-out share is split off;
    ``--eval-max-pairs`` caps the held-out set (the first pairs of an eval set)."""
    d = cfg.data
    cap = d.eval_max_pairs
    limit = "" if cap is None else f", at most {cap}"
    change = "--eval-max-pairs to change"
    if d.dataset is None:
        train = _read(cfg, embedded.train_file, "train", d.max_rows)
        held = _read(cfg, embedded.eval_file, "train")
    else:
        train = _read(cfg, d.dataset, d.split, d.max_rows)
        if d.eval_dataset or d.eval_split:
            held = _read(cfg, d.eval_dataset or d.dataset, d.eval_split or d.split)
        else:
            return _split_off_heldout(cfg, train)
    taken = (
        f"all {len(held.rows)}"
        if cap is None or cap >= len(held.rows)
        else f"the first {cap} of {len(held.rows)}"
    )
    note = f"{taken} in {held.source}{limit}; {change}"
    heldout = held.subset(list(range(len(held.rows)))[:cap])
    return RowSets(train, held, train, heldout, note)


def _split_off_heldout(cfg: FitConfig, rows: SourceRows) -> RowSets:
    """``--eval-fraction`` of the valid rows read, at most ``--eval-max-pairs``, held out."""
    d = cfg.data
    positions = list(range(len(rows.rows)))
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
    return RowSets(rows, None, rows.subset(train), rows.subset(held), note)


def check_chat_template(rows: SourceRows, tokenizer, model: str) -> None:
    """Conversational rows are rendered by the tokenizer's chat template: a ``RunError`` naming
    the model and the file when it has none (transformers' own message names neither)."""
    if not rows.rows or getattr(tokenizer, "chat_template", None):
        return
    if is_conversational_format(detect_format(rows.rows[0], source=rows.source)):
        raise RunError(
            f"--model {model}: its tokenizer has no chat template, but {rows.source} holds "
            "conversational rows (lists of role/content messages); use a model with a chat "
            "template (an instruct model) or rows of text"
        )


def prepare_inputs(cfg: FitConfig) -> RunInputs:
    """Build or load everything the run reads, and tokenize it as trl would."""
    embedded = None
    if cfg.model.model is None or cfg.data.dataset is None:
        embedded = prepare_embedded(log=log.info)
    model_path = as_model_dir(cfg.model.model) if cfg.model.model else str(embedded.model_dir)
    if not cfg.model.model:
        log.info("model: embedded default (%s)", model_path)
    tokenizer = load_tokenizer(model_path, trust_remote_code=cfg.model.trust_remote_code)
    rows = _rows_and_sources(cfg, embedded)
    for part in (rows.train, rows.heldout):
        check_chat_template(part, tokenizer, cfg.model.model or model_path)
    train, train_part = tokenize_source(rows.train, tokenizer, cfg, "train")
    held, held_part = tokenize_source(rows.heldout, tokenizer, cfg, "held-out")
    _report(rows, train_part, held_part, cfg.data.max_length)
    if not train:
        raise ValueError(
            f"{rows.train.source}: no training rows left after tokenization and filtering"
        )
    log.info("held-out: %d pairs (%s)", len(held), rows.heldout_note)
    dropped = _dropped_counts(rows, train_part, held_part)
    data = PreferenceData(train=train, heldout=held, dropped=dropped)
    kept_train = [rows.train.rows[r["index"]] for r in train]
    kept_held = [rows.heldout.rows[r["index"]] for r in held]
    for features in (train, held):  # from here on, index = position in the features
        for i, f in enumerate(features):
            f["index"] = i
    return RunInputs(model_path, tokenizer, data, kept_train, kept_held, embedded)


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
