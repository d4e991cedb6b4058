"""PNG plots of a run: training curves, before/after bars, and the reward-vs-KL frontier.

matplotlib with the non-interactive Agg backend (no display needed). Each plot is two
functions: a pure one that computes what is drawn (``curve_series``, ``bar_values``,
``frontier_series``; tested directly) and one that draws it, writes one PNG and returns its path.

- ``training_curves``: loss, rewards/chosen, rewards/rejected, rewards/margins and
  rewards/accuracies over optimizer steps, from ``metrics.csv`` (steps in trl's count, from 1:
  ``training.base.step_count``);
- ``optimization_curves``: learning rate, grad norm and the log-probs of the chosen and
  rejected completions over optimizer steps, from ``metrics.csv``;
- ``heldout_curves``: trl's held-out metrics over the steps done: the evaluation's before (0
  steps) and after (all steps) points, with the passes of ``--eval-every-n-steps`` between;
- ``before_after_bars``: eval.json's headline numbers, before vs after;
- ``frontier``: win rate against KL(π ‖ π_ref), one point per policy, like Figure 2 (left) of
  the DPO paper (Rafailov et al. 2023); ``training.sweep`` draws one point per β.
"""

from __future__ import annotations

import csv
import functools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

from training.base.errors import writing  # noqa: E402
from training.base.step_count import counts_from_zero, renumbered_from_one  # noqa: E402

log = logging.getLogger(__name__)

CURVES = (
    ("loss", "loss"),
    ("rewards/chosen", "reward, chosen"),
    ("rewards/rejected", "reward, rejected"),
    ("rewards/margins", "reward margin"),
    ("rewards/accuracies", "reward accuracy"),
)
# (panel title, the metrics drawn in it): a panel of two metrics draws two lines and a legend.
OPTIMIZATION_PANELS = (
    ("learning rate", ("learning_rate",)),
    ("grad norm (before clipping)", ("grad_norm",)),
    ("mean log π(y | x)", ("logps/chosen", "logps/rejected")),
)
HELDOUT_PANELS = (
    ("held-out loss", ("eval_loss",)),
    ("held-out reward accuracy", ("eval_rewards/accuracies",)),
    ("held-out reward margin", ("eval_rewards/margins",)),
    ("held-out mean log π(y | x)", ("eval_logps/chosen", "eval_logps/rejected")),
)
BARS = (
    ("preference_accuracy", "preference accuracy"),
    ("win_rate", "win rate"),
    ("reward_margin", "reward margin"),
    ("kl", "KL(π ‖ π_ref)"),
)


def _read_rows(metrics_csv: Path) -> list[dict[str, float]]:
    """The rows of ``metrics_csv`` as floats, steps in trl's count: a file written before
    metrics.csv took it (from 0) is read renumbered from 1, with a note."""
    with open(metrics_csv, newline="") as f:
        rows = [
            {k: float(v) for k, v in r.items() if v not in ("", None)} for r in csv.DictReader(f)
        ]
    if not counts_from_zero([r for r in rows if "step" in r]):
        return rows
    _note_renumbered(str(metrics_csv))
    return [renumbered_from_one([r])[0] if "step" in r else r for r in rows]


@functools.cache
def _note_renumbered(path: str) -> None:
    """Say once per file that it is drawn renumbered (each plot reads it again)."""
    log.warning("%s counts steps from 0 (written before trl's count): drawn from 1", path)


def read_steps(metrics_csv: Path) -> list[dict[str, float]]:
    """The training rows of ``metrics.csv`` (those with a ``loss``), values as floats."""
    return [r for r in _read_rows(metrics_csv) if "loss" in r]


def read_heldout(metrics_csv: Path) -> list[dict[str, float]]:
    """The held-out rows of ``metrics.csv`` (those with an ``eval_loss``), values as floats."""
    return [r for r in _read_rows(metrics_csv) if "eval_loss" in r]


def curve_series(steps: Sequence[dict[str, float]]) -> dict[str, tuple[list, list]]:
    """Per ``CURVES`` metric, the (steps, values) drawn: a row that did not log the metric
    gives no point (x is the row's ``step``, trl's count, else its place from 1)."""
    return panel_series(steps, _curve_panels())


def _curve_panels() -> tuple[tuple[str, tuple[str, ...]], ...]:
    return tuple((label, (key,)) for key, label in CURVES)


def training_curves(metrics_csv: Path, path: Path) -> Path:
    """Five panels, one per ``CURVES`` metric, against the optimizer step."""
    series = curve_series(read_steps(metrics_csv))
    return _draw_panels(series, _curve_panels(), "optimizer step", "Training curves", path)


def panel_series(
    steps: Sequence[dict[str, float]], panels: Sequence[tuple[str, tuple[str, ...]]]
) -> dict[str, tuple[list, list]]:
    """Per metric of ``panels``, the (steps, values) drawn: a row that did not log the metric
    gives no point (x is the row's ``step``, trl's count, else its place from 1)."""
    series = {}
    for _, keys in panels:
        for key in keys:
            points = [(r.get("step", i + 1), r[key]) for i, r in enumerate(steps) if key in r]
            series[key] = ([x for x, _ in points], [y for _, y in points])
    return series


