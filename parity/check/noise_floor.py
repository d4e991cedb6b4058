"""The noise floor: how far rounding alone moves trl's own run, measured in the same run.

Step 1 starts from identical weights and is compared with fixed bounds
(``parity.check.tolerances``). After it the two sides drift apart: ours sums some gradients in
another order (2e-7 relative RMS at step 1), and Adam's first step, ``lr * g / (|g| + eps)``, turns
a rounding difference in a gradient near zero (below ``eps`` = 1e-8) into a weight difference of up
to about ``lr``. How far that carries a case depends on the case, so no constant fits: parity trains
trl ``FLOOR_RUNS`` more times from its starting weights, every floating-point one (frozen too),
moved by one ulp of its dtype (``parity.sides.models.nudge_one_ulp``, seeds 1..K), measures how far
those runs land from trl's, and holds ours to a multiple of that. Only trl is perturbed, so nothing
ours does can widen its own bound.

The checks (``d`` = a difference as ``parity.check.tolerances.difference`` takes it, ``f`` = the
same statistic of a floor run against trl, the largest over the floor runs, eps = float32's; for a
weight, its dtype's: bf16 QLoRA adapters):

- final weights, per tensor and for each of q90, q99, q99.9 of ``|w_ours - w_trl|``:
  ``q(d) <= WEIGHT_FACTOR * q(f) + eps * q(|w_trl|)``; the row names the tensor nearest its
  bound. The largest element, ``final_weights max``, is reported, not gated: one element whose
  first gradient is below Adam's eps can move by up to ``lr`` (noise against noise: 31x with two
  floor runs, 249x with one).
- every metric after step 1: ``max over steps 2..N of d <= METRIC_FACTOR * (max over all steps
  of f) + eps * (max over steps of |trl| / max(1, |trl|))``, ``d`` relative as in
  ``parity.check.tolerances`` (mean_token_accuracy: absolute).
- token means (entropy, logits/*) and ``grad_norm`` are never held below ``summation_slack``: a
  few roundings of their float32 sum, which two summation orders may differ by where the floor
  shows none.
- pair metrics (loss, rewards/chosen|rejected|margins, logps/*) are never held below
  ``parity.check.pair_slack.pair_slack``: one float32 rounding of every summed log-prob at its
  magnitude, carried through the metric (the derivation is that module's docstring).
- ``num_tokens`` and ``learning_rate`` (exact / the float64 schedule), the step-1 checks, token ids
  and dropped rows keep their bounds. The ``eps`` terms let a difference of one float32 rounding
  pass where the floor happens to be 0.

The factors, from perturbed trl runs only (10 on a gpt2 ipo case and a llama LoRA case, 6 on
llama sigmoid 20 steps; each in turn played "ours" against two others as the floor):

=================  ======================  =======  =================================
statistic          worst noise-only ratio  factor   ours / floor (ipo, lora, llama)
=================  ======================  =======  =================================
weights q90        4.7                     20       1.66, 0.90, 0.48 (worst quantile)
weights q99        3.5                     20
weights q99.9      7.8                     20
weights max        31 (K=2), 249 (K=1)     report
metrics, run max   2.3                     5        <= 1.43
metrics, per step  up to 466               (not used: a step's floor can be ~0)
=================  ======================  =======  =================================

On the real SmolLM2-135M-Instruct (conversational rows, LoRA, 3 steps, four floor runs): noise
alone reaches 16.6x the floor (weights q99), ours 2.6x. bf16 adapters (QLoRA) are nudged by a
whole bf16 ulp, a coarser change than ours' float32 rounding: there noise alone reaches 2.6x the
*allowed* and ours stays below 0.05x.

A real difference is far above: one parameter tensor stepped at lr x 1.001 gives weight q90 at
18x the allowed (ipo) and 25x (LoRA), weight decay 0.01 where trl has 0 gives 35x and 39x; in
bf16 (QLoRA) one tensor at lr x 1.5 fails, at lr x 1.1 it passes (measurements and the cause in
``parity/README.md``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from dpo_core.settings import LossSettings
from parity.check.pair_slack import pair_slack
from parity.check.tolerances import (
    STEP_CHECKS,
    MetricCheck,
    Tolerance,
    compare_step_metric,
    difference,
    weights_mismatch,
)
from parity.sides.result import RunResult

FLOOR_RUNS = 2
WEIGHT_FACTOR = 20.0
METRIC_FACTOR = 5.0
WEIGHT_QUANTILES = {"q90": 0.90, "q99": 0.99, "q99.9": 0.999}
EPS32 = torch.finfo(torch.float32).eps
UNFLOORED = ("num_tokens", "learning_rate")  # exact counts, the float64 schedule
# Means over completion tokens of values that are themselves float32 sums over the vocabulary.
TOKEN_MEANS = ("entropy", "logits/chosen", "logits/rejected")


@dataclass
class NoiseFloor:
    """What ``runs`` perturbed trl runs measured against the trl run.

    Attributes:
        weights: tensor name -> {"q90", "q99", "q99.9", "max"} of ``|w_floor - w_trl|``, the
            largest over the runs.
        metrics: check name (an all-steps check of ``parity.check.tolerances.STEP_CHECKS``) -> the
            largest difference over all steps and runs.
        runs: the number of perturbed runs.
    """

    weights: dict[str, dict[str, float]]
    metrics: dict[str, float]
    runs: int
    first_step: dict[str, float] = field(default_factory=dict)
    """Under autocast only: step-1 check name (``loss@1``, ...) -> the largest step-1 difference
    over the runs (``measure_floor(..., first_step=True)``)."""
    loss: LossSettings | None = None
    """The case's objective, for the summation slack of the pair metrics (``pair_slack``);
    None: no such slack."""


def abs_quantiles(x: torch.Tensor) -> dict[str, float]:
    """q90, q99, q99.9 (the lower of the two neighbouring order statistics) and max of ``|x|``;
    all 0 for an empty tensor. Any size (``torch.quantile`` stops at 2^24 elements)."""
    flat = x.detach().double().abs().flatten()
    if not flat.numel():
        return dict.fromkeys([*WEIGHT_QUANTILES, "max"], 0.0)
    ordered = flat.sort().values
    last = flat.numel() - 1
    out = {k: ordered[int(q * last)].item() for k, q in WEIGHT_QUANTILES.items()}
    return out | {"max": ordered[-1].item()}


def floored_checks(trl: RunResult) -> dict[str, tuple[str, Tolerance]]:
    """The all-steps checks the floor bounds: every one trl logged, less ``UNFLOORED``."""
    return {
        name: (metric, tol)
        for name, (metric, tol) in STEP_CHECKS.items()
        if not tol.first_step_only
        and name not in UNFLOORED
        and trl.steps
        and metric in trl.steps[0]
    }


def measure_floor(
    trl: RunResult,
    floors: list[RunResult],
    first_step: bool = False,
    loss: LossSettings | None = None,
) -> NoiseFloor:
    """The floor of ``trl`` from perturbed trl runs of the same case (``run_trl(...,
    perturb_seed=j)``). ``first_step``: also the step-1 floor of the step-1 checks (cases run
    under bf16 autocast, where float32 summation order alone no longer bounds step 1).
    ``loss``: the case's objective, for the pair metrics' summation slack (``pair_slack``).

    Raises:
        ValueError: without floor runs, or when one has other weights or steps than trl.
    """
    if not floors:
        raise ValueError("a noise floor needs at least one perturbed run")
    for run in floors:
        mismatch = weights_mismatch(trl, run)
        if mismatch or len(run.steps) != len(trl.steps):
            raise ValueError(f"a floor run differs in shape from trl's: {mismatch or 'steps'}")
    weights = {}
    for name, w in trl.final_weights.items():
        per_run = [abs_quantiles(run.final_weights[name].double() - w.double()) for run in floors]
        weights[name] = {k: max(r[k] for r in per_run) for k in per_run[0]}
    metrics = {}
    for check, (metric, tol) in floored_checks(trl).items():
        metrics[check] = max(
            difference(a[metric], b[metric], tol.relative)
            for run in floors
            for a, b in zip(trl.steps, run.steps, strict=True)
        )
    firsts = {}
    if first_step:
        for check, (metric, tol) in STEP_CHECKS.items():
            if tol.first_step_only and trl.steps and metric in trl.steps[0]:
                firsts[check] = max(
                    difference(trl.steps[0][metric], run.steps[0][metric], tol.relative)
                    for run in floors
                )
    return NoiseFloor(weights, metrics, len(floors), firsts, loss)


def compare_first_step_to_floor(
    name: str, metric: str, tol: Tolerance, trl: RunResult, ours: RunResult, floor: NoiseFloor
) -> MetricCheck:
    """A step-1 check under autocast: its fixed bound, or ``METRIC_FACTOR`` times the step-1
    floor (plus one float32 rounding at the step-1 value's scale) where that is larger.

    Under bf16 autocast the two sides' step-1 gradients differ by float32 summation order in
    the head (the same rounding placement, other order), and the backbone's bf16 backward turns
    such a difference into whole bf16 roundings: measured 3.2e-6 on ipo's step-1 grad_norm, while
    a one-ulp nudge of trl's own weights moves it by 2.5e-5 to 1.5e-4."""
    f = floor.first_step[name]
    value = abs(trl.steps[0][metric]) if trl.steps else 0.0
    scale = value / max(1.0, value) if tol.relative else value
    allowed = max(tol.bound, METRIC_FACTOR * f + EPS32 * scale)
    check = compare_step_metric(name, metric, Tolerance(allowed, tol.relative, True), trl, ours)
    check.floor, check.factor = f, METRIC_FACTOR
    return check


def metric_scale(trl: RunResult, metric: str, relative: bool) -> float:
    """The largest ``|trl|`` over steps, over ``max(1, |trl|)`` for a relative check: the size
    whose float32 rounding the bound always allows."""
    values = [abs(s[metric]) for s in trl.steps if abs(s[metric]) < float("inf")]
    return max((v / max(1.0, v) if relative else v for v in values), default=0.0)


def summation_slack(trl: RunResult, metric: str, relative: bool) -> float:
    """What float32 summation order alone may move a token mean, where the floor cannot show it.

    A token mean sums n float32 terms (each a float32 sum over the vocabulary). torch sums on the
    CPU by cascade summation, whose error is at most about ``ceil(log2 n) * eps * Σ|x|`` (Higham,
    *Accuracy and Stability of Numerical Algorithms*, 2nd ed., §4.2, pairwise summation). trl
    averages a masked (N, L-1) grid, ours the gathered completion tokens, in other orders and
    vector widths, so the two may differ by twice that. The floor runs (trl's weights one ulp
    away) change the terms but not the order, and on some CPUs leave the mean bit-identical: a
    floor of 0 would then allow one rounding, while a CPU whose vector width reorders the sum
    (measured: AVX-512, entropy 1.3 ulp apart over 8 steps) needs a few. ``n``: the largest
    ``num_tokens`` of the run (every token of both halves: no fewer than the terms averaged).

    ``grad_norm`` is ``sqrt(Σ g²)`` over the P trained parameters: its float32 sum rounds by up
    to ``ceil(log2 P) eps`` of itself by the same bound, the square root halves that, and the two
    sides sum in other groupings (per tensor, then over tensors), so twice that:
    ``ceil(log2 P) eps`` of the norm (measured: 1.1 eps on a tiny Gemma where the floor run
    showed none). Other metrics: 0."""
    if metric == "grad_norm":
        p = sum(w.numel() for w in trl.final_weights.values())
        return math.ceil(math.log2(max(p, 2))) * EPS32 * metric_scale(trl, metric, relative)
    if metric not in TOKEN_MEANS:
        return 0.0
    n = max((s.get("num_tokens", 1.0) for s in trl.steps), default=1.0)
    return 2 * math.ceil(math.log2(max(n, 2.0))) * EPS32 * metric_scale(trl, metric, relative)


def compare_metric_to_floor(
    name: str, metric: str, tol: Tolerance, trl: RunResult, ours: RunResult, floor: NoiseFloor
) -> MetricCheck:
    """The largest difference of one metric over steps 2..N, against ``METRIC_FACTOR`` times
    the floor's largest over all steps plus one float32 rounding at the metric's scale, and never
    below the ``summation_slack`` of a token mean or the ``pair_slack`` of a pair metric."""
    f = floor.metrics[name]
    allowed = METRIC_FACTOR * f + EPS32 * metric_scale(trl, metric, tol.relative)
    allowed = max(
        allowed,
        summation_slack(trl, metric, tol.relative),
        pair_slack(trl, metric, floor.loss, tol.relative),
    )
    check = compare_step_metric(name, metric, Tolerance(allowed, tol.relative), trl, ours, start=1)
    if len(trl.steps) < 2 and check.max_diff == 0.0:
        check.note = "no step after step 1"
    check.floor, check.factor = f, METRIC_FACTOR
    return check


def compare_weights_to_floor(
    trl: RunResult, ours: RunResult, floor: NoiseFloor
) -> list[MetricCheck]:
    """Rows ``final_weights q90|q99|q99.9`` (each naming the tensor nearest its bound) and the
    report-only ``final_weights max``."""
    keys = [*WEIGHT_QUANTILES, "max"]
    rows = {
        k: MetricCheck(f"final_weights {k}", None, None, 0.0, 0.0, gated=k != "max") for k in keys
    }
    mismatch = weights_mismatch(trl, ours)
    if mismatch:
        for row in rows.values():
            row.max_diff, row.note = float("inf"), mismatch
        return list(rows.values())
    worst = dict.fromkeys(keys, -1.0)
    for name in sorted(trl.final_weights):
        w = trl.final_weights[name]
        delta = ours.final_weights[name].double() - w.double()
        diff = abs_quantiles(delta)
        if delta.isnan().any():  # a NaN on one side (or inf - inf): every row infinitely far
            diff = dict.fromkeys(keys, float("inf"))
        scale, eps = abs_quantiles(w), torch.finfo(w.dtype).eps
        for k in keys:
            d = diff[k]
            allowed = WEIGHT_FACTOR * floor.weights[name][k] + eps * scale[k]
            ratio = d / allowed if allowed > 0 else (0.0 if d == 0 else float("inf"))
            if ratio > worst[k]:
                worst[k] = ratio
                row = rows[k]
                row.max_diff, row.tolerance, row.note = d, allowed, name
                row.floor, row.factor = floor.weights[name][k], WEIGHT_FACTOR
    return list(rows.values())
