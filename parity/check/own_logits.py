"""The rows of the own-logits check: each side's step-1 log-probs against the model's own logits.

``parity.sides.own_logits`` computes, independently of trl and of ``dpo_core``'s head, the
step-1 means of the policy's and the reference's summed completion log-probs from the model's
own ``forward().logits`` (float64 ``log_softmax``), with the bound a correct float32 computation
keeps to. Here each side's logged step-1 values (``logps/*``; the reference's from ``rewards/*``)
are held to it. One row per quantity: trl's and ours' distance from the oracle in their columns,
the larger as the difference, and a side beyond the bound named in the note ("trl off by
0.11"). A mistake both sides share (a logit transform the family applies in its ``forward`` that
neither scores with) fails here and names both, where trl against ours would pass; a mistake of
trl's alone names trl, even when ours agrees with it.
"""

from __future__ import annotations

import math

from parity.check.tolerances import MetricCheck
from parity.sides.own_logits import QUANTITIES, OwnLogits, derivation_slack, logged_means
from parity.sides.result import RunResult


def side_offsets(oracle: OwnLogits, result: RunResult | None, beta: float) -> dict[str, float]:
    """quantity -> the side's step-1 value minus the oracle's (empty without a step 1)."""
    if result is None or not result.steps:
        return {}
    step = result.steps[0]
    if any(f"{m}/{h}" not in step for m in ("logps", "rewards") for h in ("chosen", "rejected")):
        return dict.fromkeys(QUANTITIES, math.inf)
    logged = logged_means(step, beta)
    return {q: logged[q] - oracle.values[q] for q in QUANTITIES}


def bound_of(oracle: OwnLogits, quantity: str, results: list[RunResult], beta: float) -> float:
    """The oracle's float32 bound of ``quantity``; for the reference's (derived from
    ``rewards``), plus the derivation's own rounding, the larger of the sides'."""
    bound = oracle.bounds[quantity]
    if quantity.startswith("ref_"):
        bound += max((derivation_slack(r.steps[0], beta) for r in results if r.steps), default=0)
    return bound


def off_note(offsets: dict[str, float], bound: float) -> str:
    """``"trl off by 0.11; ours off by 2e-05"`` for each side beyond ``bound``, or ``""``."""
    return "; ".join(
        f"{side} off by {abs(d):.3g}"
        for side, d in offsets.items()
        if not abs(d) <= bound  # NaN counts as off
    )


def compare_own_logits(
    oracle: OwnLogits, trl: RunResult | None, ours: RunResult | None, beta: float
) -> list[MetricCheck]:
    """One row per quantity (``own_logits logps/chosen@1``, ...), or one report-only row saying
    why there is no oracle. A side that did not run (``None``) shows ``-``."""
    if oracle.skipped:
        return [MetricCheck("own_logits", None, None, 0.0, 0.0, note=oracle.skipped, gated=False)]
    sides = {who: r for who, r in (("trl", trl), ("ours", ours)) if r is not None}
    offsets = {who: side_offsets(oracle, r, beta) for who, r in sides.items()}
    rows = []
    for q in QUANTITIES:
        here = {who: off[q] for who, off in offsets.items() if off}
        bound = bound_of(oracle, q, list(sides.values()), beta)
        worst = max((math.inf if math.isnan(d) else abs(d) for d in here.values()), default=0.0)
        note = off_note(here, bound) or f"oracle {oracle.values[q]:.7g}"
        check = MetricCheck(f"own_logits {q}@1", here.get("trl"), here.get("ours"), worst, bound)
        check.note = note
        rows.append(check)
    return rows
