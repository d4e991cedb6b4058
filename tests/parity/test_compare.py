"""The comparison and report logic on synthetic runs: each tolerance passes just below its bound
and fails just above, missing data fails, and the JSON has exactly the documented shape."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from parity.compare import CaseReport, compare_runs, difference
from parity.report import format_table, report_json, write_json
from parity.result import STEP_METRICS, RunResult


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


def check(report: CaseReport, name: str):
    return next(c for c in report.checks if c.name == name)


def test_identical_runs_pass_every_check():
    report = compare_runs("same", make_run(), make_run())
    assert report.passed
    assert all(c.max_diff == 0.0 for c in report.checks)
    names = {c.name for c in report.checks}
    assert {"loss@1", "loss", "logps/chosen", "token_ids", "final_weights", "grad_norm"} <= names


@pytest.mark.parametrize(
    ("step", "delta", "fails"),
    [
        # step 1 is held to 1e-6 (loss@1) and 1e-5 (loss over all steps)
        (0, 0.9e-6, set()),
        (0, 1.1e-6, {"loss@1"}),
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
    assert {c.name for c in report.checks if not c.passed} == fails
    assert report.passed == (not fails)


@pytest.mark.parametrize(
    ("step", "delta", "fails"),
    [
        (0, 0.9e-6, set()),
        (0, 1.1e-6, {"grad_norm@1"}),
        (2, 9e-5, set()),
        (2, 1.1e-4, {"grad_norm"}),
    ],
)
def test_grad_norm_is_tight_at_step_1_only(step, delta, fails):
    """Step 1 starts from identical weights; later grad norms follow the weights' drift."""
    ours = make_run()
    ours.steps[step]["grad_norm"] += delta  # |trl| < 1: the relative difference is absolute
    report = compare_runs("grad_norm", make_run(), ours)
    assert {c.name for c in report.checks if not c.passed} == fails


@pytest.mark.parametrize(("delta", "passed"), [(3e-4, True), (4e-4, False)])
def test_large_losses_are_compared_relatively(delta, passed):
    """A squared loss near 35 (sppo_hard): 1 float32 ulp is 3.8e-6, the bound 35 * 1e-5."""
    trl, ours = make_run(), make_run()
    for run in (trl, ours):
        run.steps[2]["loss"] = 35.0
    ours.steps[2]["loss"] += delta
    assert check(compare_runs("big", trl, ours), "loss").passed == passed


def test_rewards_step1_bound():
    ours = make_run()
    ours.steps[0]["rewards/margins"] += 1.5e-6
    report = compare_runs("rewards", make_run(), ours)
    assert not check(report, "rewards/margins@1").passed
    assert check(report, "rewards/margins").passed


@pytest.mark.parametrize(("delta", "passed"), [(9e-4, True), (1.1e-3, False)])
def test_logps_are_relative(delta, passed):
    """At -100 the bound is 1e-5 * 100 = 1e-3 absolute."""
    ours = make_run()
    ours.steps[1]["logps/chosen"] += delta
    result = check(compare_runs("logps", make_run(), ours), "logps/chosen")
    assert result.passed == passed
    assert result.relative and result.note == "step 2"


def test_relative_difference_is_absolute_below_one():
    """|trl| < 1 divides by 1, so small values are not held to a looser relative bound."""
    assert difference(0.5, 0.5 + 2e-5, relative=True) == pytest.approx(2e-5)
    assert difference(-200.0, -200.002, relative=True) == pytest.approx(1e-5)


def test_nan_only_on_one_side_fails():
    assert difference(math.nan, math.nan, relative=False) == 0.0
    assert difference(math.nan, 1.0, relative=False) == math.inf
    ours = make_run()
    ours.steps[2]["entropy"] = math.nan
    assert not check(compare_runs("nan", make_run(), ours), "entropy").passed


def test_token_count_is_exact():
    ours = make_run()
    ours.steps[1]["num_tokens"] += 1
    assert not check(compare_runs("counts", make_run(), ours), "num_tokens").passed


def test_learning_rate_catches_a_schedule_off_by_one_step():
    """A float64 rounding difference passes; the schedule shifted by one step fails."""
    ours = make_run()
    ours.steps[1]["learning_rate"] *= 1 + 1e-15
    assert check(compare_runs("ulp", make_run(), ours), "learning_rate").passed
    shifted = make_run()
    for k in range(1, 3):
        shifted.steps[k]["learning_rate"] = make_run().steps[k - 1]["learning_rate"]
    assert not check(compare_runs("shift", make_run(), shifted), "learning_rate").passed


def test_missing_metric_or_step_fails():
    ours = make_run()
    del ours.steps[1]["entropy"]
    result = check(compare_runs("missing", make_run(), ours), "entropy")
    assert not result.passed and "missing in ours at step 2" in result.note
    short = make_run(steps=2)
    report = compare_runs("short", make_run(steps=3), short)
    assert not check(report, "loss").passed
    assert check(report, "loss@1").passed  # step 1 is there on both sides


