"""The comparison and report logic on synthetic runs: two independently built equal runs agree
exactly; each documented tolerance passes just below its bound and fails just above it, in the
absolute (|trl| < 1) and the relative (|trl| > 1) regime, and fails only its own check; missing
data fails, and the JSON has exactly the documented shape."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from datasets import Dataset
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from parity.check.compare import compare_runs
from parity.check.tolerances import STEP_CHECKS, CaseReport, difference
from parity.sides.result import STEP_METRICS, TOKEN_FIELDS, RunResult
from parity.sides.trl_side import step_metrics

# The tolerance table of parity/check/tolerances.py's docstring, written out independently of the
# module's constants: check -> (bound, relative, step 1 only).
REWARDS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")
DOCUMENTED = {
    "loss@1": (1e-6, True, True),
    **{f"{m}@1": (1e-6, True, True) for m in REWARDS},
    "loss": (1e-5, True, False),
    **{m: (1e-5, True, False) for m in REWARDS},
    "logps/chosen": (1e-5, True, False),
    "logps/rejected": (1e-5, True, False),
    "logits/chosen": (1e-5, True, False),
    "logits/rejected": (1e-5, True, False),
    "entropy": (1e-5, True, False),
    "grad_norm@1": (1e-6, True, True),
    "grad_norm": (1e-4, True, False),
    "mean_token_accuracy": (1e-6, False, False),
    "num_tokens": (0.0, False, False),
    "learning_rate": (1e-12, False, False),
}
OTHER_CHECKS = ["token_ids", "dropped_rows", "final_weights", "packed_4bit"]


def make_run(steps: int = 3) -> RunResult:
    """A plausible run: loss near log 2, summed logps near -100, two small weight tensors."""
    rows = []
    for k in range(steps):
        step = {name: 0.5 + 0.01 * k for name in STEP_METRICS}
        step.update({"loss": 0.69 - 0.01 * k, "logps/chosen": -100.0, "logps/rejected": -120.0})
        step.update({"num_tokens": 300.0 * (k + 1), "learning_rate": 1e-3 * (steps - k) / steps})
        rows.append(step)
    tokens = [
        {"prompt_ids": [1, 5, 6], "chosen_ids": [7, 2], "rejected_ids": [8, 9, 2]} for _ in range(4)
    ]
    weights = {"a.weight": torch.linspace(-1, 1, 12).reshape(3, 4), "b.bias": torch.zeros(4)}
    return RunResult(steps=rows, token_ids=tokens, final_weights=weights, dropped_rows=0)


def as_trl_side_builds_it(run: RunResult) -> RunResult:
    """The same numbers through trl's side's path: steps from a Trainer ``log_history`` (integer
    token counts, ``step``/``epoch`` keys, the end-of-training summary) via
    ``parity.sides.trl_side.step_metrics``, token ids through a ``datasets.Dataset``, weights
    through a safetensors round trip. Nothing is shared with ``run``."""
    n = len(run.steps)
    history = [
        {**s, "num_tokens": int(s["num_tokens"]), "step": i, "epoch": i / n}
        for i, s in enumerate(run.steps, start=1)
    ]
    history.append({"train_loss": 0.6, "train_runtime": 1.0, "step": n, "epoch": 1.0})
    tokens = Dataset.from_list(run.token_ids).select_columns(list(TOKEN_FIELDS)).to_list()
    weights = load_safetensors(save_safetensors(run.final_weights))
    return RunResult(step_metrics(history, n), tokens, weights, run.dropped_rows)


def check(report: CaseReport, name: str):
    return next(c for c in report.checks if c.name == name)


def failing(report: CaseReport) -> set[str]:
    return {c.name for c in report.checks if not c.passed}


def test_the_step_checks_are_the_documented_table():
    assert list(STEP_CHECKS) == list(DOCUMENTED)
    for name, (metric, tol) in STEP_CHECKS.items():
        assert (tol.bound, tol.relative, tol.first_step_only) == DOCUMENTED[name], name
        assert metric == name.removesuffix("@1")


def test_independently_built_equal_runs_pass_every_check_exactly():
    trl, ours = as_trl_side_builds_it(make_run()), make_run()
    # Built apart: no step dict, token list or weight storage is shared, so a perturbation of
    # one side (as the tests below make) cannot reach the other.
    assert not {id(s) for s in trl.steps} & {id(s) for s in ours.steps}
    assert trl.token_ids[0]["chosen_ids"] is not ours.token_ids[0]["chosen_ids"]
    assert all(
        trl.final_weights[k].data_ptr() != ours.final_weights[k].data_ptr()
        for k in ours.final_weights
    )
    assert trl.steps[0].keys() == ours.steps[0].keys()  # step/epoch gone, nothing else lost
    report = compare_runs("same", trl, ours)
    assert report.passed
    assert [c.name for c in report.checks] == [*DOCUMENTED, *OTHER_CHECKS]
    assert all(c.max_diff == 0.0 for c in report.checks)
    for name in DOCUMENTED:  # every step check saw both sides' numbers
        c = check(report, name)
        assert c.trl_value is not None and c.trl_value == c.ours_value, name
    ours.steps[2]["loss"] += 1.0
    assert failing(compare_runs("same", trl, ours)) == {"loss"}


def test_float32_rounding_of_every_value_passes_every_check_but_the_float64_schedule():
    """Rounding each logged value to float32 (as a side logging float32 tensors would) is far
    below every bound, except the learning rate's: its 1e-12 holds the float64 formula."""
    trl, ours = make_run(), make_run()
    for step in ours.steps:
        step.update({k: float(np.float32(v)) for k, v in step.items()})
    report = compare_runs("f32", trl, ours)
    assert check(report, "loss").max_diff > 0  # the rounding did move the values
    assert check(report, "learning_rate").max_diff > 1e-12
    assert failing(report) == {"learning_rate"}


