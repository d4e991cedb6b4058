"""The learning-rate schedules are transformers' own: each multiplier, and the learning rate a run
logs at every step, equal what ``transformers.get_scheduler`` gives for the same name, warm-up
and step count."""

from __future__ import annotations

import pytest
import torch
import transformers

from tests.training.conftest import base_args, fit, read_metrics
from training.base.config import LR_SCHEDULER_TYPES
from training.run.module import as_logged
from training.run.schedules import lr_multiplier


def transformers_lrs(name: str, lr: float, warmup: int, total: int, steps: int) -> list[float]:
    """The learning rate of each of ``steps`` optimizer steps under transformers' scheduler,
    built on a dummy optimizer (the Trainer steps it after every optimizer step)."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = transformers.get_scheduler(
        name, optimizer, num_warmup_steps=warmup, num_training_steps=total
    )
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def warmups(name: str) -> tuple[int, ...]:
    return (0,) if name == "constant" else (0, 1, 3)  # constant: transformers has no warm-up


@pytest.mark.parametrize("name", LR_SCHEDULER_TYPES)
def test_multipliers_equal_transformers(name):
    for warmup in warmups(name):
        for total in (1, 4, 10):
            ours = lr_multiplier(name, warmup=warmup, total=total)
            theirs = transformers_lrs(name, 1.0, warmup, total, total + 2)
            assert [ours(step) for step in range(total + 2)] == theirs, (warmup, total)


@pytest.mark.parametrize("name", LR_SCHEDULER_TYPES)
def test_a_run_logs_transformers_learning_rates(tiny_assets, tmp_path, name):
    warmup = 0 if name == "constant" else 2
    flags = {"max_steps": 6, "learning_rate": 1e-3, "warmup_steps": warmup}
    result = fit(base_args(tiny_assets, tmp_path, lr_scheduler_type=name, **flags))
    expected = transformers_lrs(name, 1e-3, warmup, 6, 6)
    assert [step["learning_rate"] for step in result.history] == expected
    logged = [row["learning_rate"] for row in read_metrics(tmp_path)]
    assert logged == [as_logged(lr) for lr in expected]
