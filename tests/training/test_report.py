"""report.md and the printed table, from an evaluation built by hand."""

from __future__ import annotations

import json

from dpo_core.evaluation import PreferenceSummary
from training.eval.before_after import Evaluation, PolicyResult
from training.eval.report import (
    DISPLACEMENT_WARNING,
    evaluation_table,
    kl_note,
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


def test_a_negative_kl_within_two_standard_errors_is_noise_and_beyond_is_flagged():
    noise = kl_note("after", -0.3, 0.2, 10)  # 1.5 standard errors below 0
    assert "within 1.5 standard errors of 0, sampling noise" in noise
    assert "Warning" not in noise
    flagged = kl_note("after", -0.5, 0.2, 10)  # 2.5 standard errors below 0
    assert flagged.startswith("- **Warning: negative KL beyond sampling noise.**")
    assert "is 2.5 standard errors below 0" in flagged
    assert "Warning" in kl_note("after", -0.5, 0.0, 10)  # no spread at all: never noise
    assert "no standard error" in kl_note("after", -0.5, None, 1)
    assert kl_note("after", 0.0, 0.0, 10) is None and kl_note("after", 0.4, 0.1, 10) is None
    assert kl_note("after", None, None, 0) is None


def test_report_md_explains_a_negative_kl_and_shows_its_standard_error():
    result = evaluation(-15.0, -40.0)
    result.after.kl, result.after.kl_stderr = -0.0005, 0.0004
    text = render_markdown(result, [], {})
    assert "| standard error of the KL estimate | n/a | 0.0004 | n/a |" in text
    assert "The after policy's KL estimate is negative (-0.0005 nats" in text
    assert "within 1.2 standard errors of 0, sampling noise" in text
    assert "The before policy" not in text  # its KL is 0, not negative


def test_write_report_draws_the_curves_over_steps_and_links_them(tmp_path):
    csv = tmp_path / "metrics.csv"
    csv.write_text(
        "step,loss,learning_rate,grad_norm,logps/chosen,logps/rejected\n"
        "1,0.69,1e-3,2.5,-20.0,-22.0\n2,0.6,5e-4,1.5,-19.0,-23.0\n"
    )
    validation = {"before": {"eval_loss": 0.69}, "after": {"eval_loss": 0.6}}
    paths = write_report(tmp_path, evaluation(-15.0, -40.0), metrics_csv=csv, validation=validation)
    names = [p.name for p in paths.plots]
    assert names[:3] == ["training_curves.png", "optimization.png", "heldout_curves.png"]
    text = paths.report_md.read_text()
    for name in names:
        assert (tmp_path / name).is_file() and f"]({name})" in text
