"""The bound of every parity check, and the comparisons both ``compare`` and ``noise_floor`` use.

Tolerance policy (float32 on CPU). A difference is ``|ours - trl|``, or for the ``rel``
checks ``|ours - trl| / max(1, |trl|)``: absolute below 1 (so the usual losses and rewards are
held to the absolute bounds as stated), relative above, because float32 resolution is relative.
Summed log-probs reach -100s, where one ulp is already 7.6e-6; the squared losses (ipo,
sppo_hard) reach 25-50, where one ulp is 3.8e-6 and ``d loss / d logratio = 2(lr - 1/(2 beta))
~ 10`` turns logps rounding into 1.9e-5 absolute by step 5 (measured, sppo_hard).

Step 1 is held to the fixed bounds below. After step 1 the two sides drift apart by rounding
alone, by an amount set by the case (Adam's first step, ``lr * g / (|g| + eps)``, turns a rounding
difference in a gradient element below ``eps`` into up to about ``lr`` in that weight:
``parity/README.md``). So by default (``python -m parity``, the CI cases) the final weights and
every "all" row below except ``num_tokens`` and ``learning_rate`` are bounded by a noise floor
measured in the same run, trl against trl started one ulp away (``parity.check.noise_floor``: 20x
the floor for the weights' per-tensor q90/q99/q99.9, 5x for each metric's largest difference over
steps 2..N; bf16/fp16 weights too, nudged by one ulp of their dtype). The constant "all" bounds and
``final weights`` in the table apply without a floor (``--floor-runs 0``).

======================  ==========  ============================================================
metric                  tolerance   why
======================  ==========  ============================================================
loss, rewards/* step 1  1e-6 rel    one forward from identical weights: only summation order
                                    differs (trl vs hand measured 1.2e-7, notes §4)
loss, rewards/* all     1e-5 rel    ulp-level gradient differences, normalised by Adam, move the
                                    weights apart by 1e-5 and more over 10-20 steps (measured
                                    3.6e-7)
logps/*                 1e-5 rel    sums of ~100 float32 terms: 1 ulp at |x|~60 is 3.8e-6
logits/*, entropy       1e-5 rel    token means of float32 reductions over the vocabulary, drift
                                    as the loss does (measured <= 9.5e-7)
grad_norm step 1        1e-6 rel    the same gradients from identical weights (measured <= 3e-7)
grad_norm all           1e-4 rel    a derivative, evaluated at weights allowed to differ by 1e-4:
                                    its drift is the loss curvature times the weight drift, and
                                    sharp losses amplify it (discopop's mixing sigmoid has
                                    curvature ~1/tau^2 = 400: 1.9e-5 by step 3, measured, while
                                    its loss agreed to 2.4e-7)
mean_token_accuracy     1e-6 abs    ratios of integer counts: one argmax flip moves it by >= 1/n
num_tokens              0           integer count of the same attention masks
learning_rate           1e-12 abs   the same float64 schedule formula on both sides
token ids, dropped rows 0           tokenization must be identical
final weights           1e-4 abs    Adam at lr 1e-3 turns last-bit gradient noise into up to
                                    about lr per element (measured 1.09e-5 max on gpt2 ipo)
packed_4bit             0           4-bit layers left in bitsandbytes' gradient-less CPU layout
                                    (training.inputs.four_bit): a count, on both sides together
padding_free            2x floor    ours only: the padding-free forward's error against a float64
                                    forward, at most twice the plain path's own float32 error
                                    (parity.sides.padding_free_check); not gated when not measured
own_logits *@1          float32     each side's step-1 logps (and the reference's, from rewards)
                        bound       against the model's own logits in float64
                                    (parity.sides.own_logits); the note names a side that is off
======================  ==========  ============================================================

Trainable weights stored in bf16/fp16 (trl 1.16 casts QLoRA adapters to bf16, as the QLoRA paper
does) are floored like float32 ones (the floor runs nudge them by one ulp of their dtype; the
rounding slack is that dtype's eps). Without a floor they are counted in ulps of the stored
dtype at each tensor's scale (``eps * max|w|``; bound: 1 ulp) and ``grad_norm`` over all steps
may differ by one rounding step of the gradient dtype (``finfo.eps`` relative, 2^-7 for bf16).
Step 1 keeps its 1e-6 bound: same weights, same gradients (measured equal).

Under bf16 autocast (``--precision bf16-mixed``) both sides round the same products to bf16, so
step 1's forward is bit-equal (measured: loss, rewards), but the head's float32 gradient sums,
taken in another order, reach the backbone's bf16 backward, which turns a last-bit difference
into whole bf16 roundings. There the step-1 checks also measure a floor: each is bounded by the
larger of its fixed bound and 5x the step-1 difference of the floor runs
(``parity.check.noise_floor.compare_first_step_to_floor``). Without a floor (``--floor-runs 0``) the
fixed float32 bounds apply as they are, and a bf16 case may fail them by rounding alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from parity.sides.result import RunResult


@dataclass(frozen=True)
class Tolerance:
    """How one step metric is compared.

    Attributes:
        bound: the largest allowed difference.
        relative: divide the difference by ``max(1, |trl|)`` first.
        first_step_only: compare step 1 only (the tighter step-1 checks).
    """

    bound: float
    relative: bool = False
    first_step_only: bool = False


STEP1, ALL_STEPS, LOGPS_REL, GRAD_NORM_REL, WEIGHTS = 1e-6, 1e-5, 1e-5, 1e-4, 1e-4
REWARDS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")

# Check name -> (metric in RunResult.steps, tolerance). Order = order in the table.
STEP_CHECKS: dict[str, tuple[str, Tolerance]] = {
    "loss@1": ("loss", Tolerance(STEP1, relative=True, first_step_only=True)),
    **{f"{m}@1": (m, Tolerance(STEP1, relative=True, first_step_only=True)) for m in REWARDS},
    "loss": ("loss", Tolerance(ALL_STEPS, relative=True)),
    **{m: (m, Tolerance(ALL_STEPS, relative=True)) for m in REWARDS},
    "logps/chosen": ("logps/chosen", Tolerance(LOGPS_REL, relative=True)),
    "logps/rejected": ("logps/rejected", Tolerance(LOGPS_REL, relative=True)),
    "logits/chosen": ("logits/chosen", Tolerance(ALL_STEPS, relative=True)),
    "logits/rejected": ("logits/rejected", Tolerance(ALL_STEPS, relative=True)),
    "entropy": ("entropy", Tolerance(ALL_STEPS, relative=True)),
    "grad_norm@1": ("grad_norm", Tolerance(STEP1, relative=True, first_step_only=True)),
    "grad_norm": ("grad_norm", Tolerance(GRAD_NORM_REL, relative=True)),
    "mean_token_accuracy": ("mean_token_accuracy", Tolerance(STEP1)),
    "num_tokens": ("num_tokens", Tolerance(0.0)),
    "learning_rate": ("learning_rate", Tolerance(1e-12)),
}


@dataclass
class MetricCheck:
    """One row of the table: a metric, the values at its worst step, the difference, the bound.

    Attributes:
        name: check name (``loss@1`` is step 1 only; ``loss`` is every step).
        trl_value: trl's value where the difference is largest (None for non-scalar checks).
        ours_value: ours at the same place.
        max_diff: the largest difference (``inf`` when something is missing or mismatched).
        tolerance: the bound it must not exceed.
        relative: whether ``max_diff`` and ``tolerance`` are relative.
        note: where the worst difference is, or what is missing.
        floor: for a check bounded by the noise floor (``parity.check.noise_floor``), the floor's
            value of the same statistic; ``tolerance`` is then ``factor * floor`` plus one
            float32 rounding at the metric's or weights' scale.
        factor: the multiple of ``floor`` allowed.
        gated: False for a row that is reported only and never fails the case.
    """

    name: str
    trl_value: float | None
    ours_value: float | None
    max_diff: float
    tolerance: float
    relative: bool = False
    note: str = ""
    floor: float | None = None
    factor: float | None = None
    gated: bool = True

    @property
    def within(self) -> bool:
        """The difference is within the tolerance (for any row, gated or not)."""
        return self.max_diff <= self.tolerance

    @property
    def passed(self) -> bool:
        """Within the tolerance, or a report-only row."""
        return self.within or not self.gated


@dataclass
class CaseReport:
    """The outcome of one case: its checks, or why it was not compared, or the error it hit.

    Attributes:
        skipped: why trl 1.16 has no such case (not compared; counts as passed).
        error: what failed on our side (``"ours failed: ..."``) or in the harness.
        trl_failed: trl raised on the case (``"trl failed: ..."``): nothing was compared with
            trl, ours is held to the own-logits oracle alone, and the case does not pass.
    """

    name: str
    checks: list[MetricCheck] = field(default_factory=list)
    skipped: str = ""
    error: str = ""
    trl_failed: str = ""

    @property
    def passed(self) -> bool:
        """No failure on either side and every check within tolerance (a case trl 1.16 has no
        setting for, ``skipped``, counts as passed)."""
        return not (self.error or self.trl_failed) and all(c.passed for c in self.checks)

    @property
    def trls_error(self) -> str:
        """Why a case that did not pass failed on trl's account alone, or ``""``: trl raised, or
        trl's step-1 log-probs are off its model's own logits, while ours ran and every
        own-logits row holds ours within its bound (``parity.check.own_logits``). Then trl
        against ours compares nothing: ours is held to the model's own logits instead."""
        if self.passed or self.error:
            return ""
        own = [c for c in self.checks if c.name.startswith("own_logits") and c.gated]
        if not own or any("ours off" in c.note for c in own):
            return ""
        if self.trl_failed:
            return self.trl_failed
        off = [c.note for c in own if "trl off" in c.note]
        return f"trl's log-probs are off its model's own logits ({off[0]})" if off else ""


