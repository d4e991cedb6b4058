"""Resolve a run's inputs: model path, tokenizer, train and held-out rows, tokenized.

Unset ``--model`` / ``--dataset`` fall back to the embedded default (``training.embedded.assets``),
which is built offline and cached on disk.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from training.inputs.data_module import PreferenceData, split_heldout, tokenize_source
from training.inputs.gguf import as_model_dir
from training.inputs.model_loading import load_tokenizer
from training.inputs.sources import load_rows
from training.run.config import FitConfig

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
    """A copy of ``cfg`` whose fields not in ``explicit`` take ``EMBEDDED_RECIPE``'s values."""
    import dataclasses

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
    """The raw train and held-out rows, where they came from, and how the held-out set was cut."""

    train: list[dict]
    heldout: list[dict]
    train_source: str
    heldout_source: str
    heldout_note: str  # for the "held-out: N pairs (...)" line


def _rows_and_sources(cfg: FitConfig, embedded) -> RowSets:
    """The run's rows. ``--max-rows`` cuts the rows read before the held-out share is split off;
    ``--eval-max-pairs`` caps the held-out set (the first pairs of an eval set)."""
    d = cfg.data
    cap = d.eval_max_pairs
    limit = "" if cap is None else f", at most {cap}"
    change = "--eval-max-pairs to change"
    if d.dataset is None:
        train_src, held_src = str(embedded.train_file), str(embedded.eval_file)
        train, held = load_rows(train_src)[: d.max_rows], load_rows(held_src)
    else:
        train_src = d.dataset
        train = load_rows(d.dataset, d.split)[: d.max_rows]
        if d.eval_dataset:
            held_src = d.eval_dataset
            held = load_rows(d.eval_dataset, d.eval_split or d.split)
        elif d.eval_split:
            held_src = f"{d.dataset}[{d.eval_split}]"
            held = load_rows(d.dataset, d.eval_split)
        else:
            n_read = len(train)
            train, held = split_heldout(train, d.eval_fraction, cfg.trainer.seed, max_rows=cap)
            held_src = f"{d.dataset} (held-out {d.eval_fraction:.0%})"
            note = (
                f"{d.eval_fraction:.0%} of the {n_read} rows read{limit}; --eval-fraction, {change}"
            )
            return RowSets(train, held, train_src, held_src, note)
    taken = (
        f"all {len(held)}" if cap is None or cap >= len(held) else f"the first {cap} of {len(held)}"
    )
    note = f"{taken} in {held_src}{limit}; {change}"
    return RowSets(train, held[:cap], train_src, held_src, note)


def prepare_inputs(cfg: FitConfig) -> RunInputs:
    """Build or load everything the run reads, and tokenize it as trl would."""
    embedded = None
    if cfg.model.model is None or cfg.data.dataset is None:
        from training.embedded.assets import prepare_embedded

        embedded = prepare_embedded(log=log.info)
    model_path = as_model_dir(cfg.model.model) if cfg.model.model else str(embedded.model_dir)
    if not cfg.model.model:
        log.info("model: embedded default (%s)", model_path)
    tokenizer = load_tokenizer(model_path, trust_remote_code=cfg.model.trust_remote_code)
    rows = _rows_and_sources(cfg, embedded)
    train_rows, held_rows = rows.train, rows.heldout
    train = tokenize_source(train_rows, tokenizer, cfg, rows.train_source)
    held = tokenize_source(held_rows, tokenizer, cfg, rows.heldout_source)
    if not train.rows:
        raise ValueError(
            f"{rows.train_source}: no training rows left after tokenization and filtering"
        )
    log.info("held-out: %d pairs (%s)", len(held.rows), rows.heldout_note)
    dropped = {f"train/{k}": v for k, v in train.counts.items()}
    dropped.update({f"heldout/{k}": v for k, v in held.counts.items()})
    data = PreferenceData(train=train.rows, heldout=held.rows, dropped=dropped)
    kept_train = [train_rows[r["index"]] for r in train.rows]
    kept_held = [held_rows[r["index"]] for r in held.rows]
    for features in (train.rows, held.rows):  # from here on, index = position in the features
        for i, f in enumerate(features):
            f["index"] = i
    return RunInputs(model_path, tokenizer, data, kept_train, kept_held, embedded)