def perturbed(name: str, value: float, delta: float) -> tuple[RunResult, RunResult, int]:
    """(trl, ours) with ``name``'s metric set to ``value`` on both sides at the step its check
    reads alone (step 1 for the step-1 checks, the last step for the others), and ``delta``
    added on ours; and that step's index."""
    metric, tol = STEP_CHECKS[name]
    trl, ours = make_run(), make_run()
    step = 0 if tol.first_step_only else len(trl.steps) - 1
    trl.steps[step][metric] = value
    ours.steps[step][metric] = value + delta
    return trl, ours, step


@pytest.mark.parametrize("value", [0.5, -40.0])
@pytest.mark.parametrize("name", list(DOCUMENTED))
def test_each_bound_passes_just_below_and_fails_just_above_on_its_own_check(name, value):
    """At |trl| = 0.5 the bound is absolute; at |trl| = 40 a relative bound scales by 40 and an
    absolute one does not. Only the perturbed check fails (its step-1 or all-steps twin reads
    another step or has a looser bound), and it reports the step and both values."""
    bound, relative, _ = DOCUMENTED[name]
    allowed = bound * max(1.0, abs(value)) if relative else bound
    below, above = (0.9 * allowed, 1.1 * allowed) if bound else (0.0, 1.0)  # counts: 1 apart
    for delta, fails in ((below, set()), (above, {name})):
        trl, ours, step = perturbed(name, value, delta)
        report = compare_runs(name, trl, ours)
        assert failing(report) == fails, (delta, failing(report))
        result = check(report, name)
        if bound:  # the difference as documented (float64 rounding of value + delta aside)
            expected = delta / max(1.0, abs(value)) if relative else delta
            assert result.max_diff == pytest.approx(expected, rel=1e-6, abs=math.ulp(value))
    assert (result.trl_value, result.ours_value) == (value, value + above)
    assert result.note == f"step {step + 1}" and result.relative == relative


@pytest.mark.parametrize(
    ("step", "delta", "fails"),
    [
        # step 1 is held to 1e-6 (loss@1) and 1e-5 (loss over all steps)
        (0, 0.9e-6, set()),
        (0, 1.1e-6, {"loss@1"}),
        (0, 9e-6, {"loss@1"}),
        (0, 1.1e-5, {"loss@1", "loss"}),
        # later steps only to 1e-5
        (2, 9e-6, set()),
        (2, 1.1e-5, {"loss"}),
    ],
)
def test_loss_tolerances(step, delta, fails):
    ours = make_run()
    ours.steps[step]["loss"] += delta
    report = compare_runs("loss", make_run(), ours)
    assert failing(report) == fails
    assert report.passed == (not fails)


