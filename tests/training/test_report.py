"""report.md and the printed table, from an evaluation built by hand."""

from __future__ import annotations

import json

from dpo_core.evaluation import PreferenceSummary
from training.eval.before_after import Evaluation, PolicyResult
from training.eval.report import (
    DISPLACEMENT_WARNING,
    evaluation_table,
    render_markdown,
    write_report,
)
from training.eval.sampling import SamplingSettings


def summary(accuracy: float, logps_chosen: float, logps_rejected: float) -> PreferenceSummary:
    return PreferenceSummary(accuracy, 0.1, 0.05, -0.05, 0.5, logps_chosen, logps_rejected)


def evaluation(after_chosen: float, after_rejected: float, judged: bool = True) -> Evaluation:
    before = PolicyResult(summary(0.5, -20.0, -22.0), kl=0.0, completions=["a | b", "c"])
    after = PolicyResult(
        summary(0.9, after_chosen, after_rejected), kl=2.5, completions=["good", "fine"]
    )
    if judged:
        before.verdicts, before.win_rate = [0.0, 1.0], 0.5
        after.verdicts, after.win_rate = [1.0, 1.0], 1.0
    return Evaluation(
        before, after, 7, ["p1", "p2"], "rule" if judged else None, SamplingSettings(), 0.1
    )


def test_likelihood_displacement_warning_only_when_both_log_probs_fell():
    assert DISPLACEMENT_WARNING in render_markdown(evaluation(-25.0, -40.0), [], {})
    assert DISPLACEMENT_WARNING not in render_markdown(evaluation(-15.0, -40.0), [], {})


def test_examples_show_both_completions_and_verdicts():
    text = render_markdown(evaluation(-15.0, -40.0), [], {"num_examples": 1})
    assert "prompt: p1\nbefore [judge 0.00]: a | b\nafter [judge 1.00]: good" in text
    assert "p2" not in text


def test_table_says_na_for_what_was_not_measured():
    table = evaluation_table(evaluation(-15.0, -40.0, judged=False).to_json())
    lines = {line.split("  ")[0]: line.split() for line in table.splitlines()[2:]}
    assert lines["win rate"][-3:] == ["n/a", "n/a", "n/a"]
    assert lines["preference accuracy"][-3:] == ["0.5000", "0.9000", "0.4000"]


def test_write_report_without_judge_writes_null_win_rate_and_no_frontier(tmp_path):
    paths = write_report(tmp_path, evaluation(-15.0, -40.0, judged=False))
    report = json.loads(paths.eval_json.read_text())
    assert report["after"]["win_rate"] is None and report["after"]["kl"] == 2.5
    assert [p.name for p in paths.plots] == ["before_after.png"]
    assert "judge: none" in paths.report_md.read_text()
