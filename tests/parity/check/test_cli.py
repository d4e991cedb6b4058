"""``python -m parity``: exit status and JSON, end to end (trl compared with itself)."""

from __future__ import annotations

import json

from parity.check import cli
from parity.check.tolerances import CaseReport, MetricCheck


def test_trl_against_itself_passes_and_writes_json(tmp_path, capsys):
    out = tmp_path / "parity.json"
    argv = ["--against", "trl", "--steps", "1", "--batch-size", "2", "--json", str(out)]
    argv += ["--workdir", str(tmp_path / "work"), "--label-smoothing", "0"]
    assert cli.main(argv + ["--loss-type", "sigmoid", "ipo"]) == 0
    doc = json.loads(out.read_text())
    assert doc["passed"] is True and doc["trl_version"] == "1.16.0"
    (case,) = doc["cases"]
    # trl is deterministic with these settings: bitwise-identical reruns.
    assert case["max_abs_diff"]["loss@1"] == 0.0 and case["max_abs_diff"]["final_weights q90"] == 0
    # The noise floor (2 perturbed trl runs, the default) bounds the weights: one ulp moved them.
    assert case["floor"]["final_weights q90"] > 0 and "loss@1" not in case["floor"]
    assert "1/1 cases passed" in capsys.readouterr().out


def test_skipped_cases_are_reported_not_run(tmp_path, capsys):
    out = tmp_path / "parity.json"
    assert cli.main(["--reference-free", "--json", str(out)]) == 0
    assert "SKIP: trl 1.16 has no reference-free mode" in capsys.readouterr().out
    assert json.loads(out.read_text())["cases"][0]["max_abs_diff"] == {}


def test_any_failing_case_fails_the_run(monkeypatch, capsys):
    def fake_run_case(case, workdir, against, floor_runs):
        bad = MetricCheck("loss@1", 0.69, 0.70, 0.01, 1e-6)
        return CaseReport(name=case.name, checks=[bad] if "ipo" in case.name else [])

    monkeypatch.setattr(cli, "run_case", fake_run_case)
    assert cli.main(["--loss-type", "all"]) == 1
    assert "14/15 cases passed" in capsys.readouterr().out
    assert cli.main(["--loss-type", "sigmoid"]) == 0


def test_floor_runs_0_keeps_the_fixed_bounds(tmp_path):
    out = tmp_path / "parity.json"
    argv = ["--against", "trl", "--steps", "1", "--batch-size", "2", "--json", str(out)]
    assert cli.main(argv + ["--workdir", str(tmp_path / "work"), "--floor-runs", "0"]) == 0
    (case,) = json.loads(out.read_text())["cases"]
    assert case["floor"] == {} and case["max_abs_diff"]["final_weights"] == 0.0


def test_bad_options_exit_2(capsys):
    assert cli.main(["--loss-type", "sigmoid", "sft", "--loss-weights", "1"]) == 2
    assert "loss_weights" in capsys.readouterr().err
