"""The own-logits oracle: each side's step-1 log-probs against the model's own logits.

The attribution on controlled values (a side off by more than the float32 bound is named, a
side within it is not, a side that did not run has no column), then real runs: on llama both
sides agree with the oracle; cohere2 passes parity as a whole; a mixture of experts (qwen2_moe)
runs with its float64 check measured, not an ERROR; granitemoe, where trl 1.16 raises, is
reported as trl's failure with ours still held to the oracle.
"""

from __future__ import annotations

import pytest

from parity.check.cli import run_case
from parity.check.own_logits import compare_own_logits
from parity.sides import own_logits
from parity.sides.cases import ParityCase
from parity.sides.own_logits import QUANTITIES, OwnLogits
from parity.sides.result import RunResult
from tests.parity.check.test_parity_cases import failures

BETA = 0.1
ORACLE = OwnLogits(
    values={"logps/chosen": -30.0, "logps/rejected": -50.0}
    | {"ref_logps/chosen": -30.5, "ref_logps/rejected": -49.0},
    bounds=dict.fromkeys(QUANTITIES, 2e-5),
)


def side(chosen: float = -30.0, rejected: float = -50.0, ref_shift: float = 0.0) -> RunResult:
    """A run whose step 1 logs these policy means, and the oracle's reference means moved by
    ``ref_shift`` (through ``rewards/*``: ``rewards = beta * (logps - ref)``)."""
    ref_c, ref_r = -30.5 + ref_shift, -49.0 + ref_shift
    step = {
        "logps/chosen": chosen,
        "logps/rejected": rejected,
        "rewards/chosen": BETA * (chosen - ref_c),
        "rewards/rejected": BETA * (rejected - ref_r),
    }
    return RunResult(steps=[step], token_ids=[])


def rows(trl, ours):
    return {
        c.name.removeprefix("own_logits ").removesuffix("@1"): c
        for c in compare_own_logits(ORACLE, trl, ours, BETA)
    }


def test_both_sides_at_the_oracle_pass():
    got = rows(side(-30.0 + 1e-6), side(-30.0 - 1e-6))
    assert set(got) == set(QUANTITIES) and all(c.passed for c in got.values())


def test_a_side_off_is_named_even_when_the_other_agrees_with_it():
    """trl off by 0.11 on the policy's chosen (ModernBERT's size): the row fails and names trl;
    ours at the oracle is not named."""
    got = rows(side(chosen=-30.0 + 0.11), side())
    assert not got["logps/chosen"].passed
    assert got["logps/chosen"].note == "trl off by 0.11"
    assert got["logps/rejected"].passed


def test_a_mistake_both_sides_share_names_both():
    """Both off by the same amount: trl against ours would pass; the oracle names both."""
    got = rows(side(ref_shift=1e-3), side(ref_shift=1e-3))
    note = got["ref_logps/chosen"].note
    assert not got["ref_logps/chosen"].passed and "trl off by" in note and "ours off by" in note
    assert got["logps/chosen"].passed  # the policy's own values are right


def test_ours_only_when_trl_did_not_run_and_skipped_oracle():
    got = rows(None, side(rejected=-50.0 + 5e-5))
    assert got["logps/rejected"].trl_value is None
    assert not got["logps/rejected"].passed and got["logps/rejected"].note.startswith("ours off")
    skipped = compare_own_logits(OwnLogits(skipped="ld_alpha"), side(), side(), BETA)
    assert len(skipped) == 1 and not skipped[0].gated and skipped[0].note == "ld_alpha"


def tiny_case(arch: str, steps: int = 2) -> ParityCase:
    return ParityCase(name=arch, arch=arch, steps=steps, batch_size=2, max_length=64)


@pytest.mark.slow
def test_llama_both_sides_agree_with_their_own_logits(tmp_path):
    from parity.sides.ours_side import run_ours
    from parity.sides.trl_side import run_trl

    case = tiny_case("llama", steps=1)
    trl, ours = run_trl(case, tmp_path), run_ours(case, tmp_path)
    oracle = own_logits.measure(case, tmp_path, trl.token_ids)
    got = compare_own_logits(oracle, trl, ours, case.loss.beta)
    assert len(got) == 4 and all(c.passed for c in got), failures_of(got)
    assert all(c.trl_value is not None and c.ours_value is not None for c in got)


def failures_of(checks) -> list[str]:
    return [
        f"{c.name}: {c.max_diff:.3g} > {c.tolerance:.3g} {c.note}" for c in checks if not c.passed
    ]


@pytest.mark.slow
def test_cohere2_passes(tmp_path):
    report = run_case(tiny_case("cohere2"), tmp_path, floor_runs=1)
    assert report.passed, failures(report) + [report.error, report.trl_failed]
    assert any(c.name.startswith("own_logits") for c in report.checks)


@pytest.mark.slow
def test_a_mixture_of_experts_runs_with_its_float64_check(tmp_path):
    """qwen2_moe: no ERROR; the padding-free row is measured (the float64 twin runs with eager
    experts) and both sides agree with the model's own logits. (Whether the whole case passes
    is dpo_core's business: trl adds the router's aux loss.)"""
    report = run_case(tiny_case("qwen2_moe"), tmp_path, floor_runs=1)
    assert not report.error and not report.trl_failed
    rows = {c.name: c for c in report.checks}
    assert rows["padding_free"].gated and rows["padding_free"].passed, rows["padding_free"].note
    assert all(c.passed for n, c in rows.items() if n.startswith("own_logits"))


@pytest.mark.slow
def test_trl_failure_is_trls(tmp_path):
    """granitemoe: trl 1.16 reads config.num_experts, which GraniteMoeConfig lacks."""
    report = run_case(tiny_case("granitemoe", steps=1), tmp_path, floor_runs=0)
    assert report.trl_failed.startswith("trl failed: AttributeError") and not report.error
    assert not report.passed
    own = [c for c in report.checks if c.name.startswith("own_logits")]
    assert len(own) == 4 and all(c.trl_value is None and c.ours_value is not None for c in own)
