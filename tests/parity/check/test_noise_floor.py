"""The noise-floor checks on synthetic runs: differences the size of the floor pass, scaled ones
fail, a zero floor still allows one float32 rounding, step 1 keeps its fixed bounds, and the
table and JSON show the floor. The end-to-end checks (real cases, negative controls) are in
``test_parity_cases.py``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from parity.check.compare import compare_runs
from parity.check.noise_floor import (
    EPS32,
    METRIC_FACTOR,
    UNFLOORED,
    WEIGHT_FACTOR,
    WEIGHT_QUANTILES,
    abs_quantiles,
    measure_floor,
    summation_slack,
)
from parity.check.table import format_table, report_json
from parity.check.tolerances import STEP_CHECKS
from parity.sides.models import nudge_one_ulp
from parity.sides.result import STEP_METRICS, RunResult

WEIGHT_ROWS = [f"final_weights {k}" for k in [*WEIGHT_QUANTILES, "max"]]
FLOORED = [n for n, (_, t) in STEP_CHECKS.items() if not t.first_step_only and n not in UNFLOORED]


def make_run(steps: int = 4, seed: int = 0) -> RunResult:
    """Steps with metrics near 0.5 (loss near log 2, logps near -100) and two weight tensors of
    1000 elements of size ~0.02."""
    rows = []
    for k in range(steps):
        step = {name: 0.5 + 0.01 * k for name in STEP_METRICS}
        step.update({"loss": 0.69 - 0.01 * k, "logps/chosen": -100.0, "logps/rejected": -120.0})
        step.update({"num_tokens": 300.0 * (k + 1), "learning_rate": 1e-3 * (steps - k) / steps})
        rows.append(step)
    g = torch.Generator().manual_seed(seed)
    weights = {n: 0.02 * torch.randn(1000, generator=g) for n in ("a.weight", "b.weight")}
    return RunResult(steps=rows, token_ids=[], final_weights=weights)


def noisy(run: RunResult, size: float, seed: int, metric_size: float | None = None) -> RunResult:
    """``run`` with Gaussian noise of ``size`` on every weight and ``metric_size`` (default:
    ``size``) added, with a seeded sign, to every floored metric at every step after step 1
    (which real runs share exactly)."""
    g = torch.Generator().manual_seed(seed)
    metric_size = size if metric_size is None else metric_size
    weights = {
        n: w + size * torch.randn(w.shape, generator=g) for n, w in run.final_weights.items()
    }
    steps = [dict(run.steps[0])]
    for step in run.steps[1:]:
        signs = torch.randint(0, 2, (len(FLOORED),), generator=g) * 2 - 1
        extra = {STEP_CHECKS[n][0]: float(s) * metric_size for n, s in zip(FLOORED, signs)}
        steps.append({k: v + extra.get(k, 0.0) for k, v in step.items()})
    return RunResult(steps=steps, token_ids=[], final_weights=weights)


@pytest.fixture
def trl_and_floor():
    trl = make_run()
    return trl, measure_floor(trl, [noisy(trl, 1e-6, seed=1), noisy(trl, 1e-6, seed=2)])


def failing(report) -> set[str]:
    return {c.name for c in report.checks if not c.passed}


def test_noise_the_size_of_the_floor_passes_and_rows_name_their_floor(trl_and_floor):
    trl, floor = trl_and_floor
    report = compare_runs("noise", trl, noisy(trl, 1e-6, seed=3), floor)
    assert report.passed, failing(report)
    names = [c.name for c in report.checks]
    assert names[-len(WEIGHT_ROWS) - 1 : -1] == WEIGHT_ROWS and "final_weights" not in names
    for name in [*FLOORED, *WEIGHT_ROWS]:
        row = next(c for c in report.checks if c.name == name)
        assert row.floor is not None and row.factor in (METRIC_FACTOR, WEIGHT_FACTOR), name
        assert 0 < row.max_diff < row.tolerance
    for name in ("loss@1", "num_tokens", "learning_rate"):  # fixed bounds, no floor
        assert next(c for c in report.checks if c.name == name).floor is None


def test_weights_a_multiple_of_the_floor_fail_on_every_quantile(trl_and_floor):
    trl, floor = trl_and_floor
    ours = noisy(trl, 30 * 1e-6, seed=3, metric_size=1e-6)
    assert failing(compare_runs("w", trl, ours, floor)) == {
        f"final_weights {k}" for k in WEIGHT_QUANTILES
    }


def test_one_tensor_off_fails_and_is_named(trl_and_floor):
    trl, floor = trl_and_floor
    ours = noisy(trl, 1e-6, seed=3)
    ours.final_weights["b.weight"] = ours.final_weights["b.weight"] * (1 + 1e-2)
    report = compare_runs("w", trl, ours, floor)
    assert failing(report) == {f"final_weights {k}" for k in WEIGHT_QUANTILES}
    assert all(c.note == "b.weight" for c in report.checks if c.name in WEIGHT_ROWS)


def test_the_largest_weight_difference_is_reported_not_gated(trl_and_floor):
    trl, floor = trl_and_floor
    ours = noisy(trl, 1e-6, seed=3)
    ours.final_weights["a.weight"][7] += 1e-3  # one element, as Adam's first step can move one
    report = compare_runs("w", trl, ours, floor)
    row = next(c for c in report.checks if c.name == "final_weights max")
    assert report.passed and not row.gated and not row.within and row.note == "a.weight"
    assert "info, over" in format_table([report])


@pytest.mark.parametrize("name", FLOORED)
def test_each_metric_after_step_1_is_held_to_its_floor(trl_and_floor, name):
    """5x the floor's largest difference passes just below, fails just above, on its own check;
    the step-1 bounds are untouched."""
    trl, floor = trl_and_floor
    metric, tol = STEP_CHECKS[name]
    f = floor.metrics[name]
    scale = max(
        abs(s[metric]) / (max(1.0, abs(s[metric])) if tol.relative else 1) for s in trl.steps
    )
    allowed = METRIC_FACTOR * f + EPS32 * scale
    assert f > 0
    for factor, fails in ((0.9, set()), (1.1, {name})):
        ours = make_run()
        delta = factor * allowed * (max(1.0, abs(trl.steps[2][metric])) if tol.relative else 1)
        ours.steps[2][metric] += delta
        report = compare_runs(name, trl, ours, floor)
        assert failing(report) == fails
        row = next(c for c in report.checks if c.name == name)
        assert row.tolerance == pytest.approx(allowed) and row.note == "step 3"


def test_step_1_keeps_its_fixed_bounds_under_a_floor(trl_and_floor):
    """A step-1 difference the floor would allow still fails ``loss@1``, and the floor check
    reads steps 2..N only."""
    trl, floor = trl_and_floor
    ours = make_run()
    ours.steps[0]["loss"] += 2e-6  # over loss@1's 1e-6, under 5x a floor of ~1e-6
    report = compare_runs("s1", trl, ours, floor)
    assert failing(report) == {"loss@1"}
    assert next(c for c in report.checks if c.name == "loss").max_diff == 0.0


def test_a_zero_floor_still_allows_one_float32_rounding():
    """Floor runs identical to trl (floor 0): ours one ulp off everywhere passes; two ulps do
    not (on the weights; the metrics' allowance is at their scale, so 2 ulps there pass)."""
    trl = make_run()
    floor = measure_floor(trl, [make_run(), make_run()])
    assert set(floor.metrics.values()) == {0.0}
    one = make_run()
    one.final_weights = {n: torch.nextafter(w, w * 2) for n, w in trl.final_weights.items()}
    for step in one.steps:
        step.update(
            {STEP_CHECKS[n][0]: float(np.float32(step[STEP_CHECKS[n][0]])) for n in FLOORED}
        )
    assert compare_runs("ulp", trl, one, floor).passed
    two = make_run()
    two.final_weights = {n: w + 2.5 * EPS32 * w for n, w in trl.final_weights.items()}
    assert failing(compare_runs("ulp", trl, two, floor)) >= {"final_weights q90"}


def test_without_a_floor_the_fixed_bounds_stay(trl_and_floor):
    trl, floor = trl_and_floor
    names = [c.name for c in compare_runs("plain", trl, make_run()).checks]
    assert "final_weights" in names and not set(WEIGHT_ROWS) & set(names)
    low = make_run()
    low.final_weights = {n: w.bfloat16() for n, w in low.final_weights.items()}
    assert "final_weights (ulps)" in [c.name for c in compare_runs("bf16", low, low).checks]


def test_bf16_weights_are_floored_with_one_bf16_rounding_of_slack():
    """bf16 weights: the same quantile rows, the floor, plus one bf16 eps at each quantile's
    scale (float32's eps there would be below one bf16 step)."""
    trl = make_run()
    trl.final_weights = {n: w.bfloat16() for n, w in trl.final_weights.items()}
    floor = measure_floor(trl, [trl, trl])  # a floor of 0: only the rounding slack is left
    one = make_run()
    one.final_weights = {n: torch.nextafter(w, w * 2) for n, w in trl.final_weights.items()}
    report = compare_runs("bf16", trl, one, floor)
    assert {c.name for c in report.checks} >= set(WEIGHT_ROWS) and report.passed
    three = make_run()
    three.final_weights = {
        n: (w.float() * (1 + 3 * 2**-7)).bfloat16() for n, w in trl.final_weights.items()
    }
    assert failing(compare_runs("bf16", trl, three, floor)) >= {"final_weights q90"}


def test_missing_weights_fail_every_weight_row(trl_and_floor):
    trl, floor = trl_and_floor
    ours = make_run()
    del ours.final_weights["a.weight"]
    report = compare_runs("names", trl, ours, floor)
    assert {"final_weights q90", "final_weights q99", "final_weights q99.9"} <= failing(report)
    assert all(c.max_diff == math.inf for c in report.checks if c.name in WEIGHT_ROWS)


def test_a_nan_weight_fails_every_gated_row(trl_and_floor):
    trl, floor = trl_and_floor
    ours = make_run()
    ours.final_weights["b.weight"][3] = math.nan
    report = compare_runs("nan", trl, ours, floor)
    assert failing(report) == {f"final_weights {k}" for k in WEIGHT_QUANTILES}


def test_a_single_step_run_has_nothing_after_step_1(trl_and_floor):
    trl = make_run(steps=1)
    floor = measure_floor(trl, [noisy(trl, 1e-6, seed=1)])
    report = compare_runs("one", trl, noisy(trl, 1e-6, seed=2, metric_size=0.0), floor)
    assert report.passed
    assert next(c for c in report.checks if c.name == "loss").note == "no step after step 1"


def test_measure_floor_takes_the_largest_over_runs_and_steps():
    trl = make_run()
    small, large = noisy(trl, 1e-7, seed=1), noisy(trl, 1e-6, seed=2)
    large.steps[3]["entropy"] = trl.steps[3]["entropy"] + 3e-5
    floor = measure_floor(trl, [small, large])
    assert floor.runs == 2 and floor.metrics["entropy"] == pytest.approx(3e-5)
    expected = abs_quantiles(large.final_weights["a.weight"] - trl.final_weights["a.weight"])
    assert floor.weights["a.weight"] == pytest.approx(expected)
    assert set(floor.metrics) == set(FLOORED)
    with pytest.raises(ValueError):
        measure_floor(trl, [])
    with pytest.raises(ValueError):
        measure_floor(trl, [make_run(steps=3)])


def test_abs_quantiles_are_lower_order_statistics_of_the_magnitudes():
    x = torch.tensor([-(i + 1.0) for i in range(2001)])  # |x| = 1..2001
    q = abs_quantiles(x)
    for key, p in WEIGHT_QUANTILES.items():
        assert q[key] == np.quantile(np.arange(1, 2002), p, method="lower"), key
    assert q["max"] == 2001.0
    assert abs_quantiles(torch.zeros(0)) == dict.fromkeys(q, 0.0)


def test_table_and_json_show_the_floor(trl_and_floor):
    trl, floor = trl_and_floor
    report = compare_runs("noise", trl, noisy(trl, 1e-6, seed=3), floor)
    table = format_table([report])
    loss_row = next(line for line in table.splitlines() if line.split()[:1] == ["loss"])
    assert f"(5x floor {floor.metrics['loss']:.1e}) rel" in loss_row and "pass" in loss_row
    (case,) = report_json([report], "1.16.0")["cases"]
    assert set(case["floor"]) == {*FLOORED, *WEIGHT_ROWS}
    assert case["floor"]["loss"] == floor.metrics["loss"]
    plain = report_json([compare_runs("plain", trl, make_run())], "1.16.0")["cases"][0]
    assert plain["floor"] == {}


def test_nudge_moves_every_float_weight_by_one_ulp_with_a_seeded_sign():
    """Frozen weights too (the backbone under LoRA), each in its own dtype (bf16 adapters)."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    model[1].bias.requires_grad_(False)
    model[1].to(torch.bfloat16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    nudge_one_ulp(model, seed=1)
    after = {n: p.detach().clone() for n, p in model.named_parameters()}
    for name in ("0.weight", "0.bias", "1.weight", "1.bias"):
        a, b = before[name], after[name]
        up, down = torch.nextafter(a, a + 1), torch.nextafter(a, a - 1)
        assert torch.all((b == up) | (b == down)), name
        if a.numel() >= 16:
            assert 0 < (b > a).sum() < a.numel()  # both signs occur
    again = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    again[1].to(torch.bfloat16)
    again.load_state_dict(before)
    nudge_one_ulp(again, seed=1)
    assert all(torch.equal(p, after[n]) for n, p in again.named_parameters())


def test_a_zero_floor_allows_token_means_their_summation_order_and_nothing_more():
    """Floor runs identical to trl: a token mean (entropy) a few ulps off, as two summation
    orders of n = 1200 tokens give, passes (2 * ceil(log2 1200) = 22 ulps at its scale); 40 ulps
    fail; and a pair metric (loss) gets no such slack: 3 ulps there fail."""
    trl = make_run()
    floor = measure_floor(trl, [make_run(), make_run()])
    assert summation_slack(trl, "entropy", relative=True) == 22 * EPS32 * 0.53
    assert summation_slack(trl, "loss", relative=True) == 0.0

    def shifted(metric: str, ulps: float) -> RunResult:
        run = make_run()
        for step in run.steps[1:]:
            step[metric] += ulps * EPS32 * max(1.0, abs(step[metric]))
        return run

    assert compare_runs("order", trl, shifted("entropy", 3), floor).passed
    assert failing(compare_runs("order", trl, shifted("entropy", 40), floor)) == {"entropy"}
    assert failing(compare_runs("order", trl, shifted("loss", 3), floor)) == {"loss"}


def test_a_zero_floor_allows_grad_norm_its_summation_order_and_nothing_more():
    """grad_norm sums the squares of P = 2000 trained parameters: with floor runs identical to
    trl, ceil(log2 2000) = 11 roundings of it pass (measured on a tiny Gemma: 1.1), 30 fail."""
    trl = make_run()
    floor = measure_floor(trl, [make_run(), make_run()])
    assert summation_slack(trl, "grad_norm", relative=True) == 11 * EPS32 * 0.53

    def shifted(ulps: float) -> RunResult:
        run = make_run()
        for step in run.steps[1:]:
            step["grad_norm"] += ulps * EPS32 * max(1.0, abs(step["grad_norm"]))
        return run

    assert compare_runs("order", trl, shifted(1.1), floor).passed
    assert failing(compare_runs("order", trl, shifted(30), floor)) == {"grad_norm"}