@pytest.mark.parametrize(
    ("step", "delta", "fails"),
    [
        (0, 0.9e-6, set()),
        (0, 1.1e-6, {"grad_norm@1"}),
        (0, 1.1e-4, {"grad_norm@1", "grad_norm"}),
        (2, 9e-5, set()),
        (2, 1.1e-4, {"grad_norm"}),
    ],
)
def test_grad_norm_is_tight_at_step_1_only(step, delta, fails):
    """Step 1 starts from identical weights; later grad norms follow the weights' drift."""
    ours = make_run()
    ours.steps[step]["grad_norm"] += delta  # |trl| < 1: the relative difference is absolute
    report = compare_runs("grad_norm", make_run(), ours)
    assert failing(report) == fails


@pytest.mark.parametrize(("delta", "passed"), [(3.4e-4, True), (3.6e-4, False)])
def test_large_losses_are_compared_relatively(delta, passed):
    """A squared loss near 35 (sppo_hard): 1 float32 ulp is 3.8e-6, the bound 35 * 1e-5."""
    trl, ours = make_run(), make_run()
    for run in (trl, ours):
        run.steps[2]["loss"] = 35.0
    ours.steps[2]["loss"] += delta
    assert failing(compare_runs("big", trl, ours)) == (set() if passed else {"loss"})


def test_rewards_step1_bound():
    ours = make_run()
    ours.steps[0]["rewards/margins"] += 1.5e-6
    report = compare_runs("rewards", make_run(), ours)
    assert failing(report) == {"rewards/margins@1"}  # the all-steps bound, 1e-5, holds


@pytest.mark.parametrize(("delta", "passed"), [(9e-4, True), (1.1e-3, False)])
def test_logps_are_relative(delta, passed):
    """At -100 the bound is 1e-5 * 100 = 1e-3 absolute."""
    ours = make_run()
    ours.steps[1]["logps/chosen"] += delta
    report = compare_runs("logps", make_run(), ours)
    assert failing(report) == (set() if passed else {"logps/chosen"})
    result = check(report, "logps/chosen")
    assert result.relative and result.note == "step 2"
    assert result.max_diff == pytest.approx(delta / 100, rel=1e-6)


@pytest.mark.parametrize(
    ("trl", "ours", "relative", "expected"),
    [
        (0.5, 0.5 + 2e-5, True, 2e-5),  # |trl| < 1 divides by 1, not by 0.5
        (0.0, 1e-7, True, 1e-7),  # no division by zero
        (1.0, 1.0 + 2e-5, True, 2e-5),  # the edge: max(1, 1) = 1
        (2.0, 2.0 + 2e-5, True, 1e-5),  # just above it: relative
        (-200.0, -200.002, True, 1e-5),  # by |trl|
        (1.0, 200.0, True, 199.0),  # by trl's magnitude, not ours
        (-200.0, -200.002, False, 2e-3),  # absolute: never divided
    ],
)
def test_difference_is_relative_to_max_one_and_trl(trl, ours, relative, expected):
    assert difference(trl, ours, relative) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("relative", [False, True])
def test_nan_or_infinity_on_one_side_only_is_an_infinite_difference(relative):
    nan, inf = math.nan, math.inf
    assert difference(nan, nan, relative) == 0.0
    assert difference(inf, inf, relative) == difference(-inf, -inf, relative) == 0.0
    for a, b in [(nan, 1.0), (1.0, nan), (inf, 1.0), (1.0, inf), (inf, -inf), (inf, nan)]:
        assert difference(a, b, relative) == math.inf, (a, b)


