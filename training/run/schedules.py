"""Learning-rate schedules by name, as transformers' ``get_scheduler`` computes them.

Each is the multiplier of the peak learning rate at optimizer step ``step`` (what a
``torch.optim.lr_scheduler.LambdaLR`` takes), with a linear warm-up from 0 over ``warmup``
steps, then, until ``total`` steps:

- ``linear``: linear decay to 0 (``get_linear_schedule_with_warmup``);
- ``cosine``: half a cosine wave down to 0 (``get_cosine_schedule_with_warmup``, 0.5 cycles);
- ``cosine_with_restarts``: one hard-restart cycle
  (``get_cosine_with_hard_restarts_schedule_with_warmup``, 1 cycle: 0 from ``total`` on);
- ``constant_with_warmup``: 1 after the warm-up (``get_constant_schedule_with_warmup``);
- ``constant``: 1 throughout, no warm-up (``get_constant_schedule``: transformers ignores the
  warm-up for it, so ``training.base.config`` refuses one).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from training.base.config import LR_SCHEDULER_TYPES


def _warmup(step: int, warmup: int) -> float:
    return step / max(1, warmup)


def _progress(step: int, warmup: int, total: int) -> float:
    """The share of the post-warm-up steps done."""
    return (step - warmup) / max(1, total - warmup)


def linear(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return _warmup(step, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def cosine(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return _warmup(step, warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * _progress(step, warmup, total))))


def cosine_with_restarts(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return _warmup(step, warmup)
    progress = _progress(step, warmup, total)
    if progress >= 1.0:
        return 0.0
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * (progress % 1.0))))


def constant_with_warmup(step: int, warmup: int, total: int) -> float:
    return _warmup(step, warmup) if step < warmup else 1.0


def constant(step: int, warmup: int, total: int) -> float:
    return 1.0


SCHEDULES: dict[str, Callable[[int, int, int], float]] = {
    "linear": linear,
    "cosine": cosine,
    "cosine_with_restarts": cosine_with_restarts,
    "constant": constant,
    "constant_with_warmup": constant_with_warmup,
}
assert tuple(SCHEDULES) == LR_SCHEDULER_TYPES, "config's choices are the schedules here"


def lr_multiplier(name: str, *, warmup: int, total: int) -> Callable[[int], float]:
    """The multiplier of schedule ``name`` as a function of the step (a ``ValueError`` naming
    the flag and the choices for an unknown name)."""
    if name not in SCHEDULES:
        raise ValueError(
            f"--lr-scheduler-type {name!r} unknown; choose from {', '.join(SCHEDULES)}"
        )
    schedule = SCHEDULES[name]
    return lambda step: schedule(step, warmup, total)