def difference(trl: float, ours: float, relative: bool) -> float:
    """``|ours - trl|``, over ``max(1, |trl|)`` when ``relative``; NaN on one side only is inf,
    and so is an infinity the other side does not match (``inf / inf`` would be NaN, which no
    comparison catches)."""
    if math.isnan(trl) or math.isnan(ours):
        return 0.0 if math.isnan(trl) and math.isnan(ours) else math.inf
    if math.isinf(trl) or math.isinf(ours):
        return 0.0 if trl == ours else math.inf
    diff = abs(ours - trl)
    return diff / max(1.0, abs(trl)) if relative else diff


def compare_step_metric(
    name: str, metric: str, tol: Tolerance, trl: RunResult, ours: RunResult, start: int = 0
) -> MetricCheck:
    """The worst difference of one metric over the compared steps (from index ``start``; a
    difference of 0 when there is none)."""
    steps = 1 if tol.first_step_only else len(trl.steps)
    fail = MetricCheck(name, None, None, math.inf, tol.bound, tol.relative)
    if len(ours.steps) < steps:
        fail.note = f"ours has {len(ours.steps)} steps, trl {len(trl.steps)}"
        return fail
    worst = MetricCheck(name, None, None, 0.0 if start >= steps else -1.0, tol.bound, tol.relative)
    for i in range(start, steps):
        if metric not in ours.steps[i]:
            fail.note = f"missing in ours at step {i + 1}"
            return fail
        a, b = trl.steps[i][metric], ours.steps[i][metric]
        diff = difference(a, b, tol.relative)
        if diff > worst.max_diff:
            worst = MetricCheck(name, a, b, diff, tol.bound, tol.relative, f"step {i + 1}")
    if not tol.first_step_only and len(ours.steps) != len(trl.steps):
        worst.max_diff = math.inf
        worst.note = f"ours has {len(ours.steps)} steps, trl {len(trl.steps)}"
    return worst


def weights_mismatch(trl: RunResult, ours: RunResult) -> str:
    """Why the two sides' final weights cannot be compared (names or shapes differ, or there are
    none), or ``""``."""
    names_trl, names_ours = set(trl.final_weights), set(ours.final_weights)
    if names_trl != names_ours:
        missing, extra = sorted(names_trl - names_ours), sorted(names_ours - names_trl)
        return f"missing in ours {missing[:3]}, extra in ours {extra[:3]}"
    if not names_trl:
        return "no weights"
    for name in sorted(names_trl):
        a, b = trl.final_weights[name], ours.final_weights[name]
        if a.shape != b.shape:
            return f"{name}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
    return ""
