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


def _rows_and_sources(cfg: FitConfig, embedded) -> tuple[list, list, str, str]:
    """(train rows, held-out rows, train source name, held-out source name)."""
    d = cfg.data
    if d.dataset is None:
        train_src, held_src = str(embedded.train_file), str(embedded.eval_file)
        return load_rows(train_src), load_rows(held_src), train_src, held_src
    train = load_rows(d.dataset, d.split)
    if d.eval_dataset:
        return train, load_rows(d.eval_dataset, d.eval_split or d.split), d.dataset, d.eval_dataset
    if d.eval_split:
        return train, load_rows(d.dataset, d.eval_split), d.dataset, f"{d.dataset}[{d.eval_split}]"
    train, held = split_heldout(train, d.eval_fraction, cfg.trainer.seed)
    return train, held, d.dataset, f"{d.dataset} (held-out {d.eval_fraction:.0%})"


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
    train_rows, held_rows, train_src, held_src = _rows_and_sources(cfg, embedded)
    if cfg.data.max_rows is not None:
        train_rows = train_rows[: cfg.data.max_rows]
    train = tokenize_source(train_rows, tokenizer, cfg, train_src)
    held = tokenize_source(held_rows, tokenizer, cfg, held_src)
    if not train.rows:
        raise ValueError(f"{train_src}: no training rows left after tokenization and filtering")
    dropped = {f"train/{k}": v for k, v in train.counts.items()}
    dropped.update({f"heldout/{k}": v for k, v in held.counts.items()})
    data = PreferenceData(train=train.rows, heldout=held.rows, dropped=dropped)
    kept_train = [train_rows[r["index"]] for r in train.rows]
    kept_held = [held_rows[r["index"]] for r in held.rows]
    for features in (train.rows, held.rows):  # from here on, index = position in the features
        for i, f in enumerate(features):
            f["index"] = i
    return RunInputs(model_path, tokenizer, data, kept_train, kept_held, embedded)
