"""Train from Python: one function, ``train``, with trl's names (``from training import train``).

    from datasets import Dataset
    from training import train

    rows = Dataset.from_list([{"prompt": "...", "chosen": " ...", "rejected": " ..."}, ...])
    result = train(
        "./my-model", rows, output_dir="runs/notebook",
        learning_rate=5e-6, per_device_train_batch_size=4, max_steps=50, beta=0.1, use_peft=True,
    )
    result.policy          # the trained model (a peft model under use_peft)
    result.history[-1]     # the last step's metrics, trl's names
    result.after           # held-out metrics after training (eval_*), when evaluated

It is ``python -m training.fit`` without the command line: every keyword is a field of
``training.base.config`` or trl's / transformers' name for it (``training.base.trl_names``),
checked as the flags are; a ``datasets.Dataset`` or ``DatasetDict`` is saved into
``<output_dir>/data/`` (so config.yaml names data that exists) and read from there; settings
given here are never replaced by the embedded default's recipe.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from training.base.cli import checked_values, config_from_values, read_config_file
from training.base.config import field_names
from training.base.trl_names import trl_fields
from training.fit import FitResult, run


def train(
    model: str | Path | None = None,
    train_dataset: Any = None,
    eval_dataset: Any = None,
    *,
    config: str | Path | None = None,
    **settings: Any,
) -> FitResult:
    """Train ``model`` (hub id or directory; None: the embedded default) with DPO on
    ``train_dataset`` (a ``datasets.Dataset`` / ``DatasetDict``, a file, a directory or a hub id;
    None: the embedded task) and return the ``FitResult``: ``policy`` (the trained model),
    ``history`` (per-step metrics), ``last_step``, ``before`` / ``after`` (held-out metrics),
    ``model_dir``. ``eval_dataset``: held-out rows, the same kinds. ``config``: a YAML file,
    as ``--config``, which ``settings`` override. A ``ValueError`` names a setting that is
    unknown, has no counterpart here or has a bad value."""
    values: dict[str, Any] = {}
    if config is not None:
        values.update(checked_values(read_config_file(Path(config)), config))
    values.update(checked_values(setting_values(settings), "train()"))
    if model is not None:
        values["model"] = str(model)
    output_dir = Path(values.get("output_dir") or config_from_values({}).trainer.output_dir)
    if train_dataset is not None:
        values.update(_dataset_source(train_dataset, output_dir / "data" / "train", "dataset"))
    if eval_dataset is not None:
        values.update(_dataset_source(eval_dataset, output_dir / "data" / "eval", "eval_dataset"))
    return run(config_from_values(values), explicit=set(values))


def setting_values(settings: dict[str, Any]) -> dict[str, Any]:
    """Keyword settings as our fields: our names as they are, trl's translated (``bf16=True``
    -> ``precision="bf16-mixed"``); ours win over trl's for the same field."""
    ours = field_names()
    values: dict[str, Any] = {}
    for name, value in settings.items():
        if name in ours:
            continue
        try:
            values.update(trl_fields(name, value))
        except KeyError:
            raise ValueError(f"train(): unknown setting {name!r}") from None
        except ValueError as err:
            raise ValueError(f"train(): {err}") from None
    values.update({k: v for k, v in settings.items() if k in ours})
    return values


def _dataset_source(data: Any, directory: Path, field: str) -> dict[str, Any]:
    """``{field: source}`` for rows given in Python: a path or hub id as it is; a
    ``datasets.Dataset`` or ``DatasetDict`` saved to ``directory`` with ``save_to_disk`` (a
    ``DatasetDict`` is then read by ``split`` / ``eval_split``, as on the command line)."""
    if isinstance(data, str | Path):
        return {field: str(data)}
    if not hasattr(data, "save_to_disk"):
        raise ValueError(
            f"train(): {field} must be a datasets.Dataset, a DatasetDict, a path or a hub id, "
            f"got {type(data).__name__}"
        )
    data.save_to_disk(str(directory))
    return {field: str(directory)}
