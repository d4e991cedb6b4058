"""parity.check.pair_slack: a pair metric is never held below one float32 rounding of each
summed log-prob, so a one-ulp difference of a sum passes a zero floor, and a difference several
times larger still fails."""

from __future__ import annotations

import math

import pytest
import torch

from dpo_core.settings import LossSettings
from parity.check.noise_floor import compare_metric_to_floor, measure_floor
from parity.check.pair_slack import EPS32, loss_slope, pair_slack, sum_magnitudes
from parity.check.tolerances import STEP_CHECKS
from parity.sides.result import RunResult

BETA = 0.1
PAIRS = 2


def cohere2_like(steps: int = 3) -> RunResult:
    """Steps whose summed log-probs sit in [128, 256), as Cohere2's did: policy rejected -150.25,
    reference rejected -150.5 (rewards/rejected = beta * 0.25), chosen -130 / -130.125."""
    rows = []
    for k in range(steps):
        pc, rc, pr, rr = -130.0 - k, -130.125 - k, -150.25 - k, -150.5 - k
        rows.append(
            {
                "loss": 0.69 - 0.01 * k,
                "logps/chosen": pc,
                "logps/rejected": pr,
                "rewards/chosen": BETA * (pc - rc),
                "rewards/rejected": BETA * (pr - rr),
                "rewards/margins": BETA * ((pc - rc) - (pr - rr)),
            }
        )
    return RunResult(steps=rows, token_ids=[], final_weights={"w": torch.zeros(1)})


def shifted(run: RunResult, metric: str, delta: float) -> RunResult:
    """``run`` with ``delta`` added to ``metric`` at every step after step 1."""
    steps = [dict(run.steps[0])] + [{**s, metric: s[metric] + delta} for s in run.steps[1:]]
    return RunResult(steps=steps, token_ids=[], final_weights=run.final_weights)


def check(trl: RunResult, ours: RunResult, name: str, loss: LossSettings):
    """``name`` against a floor of 0 (floor runs bit-identical to trl), as in the failing cases."""
    floor = measure_floor(trl, [trl, trl], loss=loss)
    metric, tol = STEP_CHECKS[name]
    return compare_metric_to_floor(name, metric, tol, trl, ours, floor)


def one_ulp_of_a_sum_in_a_mean(magnitude: float, scale: float) -> float:
    """One float32 ulp of one pair's summed log-prob at ``magnitude``, in a mean over
    ``PAIRS`` pairs, times ``scale`` (beta for a reward)."""
    return scale * math.ulp(magnitude) * 2**29 / PAIRS  # float64 ulp * 2^29 = float32 ulp


def test_one_ulp_of_a_summed_logp_passes_a_zero_floor():
    """Cohere2's failure: rewards/rejected 7.63e-7 = beta x one ulp at |logp| in [128, 256) / 2
    pairs, with floor runs bit-identical to trl. It passes (without the pair slack the bound
    was one rounding of the reward itself, ~3e-9)."""
    trl, loss = cohere2_like(), LossSettings(beta=BETA)
    delta = one_ulp_of_a_sum_in_a_mean(150.0, BETA)
    assert delta == pytest.approx(7.63e-7, rel=1e-3)
    row = check(trl, shifted(trl, "rewards/rejected", delta), "rewards/rejected", loss)
    assert row.passed, (row.max_diff, row.tolerance)
    for name, scale in [("rewards/chosen", BETA), ("rewards/margins", BETA), ("logps/chosen", 1)]:
        d = one_ulp_of_a_sum_in_a_mean(130.0, scale)
        assert check(trl, shifted(trl, name, d), name, loss).passed, name


def test_the_robust_loss_passes_one_rounding_and_fails_a_larger_difference():
    """robust (label smoothing 0.1): the loss moves by at most beta / (1 - 0.2) per nat; one
    ulp of one sum passes, 20x the whole slack fails."""
    trl, loss = cohere2_like(), LossSettings(beta=BETA, loss_type=["robust"], label_smoothing=0.1)
    one = BETA / 0.8 * one_ulp_of_a_sum_in_a_mean(150.0, 1.0)
    assert check(trl, shifted(trl, "loss", one), "loss", loss).passed
    slack = pair_slack(trl, "loss", loss, relative=True)
    assert not check(trl, shifted(trl, "loss", 20 * slack), "loss", loss).passed


@pytest.mark.parametrize("name", ["rewards/chosen", "rewards/rejected", "rewards/margins"])
def test_a_difference_several_times_the_slack_fails(name):
    """The slack is every sum's rounding at once (4 sums for a margin); 5x that fails."""
    trl, loss = cohere2_like(), LossSettings(beta=BETA)
    slack = pair_slack(trl, name, loss, relative=True)
    assert slack > 0
    assert check(trl, shifted(trl, name, 0.9 * slack), name, loss).passed
    row = check(trl, shifted(trl, name, 5 * slack), name, loss)
    assert not row.passed, (row.max_diff, row.tolerance)


def test_slack_is_the_rounding_of_each_sum_at_its_magnitude():
    """rewards/rejected: beta * eps * (|π̄_r| + |ρ̄_r|) at the largest step; logps: eps * |π̄|."""
    trl, loss = cohere2_like(steps=3), LossSettings(beta=BETA)
    m = sum_magnitudes(trl, BETA)
    assert m["logps/rejected"] == 152.25 and m["ref/rejected"] == pytest.approx(152.5)
    expected = BETA * EPS32 * (152.25 + 152.5)
    assert pair_slack(trl, "rewards/rejected", loss, relative=True) == pytest.approx(expected)
    # a relative check over |logps| > 1 divides by the smallest |value|
    logps = pair_slack(trl, "logps/chosen", loss, relative=True)
    assert logps == pytest.approx(EPS32 * 132.0 / 130.0)
    assert pair_slack(trl, "entropy", loss, relative=True) == 0.0
    assert pair_slack(trl, "rewards/chosen", None, relative=True) == 0.0


def test_loss_slopes():
    """sigmoid: beta per nat; sppo_hard: 2 sqrt(loss) (not beta-scaled); weights add."""
    assert loss_slope(LossSettings(beta=0.1), 0.7) == pytest.approx(0.1)
    assert loss_slope(LossSettings(loss_type=["sppo_hard"]), 25.0) == pytest.approx(10.0)
    both = LossSettings(beta=0.1, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5])
    assert loss_slope(both, 1.0) == pytest.approx(0.1 + 0.5)
