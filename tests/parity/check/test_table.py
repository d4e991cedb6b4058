"""parity.check.table: the JSON shape and the printed table of compared runs."""

from __future__ import annotations

import json

import pytest

from parity.check.compare import compare_runs
from parity.check.table import format_table, report_json, write_json
from parity.check.tolerances import CaseReport
from tests.parity.check.test_compare import (
    DOCUMENTED,
    OTHER_CHECKS,
    as_trl_side_builds_it,
    make_run,
)


def test_json_has_exactly_the_documented_shape(tmp_path):
    failing_run = make_run()
    failing_run.steps[0]["loss"] += 1e-3
    del failing_run.steps[0]["entropy"]
    reports = [
        compare_runs("good", as_trl_side_builds_it(make_run()), make_run()),
        compare_runs("bad", make_run(), failing_run),
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
        assert set(case) == {"name", "passed", "error", "max_abs_diff", "tolerance", "floor"}
        assert set(case["max_abs_diff"]) == set(case["tolerance"])
        assert (
            case["floor"] == {}
        )  # no noise floor measured (tests/parity/check/test_noise_floor.py)
    good, bad, cdpo, boom = doc["cases"]
    assert [good["passed"], bad["passed"], cdpo["passed"], boom["passed"]] == [
        True,
        False,
        True,
        False,
    ]
    assert list(good["max_abs_diff"]) == [*DOCUMENTED, *OTHER_CHECKS]
    assert good["tolerance"] == {n: b for n, (b, _, _) in DOCUMENTED.items()} | {
        "token_ids": 0.0,
        "dropped_rows": 0.0,
        "final_weights": 1e-4,
        "packed_4bit": 0.0,
    }
    assert set(good["max_abs_diff"].values()) == {0.0}
    assert bad["max_abs_diff"]["loss@1"] == pytest.approx(1e-3)
    assert bad["tolerance"]["loss@1"] == 1e-6
    assert bad["max_abs_diff"]["entropy"] is None  # missing: infinite, written as null
    assert cdpo["max_abs_diff"] == {} and boom["tolerance"] == {}


def test_table_shows_values_results_and_reasons():
    failing_run = make_run()
    failing_run.steps[0]["loss"] += 1e-3
    reports = [
        compare_runs("bad", make_run(), failing_run),
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


def test_a_case_failed_by_trls_own_logits_alone_is_named_trls_error():
    """trl off its model's own logits, ours within bound: the case does not pass, and the table
    says it is trl's error; ours off too, or ours failing, is not trl's."""
    from parity.check.table import format_table
    from parity.check.tolerances import CaseReport, MetricCheck

    def own(note: str, diff: float) -> MetricCheck:
        return MetricCheck("own_logits logps/chosen@1", 0.1, 1e-7, diff, 1e-5, note=note)

    loss = MetricCheck("loss@1", 0.69, 0.70, 1e-2, 1e-6)
    trl_off = CaseReport("rg", [loss, own("trl off by 0.1", 0.1)])
    assert not trl_off.passed and "trl off by 0.1" in trl_off.trls_error
    assert "rg: trl's error, not ours" in format_table([trl_off])
    both_off = CaseReport("x", [loss, own("trl off by 0.1; ours off by 0.1", 0.1)])
    assert both_off.trls_error == ""
    ours_failed = CaseReport("y", [own("trl off by 0.1", 0.1)], error="ours failed: boom")
    assert ours_failed.trls_error == ""
    trl_raised = CaseReport("g", [own("oracle -50", 1e-7)], trl_failed="trl failed: num_experts")
    assert trl_raised.trls_error == "trl failed: num_experts"
    assert CaseReport("ok", [own("oracle -50", 1e-7)]).trls_error == ""