@pytest.mark.parametrize("metric", ["entropy", "loss", "learning_rate"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_a_value_only_one_side_has_fails_its_check(metric, value):
    """Relative checks too: ``inf / max(1, inf)`` must not become a NaN that passes."""
    ours = make_run()
    ours.steps[2][metric] = value
    report = compare_runs("nan", make_run(), ours)
    assert failing(report) == {metric}
    assert check(report, metric).max_diff == math.inf
    trl = make_run()
    trl.steps[2][metric] = value
    assert failing(compare_runs("nan", trl, ours)) == set()  # the same on both sides


def test_token_count_is_exact():
    ours = make_run()
    ours.steps[1]["num_tokens"] += 1
    report = compare_runs("counts", make_run(), ours)
    assert failing(report) == {"num_tokens"} and check(report, "num_tokens").max_diff == 1.0


def test_learning_rate_catches_a_schedule_off_by_one_step():
    """A float64 rounding difference passes; the schedule shifted by one step fails."""
    ours = make_run()
    ours.steps[1]["learning_rate"] *= 1 + 1e-15
    report = compare_runs("ulp", make_run(), ours)
    assert 0 < check(report, "learning_rate").max_diff < 1e-17 and report.passed
    shifted = make_run()
    for k in range(1, 3):
        shifted.steps[k]["learning_rate"] = make_run().steps[k - 1]["learning_rate"]
    assert failing(compare_runs("shift", make_run(), shifted)) == {"learning_rate"}


def test_missing_metric_or_step_fails():
    ours = make_run()
    del ours.steps[1]["entropy"]
    report = compare_runs("missing", make_run(), ours)
    assert failing(report) == {"entropy"}
    assert "missing in ours at step 2" in check(report, "entropy").note
    all_steps = {n for n, (_, tol) in STEP_CHECKS.items() if not tol.first_step_only}
    for trl_steps, ours_steps in ((3, 2), (2, 3)):  # a step missing, or one too many
        report = compare_runs("steps", make_run(trl_steps), make_run(ours_steps))
        assert failing(report) == all_steps  # the step-1 checks have step 1 on both sides
        note = f"ours has {ours_steps} steps, trl {trl_steps}"
        assert all(check(report, n).note == note for n in all_steps)


def test_token_ids_must_match_exactly():
    ours = make_run()
    ours.token_ids = copy.deepcopy(ours.token_ids)
    ours.token_ids[2]["chosen_ids"] = [7, 3]
    report = compare_runs("tokens", make_run(), ours)
    result = check(report, "token_ids")
    assert failing(report) == {"token_ids"} and result.max_diff == 1.0
    assert result.note == "first differing row 2"
    ours.token_ids = ours.token_ids[:3]  # row 2 still differs, and row 3 is missing
    result = check(compare_runs("rows", make_run(), ours), "token_ids")
    assert (
        result.max_diff == 2.0 and result.note == "4 rows in trl, 3 in ours; first differing row 2"
    )


def test_dropped_rows_must_match():
    ours = make_run()
    ours.dropped_rows = 1
    report = compare_runs("dropped", make_run(), ours)
    result = check(report, "dropped_rows")
    assert failing(report) == {"dropped_rows"}
    assert (result.trl_value, result.ours_value, result.max_diff) == (0, 1, 1.0)


@pytest.mark.parametrize("scale", [1.0, 50.0])
@pytest.mark.parametrize(("delta", "passed"), [(0.9e-4, True), (1.1e-4, False)])
def test_weight_tolerance_is_absolute(scale, delta, passed):
    """1e-4 absolute at any weight scale (at 50 a relative 1e-4 would allow 5e-3)."""
    trl, ours = make_run(), make_run()
    for run in (trl, ours):
        run.final_weights["b.bias"][2] = scale
    ours.final_weights["b.bias"][2] += delta
    report = compare_runs("weights", trl, ours)
    result = check(report, "final_weights")
    assert failing(report) == (set() if passed else {"final_weights"})
    assert result.note == "b.bias"
    stored = float(torch.tensor(scale) + delta)  # scale + delta as the float32 weight holds it
    assert result.max_diff == stored - scale  # absolute: not divided by the scale


def test_weight_names_and_shapes_must_match():
    ours = make_run()
    ours.final_weights = dict(ours.final_weights, extra=torch.zeros(1))
    report = compare_runs("names", make_run(), ours)
    assert failing(report) == {"final_weights"}
    assert check(report, "final_weights").note == "missing in ours [], extra in ours ['extra']"
    ours = make_run()
    ours.final_weights = {"a.weight": torch.zeros(4, 3), "b.bias": torch.zeros(4)}
    result = check(compare_runs("shapes", make_run(), ours), "final_weights")
    assert not result.passed and result.note == "a.weight: shape (3, 4) vs (4, 3)"