def test_token_ids_must_match_exactly():
    ours = make_run()
    ours.token_ids = copy.deepcopy(ours.token_ids)
    ours.token_ids[2]["chosen_ids"] = [7, 3]
    result = check(compare_runs("tokens", make_run(), ours), "token_ids")
    assert result.max_diff == 1.0 and not result.passed
    assert "row 2" in result.note
    ours.token_ids = ours.token_ids[:3]
    assert not check(compare_runs("rows", make_run(), ours), "token_ids").passed


def test_dropped_rows_must_match():
    ours = make_run()
    ours.dropped_rows = 1
    assert not check(compare_runs("dropped", make_run(), ours), "dropped_rows").passed


@pytest.mark.parametrize(("delta", "passed"), [(0.9e-4, True), (1.1e-4, False)])
def test_weight_tolerance(delta, passed):
    ours = make_run()
    ours.final_weights = {k: v.clone() for k, v in ours.final_weights.items()}
    ours.final_weights["b.bias"][2] += delta
    result = check(compare_runs("weights", make_run(), ours), "final_weights")
    assert result.passed == passed
    assert result.note == "b.bias"


def test_weight_names_and_shapes_must_match():
    ours = make_run()
    ours.final_weights = dict(ours.final_weights, extra=torch.zeros(1))
    assert not check(compare_runs("names", make_run(), ours), "final_weights").passed
    ours = make_run()
    ours.final_weights = {"a.weight": torch.zeros(4, 3), "b.bias": torch.zeros(4)}
    result = check(compare_runs("shapes", make_run(), ours), "final_weights")
    assert not result.passed and "shape" in result.note


def test_json_has_exactly_the_documented_shape(tmp_path):
    failing = make_run()
    failing.steps[0]["loss"] += 1e-3
    del failing.steps[0]["entropy"]
    reports = [
        compare_runs("good", make_run(), make_run()),
        compare_runs("bad", make_run(), failing),
        CaseReport(name="cdpo", skipped="cDPO: trl 1.16 ignores label_smoothing for sigmoid"),
        CaseReport(name="boom", error="RuntimeError: x"),
    ]
    path = tmp_path / "parity.json"
    write_json(path, reports, "1.16.0")
    doc = json.loads(path.read_text())
    assert doc == report_json(reports, "1.16.0") | {"cases": doc["cases"]}
    assert set(doc) == {"passed", "trl_version", "cases"}
    assert doc["passed"] is False and doc["trl_version"] == "1.16.0"
    for case in doc["cases"]:
        assert set(case) == {"name", "passed", "max_abs_diff", "tolerance"}
        assert set(case["max_abs_diff"]) == set(case["tolerance"])
    good, bad, cdpo, boom = doc["cases"]
    assert [good["passed"], bad["passed"], cdpo["passed"], boom["passed"]] == [
        True,
        False,
        True,
        False,
    ]
    assert bad["max_abs_diff"]["loss@1"] == pytest.approx(1e-3)
    assert bad["tolerance"]["loss@1"] == 1e-6
    assert bad["max_abs_diff"]["entropy"] is None  # missing: infinite, written as null
    assert cdpo["max_abs_diff"] == {} and boom["tolerance"] == {}


def test_table_shows_values_results_and_reasons():
    failing = make_run()
    failing.steps[0]["loss"] += 1e-3
    reports = [
        compare_runs("bad", make_run(), failing),
        CaseReport(name="cdpo", skipped="cDPO: trl 1.16 ignores label_smoothing for sigmoid"),
    ]
    table = format_table(reports)
    header = table.splitlines()[0].split()
    assert header[:3] == ["case", "metric", "trl"]
    loss_row = next(line for line in table.splitlines() if line.split()[:2] == ["bad", "loss@1"])
    assert "0.69" in loss_row and "0.691" in loss_row and "1.00e-03" in loss_row
    assert "FAIL (step 1)" in loss_row
    assert "SKIP: cDPO" in table
    assert table.splitlines()[-1] == "1/2 cases passed"


def test_bf16_weights_are_compared_in_ulps_of_their_scale():
    """One bf16 rounding step at the tensor's scale passes, two fail; float32 stays absolute."""
    import torch

    from parity.compare import compare_weights, ulp_difference
    from parity.result import RunResult

    a = torch.tensor([0.5, 0.01, 0.0], dtype=torch.bfloat16)
    step = torch.finfo(torch.bfloat16).eps * 0.5
    one = a.double().clone()
    one[1] += step
    two = a.double().clone()
    two[1] += 2.5 * step
    assert ulp_difference(a, one.to(torch.bfloat16)) <= 1.0
    assert ulp_difference(a, two.to(torch.bfloat16)) > 1.0
    trl = RunResult(steps=[], token_ids=[], final_weights={"w": a})
    ours = RunResult(steps=[], token_ids=[], final_weights={"w": two.to(torch.bfloat16)})
    check = compare_weights(trl, ours)
    assert check.name == "final_weights (ulps)" and not check.passed


def test_a_side_whose_4bit_layers_were_packed_fails_and_is_named():
    trl, ours = make_run(), make_run()
    assert check(compare_runs("c", trl, ours), "packed_4bit").passed
    ours.packed_4bit_layers = ["model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"]
    report = compare_runs("c", trl, ours)
    packed = check(report, "packed_4bit")
    assert not report.passed and packed.max_diff == 2
    assert packed.note == "ours: model.layers.0.mlp.up_proj (+1)"