def heldout_series(
    heldout: Sequence[dict[str, float]],
    before: dict[str, float],
    after: dict[str, float],
    steps_done: int,
) -> dict[str, tuple[list, list]]:
    """Per ``HELDOUT_PANELS`` metric, (optimizer steps done, value): ``before`` at 0, each
    held-out row of metrics.csv at its ``step`` (trl's count: the pass after the k-th step is
    step k, like that step's row), ``after`` at ``steps_done`` unless a row is there already
    (the same model on the same pairs). A side that lacks a metric gives no point."""
    series = {}
    for _, keys in HELDOUT_PANELS:
        for key in keys:
            points = [(0, before[key])] if key in before else []
            points += [(int(r["step"]), r[key]) for r in heldout if key in r and "step" in r]
            if key in after and steps_done not in [x for x, _ in points]:
                points.append((steps_done, after[key]))
            points.sort(key=lambda p: p[0])
            series[key] = ([x for x, _ in points], [y for _, y in points])
    return series


def optimization_curves(metrics_csv: Path, path: Path) -> Path:
    """Learning rate, grad norm and the chosen / rejected log-probs against the step."""
    series = panel_series(read_steps(metrics_csv), OPTIMIZATION_PANELS)
    return _draw_panels(series, OPTIMIZATION_PANELS, "optimizer step", "Optimization", path)


def heldout_curves(series: dict[str, tuple[list, list]], path: Path) -> Path:
    """``heldout_series`` drawn: the held-out metrics against the optimizer steps done."""
    return _draw_panels(
        series, HELDOUT_PANELS, "optimizer steps done", "Held-out metrics (trl's names)", path
    )


def _draw_panels(series, panels, xlabel: str, title: str, path: Path) -> Path:
    """One panel per ``panels`` entry, a line per metric (a legend when there are two)."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    for ax, (label, keys) in zip(axes[0], panels):
        for key in keys:
            xs, ys = series[key]
            if xs:
                ax.plot(xs, ys, marker="." if len(xs) < 50 else None, label=key.split("/")[-1])
        if len(keys) > 1 and ax.get_lines():
            ax.legend()
        ax.set_title(label)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return _save(fig, path)


def _finite(value) -> float:
    return float(value) if value is not None and math.isfinite(float(value)) else math.nan


def bar_values(report: dict) -> dict[str, tuple[float, float]]:
    """Per ``BARS`` metric of an eval.json ``report``, (before, after); NaN where a side did
    not measure it (None, missing or non-finite), drawn as an empty bar labelled n/a."""
    return {
        key: (_finite(report["before"].get(key)), _finite(report["after"].get(key)))
        for key, _ in BARS
    }


def before_after_bars(report: dict, path: Path) -> Path:
    """One panel per headline metric of an eval.json ``report``: a before and an after bar."""
    values_of = bar_values(report)
    fig, axes = plt.subplots(1, len(BARS), figsize=(3.2 * len(BARS), 3.2), squeeze=False)
    for ax, (key, label) in zip(axes[0], BARS):
        values = values_of[key]
        bars = ax.bar(["before", "after"], [0.0 if math.isnan(v) else v for v in values])
        bars[0].set_color("tab:gray")
        bars[1].set_color("tab:blue")
        for bar, v in zip(bars, values):
            text = "n/a" if math.isnan(v) else f"{v:.3g}"
            xy = (bar.get_x() + bar.get_width() / 2, bar.get_height())
            ax.annotate(text, xy, xytext=(0, 2), textcoords="offset points", ha="center")
        ax.margins(y=0.15)
        if key in ("preference_accuracy", "win_rate"):
            ax.set_ylim(0, 1.12)
            ax.axhline(0.5, color="black", lw=0.6, ls="--")  # chance
        ax.set_title(label)
    fig.suptitle(
        f"Before vs after training ({report['n_pairs']} pairs, {report['n_prompts']} prompts)"
    )
    return _save(fig, path)


@dataclass(frozen=True)
class FrontierPoint:
    """One policy on the frontier: its KL to the reference and its win rate."""

    label: str
    kl: float
    win_rate: float


def frontier_series(points: Sequence[FrontierPoint]) -> list[FrontierPoint]:
    """The points drawn: those with both a KL and a win rate measured (not None or NaN)."""
    return [p for p in points if not any(math.isnan(_finite(v)) for v in (p.kl, p.win_rate))]


def frontier(points: Sequence[FrontierPoint], path: Path, title: str = "") -> Path:
    """Win rate against sequence-level KL(π ‖ π_ref), each point labelled."""
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    usable = frontier_series(points)
    ax.scatter([p.kl for p in usable], [p.win_rate for p in usable], color="tab:blue", zorder=3)
    for p in usable:
        ax.annotate(p.label, (p.kl, p.win_rate), textcoords="offset points", xytext=(5, 5))
    ax.set_xlabel("KL(π ‖ π_ref), nats per completion (estimated on samples)")
    ax.set_ylabel("win rate")
    ax.set_ylim(0, 1.08)
    ax.margins(x=0.15)  # room for the labels right of the points
    ax.grid(alpha=0.3)
    ax.set_title(title or "Reward vs KL frontier")
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    path = Path(path)
    try:
        with writing(path, "saving a plot"):
            path.parent.mkdir(parents=True, exist_ok=True)
            fig.tight_layout()
            fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return path
