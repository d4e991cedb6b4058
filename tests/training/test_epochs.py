"""``num_train_epochs`` as transformers takes it: a float (``3.0`` in trl's YAMLs); a fraction
trains ceil(epochs x optimizer steps an epoch) steps, as transformers' Trainer counts, and the run
says so."""

from __future__ import annotations

import logging
import tempfile
from types import SimpleNamespace

import pytest

from tests.training.conftest import base_args, fit, read_metrics
from training.base.cli import resolve_config
from training.fit import epochs_note, total_optimizer_steps


def transformers_max_steps(epochs: float, batches: int, accumulation: int) -> int:
    """transformers' own count: ``Trainer.set_initial_training_values`` on a dataloader of
    ``batches`` batches (a stub stands in for the Trainer's other methods it calls)."""
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(),
        num_train_epochs=epochs,
        gradient_accumulation_steps=accumulation,
        report_to=[],
        use_cpu=True,
    )
    stub = SimpleNamespace(
        get_total_train_batch_size=lambda _: 1,
        get_sp_size=lambda: 1,
        num_examples=len,
    )
    return Trainer.set_initial_training_values(stub, args, [None] * batches)[-1]


@pytest.mark.parametrize(
    ("epochs", "rows", "accumulation"),
    [(3.0, 32, 1), (1.5, 32, 1), (0.1, 120, 1), (2.7, 36, 2), (0.25, 10, 3)],
)
def test_steps_are_transformers_count(epochs, rows, accumulation):
    cfg, _ = resolve_config(
        ["--num-train-epochs", str(epochs), "--batch-size", "4",
         "--gradient-accumulation-steps", str(accumulation)]
    )  # fmt: skip
    batches = -(-rows // 4)
    assert total_optimizer_steps(cfg, rows) == transformers_max_steps(epochs, batches, accumulation)


def test_a_float_from_yaml_or_flag(tmp_path):
    config = tmp_path / "trl.yaml"
    config.write_text("num_train_epochs: 3.0\nper_device_train_batch_size: 4\n")
    whole, _ = resolve_config(["--config", str(config)])
    assert whole.trainer.num_train_epochs == 3.0
    assert total_optimizer_steps(whole, 32) == 24  # 3 epochs of 8 steps
    assert epochs_note(whole, 32, 24) is None  # whole epochs: nothing to say
    config.write_text("num_train_epochs: 1.5\nper_device_train_batch_size: 4\n")
    part, _ = resolve_config(["--config", str(config)])
    flag, _ = resolve_config(["--num_train_epochs", "1.5", "--batch-size", "4"])
    assert part == flag
    assert total_optimizer_steps(part, 32) == 12
    assert epochs_note(part, 32, 12) == (
        "--num-train-epochs 1.5: 12 optimizer steps = ceil(1.5 x 8 steps an epoch), as "
        "transformers' Trainer counts; the last epoch stops part way"
    )


def test_a_fractional_epoch_run_trains_those_steps_and_says_so(tiny_assets, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="training.fit"):
        fit(base_args(tiny_assets, tmp_path, max_steps=-1, num_train_epochs=1.5))
    assert [int(r["step"]) for r in read_metrics(tmp_path)] == list(range(1, 13))  # 32 rows / 4
    assert "--num-train-epochs 1.5: 12 optimizer steps = ceil(1.5 x 8" in caplog.text
