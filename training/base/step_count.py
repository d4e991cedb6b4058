"""The step count of metrics.csv and of every logger: trl's, the optimizer step just completed.

Lightning hands its loggers the count of optimizer steps done before a step (0 for the first),
and the same count to the held-out pass that runs after it. trl's Trainer numbers the step just
completed (1 for the first); its held-out pass after the k-th step is step k too. ``trl_step``
turns one into the other. A metrics.csv written before this project took trl's count is told
apart by its step 0 (``counts_from_zero``) and read in trl's (``renumbered_from_one``), never
mixed with it: ``--resume`` renumbers the file (``training.run.resume``), the plots read it so.
"""

from __future__ import annotations


def step_of(row: dict) -> int:
    """A row's ``step`` as a number (``"3"``, ``"3.0"`` and ``3.0`` alike)."""
    return int(float(row["step"]))


def trl_step(lightning_step: int | None) -> int:
    """trl's number of the optimizer step a Lightning log call reports (module docstring)."""
    return (lightning_step or 0) + 1


def counts_from_zero(rows: list[dict]) -> bool:
    """Whether ``rows`` were written in Lightning's count: only that count has a step 0. In
    trl's the first step is 1, and no held-out pass runs before it (``num_sanity_val_steps=0``;
    the evaluation's "before" goes to eval.json, not to metrics.csv)."""
    return any(step_of(r) == 0 for r in rows)


def renumbered_from_one(rows: list[dict]) -> list[dict]:
    """``rows`` of Lightning's count in trl's: every step + 1, train and held-out rows alike; a
    step read as text stays text (``"0"`` -> ``"1"``), a number becomes an integer."""
    return [
        {**r, "step": str(step_of(r) + 1) if isinstance(r["step"], str) else step_of(r) + 1}
        for r in rows
    ]
