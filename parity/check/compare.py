"""Line up two runs of one case (trl's and ours) and check every number against its tolerance.

The checks, their bounds and why each bound is what it is: ``parity.check.tolerances``. After
step 1 the final weights and most metrics are held to a noise floor measured in the same run
(``parity.check.noise_floor``); ``compare_runs`` picks, per check, which bound applies.
"""

from __future__ import annotations

import math

import torch

from parity.check.noise_floor import (
    NoiseFloor,
    compare_first_step_to_floor,
    compare_metric_to_floor,
    compare_weights_to_floor,
)
from parity.check.tolerances import (
    STEP_CHECKS,
    WEIGHTS,
    CaseReport,
    MetricCheck,
    Tolerance,
    compare_step_metric,
    weights_mismatch,
)
from parity.sides.padding_free_check import FACTOR, PaddingFreeCheck
from parity.sides.result import RunResult


def compare_token_ids(trl: RunResult, ours: RunResult) -> MetricCheck:
    """Token ids must be identical: the difference is the number of rows that differ."""
    bad = [i for i, (a, b) in enumerate(zip(trl.token_ids, ours.token_ids, strict=False)) if a != b]
    extra = abs(len(trl.token_ids) - len(ours.token_ids))
    note = f"first differing row {bad[0]}" if bad else ""
    if extra:
        note = f"{len(trl.token_ids)} rows in trl, {len(ours.token_ids)} in ours; " + note
    return MetricCheck("token_ids", None, None, float(len(bad) + extra), 0.0, note=note.strip("; "))


def low_precision_dtype(result: RunResult) -> torch.dtype | None:
    """bf16/fp16 when the trained weights are stored that way, else None."""
    dtypes = {t.dtype for t in result.final_weights.values()}
    low = dtypes & {torch.bfloat16, torch.float16}
    return next(iter(low)) if low else None


def ulp_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest ``|a - b|`` in ulps of ``a``'s dtype at the tensor's scale, ``eps * max|a|`` (the
    rounding step of its largest elements; small elements, e.g. a LoRA B that starts at 0, are
    stepped by updates of that scale, so their own tiny spacing is no measure)."""
    step = torch.finfo(a.dtype).eps * a.double().abs().max().clamp_min(torch.finfo(a.dtype).tiny)
    return ((a.double() - b.double()).abs().max() / step).item()


def compare_weights(trl: RunResult, ours: RunResult) -> MetricCheck:
    """The largest difference over all final weights (absolute, or in ulps of a bf16/fp16
    storage dtype); names and shapes must agree."""
    in_ulps = low_precision_dtype(trl) is not None
    check = MetricCheck(
        "final_weights (ulps)" if in_ulps else "final_weights",
        None,
        None,
        0.0,
        1.0 if in_ulps else WEIGHTS,
    )
    mismatch = weights_mismatch(trl, ours)
    if mismatch:
        check.max_diff, check.note = math.inf, mismatch
        return check
    worst, worst_name = -1.0, ""
    for name in sorted(trl.final_weights):
        a, b = trl.final_weights[name], ours.final_weights[name]
        if not a.numel():
            diff = 0.0
        elif in_ulps:
            diff = ulp_difference(a, b)
        else:
            diff = (a.double() - b.double()).abs().max().item()
        diff = math.inf if math.isnan(diff) else diff
        if diff > worst:
            worst, worst_name = diff, name
    check.max_diff, check.note = worst, worst_name
    return check


def compare_runs(
    name: str, trl: RunResult, ours: RunResult, floor: NoiseFloor | None = None
) -> CaseReport:
    """Every check of one case: step metrics, token ids, dropped rows and final weights.

    With a ``floor`` (``parity.check.noise_floor.measure_floor``), the final weights and every
    metric after step 1 that the floor holds are bounded by it instead of by a constant; the step-1
    checks, ``num_tokens`` and ``learning_rate`` keep their bounds. Without a floor, weights stored
    in bf16/fp16 are compared in ulps (``compare_weights``).
    """
    low = low_precision_dtype(trl)
    checks = []
    for check, (metric, tol) in STEP_CHECKS.items():
        if not (trl.steps and metric in trl.steps[0]):
            continue
        if floor is not None and check in floor.metrics:
            checks.append(compare_metric_to_floor(check, metric, tol, trl, ours, floor))
            continue
        if floor is not None and check in floor.first_step:
            checks.append(compare_first_step_to_floor(check, metric, tol, trl, ours, floor))
            continue
        if low is not None and check == "grad_norm":
            tol = Tolerance(max(tol.bound, torch.finfo(low).eps), relative=True)
        checks.append(compare_step_metric(check, metric, tol, trl, ours))
    checks.append(compare_token_ids(trl, ours))
    dropped = float(abs(trl.dropped_rows - ours.dropped_rows))
    checks.append(MetricCheck("dropped_rows", trl.dropped_rows, ours.dropped_rows, dropped, 0.0))
    if floor is not None:
        checks.extend(compare_weights_to_floor(trl, ours, floor))
    else:
        checks.append(compare_weights(trl, ours))
    checks.append(compare_packed_4bit(trl, ours))
    if ours.padding_free is not None:
        checks.append(compare_padding_free(ours.padding_free))
    return CaseReport(name=name, checks=checks)


def compare_padding_free(check: PaddingFreeCheck) -> MetricCheck:
    """The row for ``parity.sides.padding_free_check``: the plain path's float32 error (as trl's
    column, the floor) and the padding-free path's (as ours), both against float64."""
    if check.skipped:
        return MetricCheck("padding_free", None, None, 0.0, 0.0, note=check.skipped, gated=False)
    if check.error:
        return MetricCheck("padding_free", None, None, math.inf, 0.0, note=check.error)
    note = (
        f"{check.sequences} sequences; {check.pairs} pairs packed in {check.rows} rows; "
        f"|packed - plain| <= {check.packed_vs_plain:.2e}"
    )
    return MetricCheck(
        "padding_free",
        check.plain_error,
        check.packed_error,
        check.packed_error,
        check.bound,
        note=note,
        floor=check.plain_error,
        factor=FACTOR,
    )


def compare_packed_4bit(trl: RunResult, ours: RunResult) -> MetricCheck:
    """No side may have run a 4-bit layer in bitsandbytes' CPU inference layout: its gradients
    there are zero, so two such runs could agree and both be wrong. The difference is the
    number of packed layers found on both sides; the note names a side's first one."""
    sides = [(who, r.packed_4bit_layers) for who, r in (("trl", trl), ("ours", ours))]
    note = "; ".join(f"{who}: {layers[0]} (+{len(layers) - 1})" for who, layers in sides if layers)
    found = [len(layers) for _, layers in sides]
    return MetricCheck("packed_4bit", found[0], found[1], float(sum(found)), 0.0, note=note)
