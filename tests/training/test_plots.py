"""The PNG plots: what each one draws (the pure series functions, and the drawn figure read back
before it is saved), that unmeasured values are left out or shown as n/a, and that the file is a
valid PNG that matplotlib reads back at the expected size."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import matplotlib.image
import pytest

from training.eval import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path) -> None:
    """A PNG file (its 8-byte signature) that decodes to a non-empty RGB(A) image."""
    assert Path(path).read_bytes()[:8] == PNG_SIGNATURE, path
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4) and min(image.shape[:2]) > 100


@pytest.fixture
def drawn(monkeypatch):
    """The figures the plot functions save, in order (inspectable after ``plt.close``)."""
    figures = []
    save = plots._save

    def keep(fig, path):
        figures.append(fig)
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", keep)
    return figures


METRICS_CSV = (
    "epoch,loss,rewards/chosen,rewards/rejected,rewards/margins,rewards/accuracies,step,"
    "eval_loss\n"
    "0,0.6931,0.0,0.0,0.0,0.0,1,\n"
    "0,0.61,0.05,-0.05,0.1,1.0,2,\n"
    "0,,,,,,2,0.6\n"  # a validation row: no training loss, left out of the curves
    "0,0.52,0.1,-0.12,0.22,,3,\n"  # rewards/accuracies not logged at step 3: no point there
    "0,0.47,0.12,-0.2,0.32,1.0,4,\n"
)
CURVE_SERIES = {
    "loss": ([1, 2, 3, 4], [0.6931, 0.61, 0.52, 0.47]),
    "rewards/chosen": ([1, 2, 3, 4], [0.0, 0.05, 0.1, 0.12]),
    "rewards/rejected": ([1, 2, 3, 4], [0.0, -0.05, -0.12, -0.2]),
    "rewards/margins": ([1, 2, 3, 4], [0.0, 0.1, 0.22, 0.32]),
    "rewards/accuracies": ([1, 2, 4], [0.0, 1.0, 1.0]),
}


def test_training_curves_from_metrics_csv(tmp_path, drawn):
    csv = tmp_path / "metrics.csv"
    csv.write_text(METRICS_CSV)
    steps = plots.read_steps(csv)
    assert [r["step"] for r in steps] == [1, 2, 3, 4]  # the validation row is not a step
    assert all("eval_loss" not in r for r in steps)
    assert plots.curve_series(steps) == CURVE_SERIES
    path = plots.training_curves(csv, tmp_path / "curves.png")
    assert path == tmp_path / "curves.png"
    # What is drawn: one line per panel, exactly the series, panels in CURVES order.
    (fig,) = drawn
    assert len(fig.axes) == len(plots.CURVES)
    for ax, (key, label) in zip(fig.axes, plots.CURVES, strict=True):
        assert ax.get_title() == label
        (line,) = ax.get_lines()
        assert (list(line.get_xdata()), list(line.get_ydata())) == CURVE_SERIES[key]
    assert_png(path)
    assert matplotlib.image.imread(path).shape[1] == 2000  # five 4-inch panels at 100 dpi


def test_curve_series_x_falls_back_to_the_row_place_and_empty_metrics_draw_nothing(tmp_path, drawn):
    steps = [{"loss": 0.7}, {"loss": 0.6, "rewards/margins": 0.1}]
    series = plots.curve_series(steps)
    assert series["loss"] == ([1, 2], [0.7, 0.6])  # counted from 1, as the step column
    assert series["rewards/margins"] == ([2], [0.1])
    assert series["rewards/chosen"] == ([], [])
    csv = tmp_path / "metrics.csv"
    csv.write_text("loss,rewards/margins\n0.7,\n0.6,0.1\n")
    plots.training_curves(csv, tmp_path / "curves.png")
    lines = {ax.get_title(): ax.get_lines() for ax in drawn[0].axes}
    assert len(lines["loss"]) == len(lines["reward margin"]) == 1
    assert lines["reward, chosen"] == []  # never logged: an empty panel, not a line of nothing


OPTIMIZATION_CSV = (
    "step,loss,learning_rate,grad_norm,logps/chosen,logps/rejected,eval_loss,eval_logps/chosen\n"
    "1,0.69,1e-3,2.5,-20.0,-22.0,,\n"
    "2,0.6,5e-4,1.5,-19.0,-23.0,,\n"
    "2,,,,,,0.65,-19.5\n"  # the held-out pass after the 2nd step (numbered as that step's row)
)


def test_optimization_curves_draw_lr_grad_norm_and_both_log_probs(tmp_path, drawn):
    csv = tmp_path / "metrics.csv"
    csv.write_text(OPTIMIZATION_CSV)
    path = plots.optimization_curves(csv, tmp_path / "optimization.png")
    (fig,) = drawn
    panels = {ax.get_title(): ax for ax in fig.axes}
    assert list(panels) == [title for title, _ in plots.OPTIMIZATION_PANELS]
    drawn_lines = {
        title: [
            (line.get_label(), list(line.get_xdata()), list(line.get_ydata()))
            for line in ax.get_lines()
        ]
        for title, ax in panels.items()
    }
    assert drawn_lines["learning rate"] == [("learning_rate", [1, 2], [1e-3, 5e-4])]
    assert drawn_lines["grad norm (before clipping)"] == [("grad_norm", [1, 2], [2.5, 1.5])]
    assert drawn_lines["mean log π(y | x)"] == [  # the held-out row is not a training step
        ("chosen", [1, 2], [-20.0, -19.0]),
        ("rejected", [1, 2], [-22.0, -23.0]),
    ]
    assert panels["mean log π(y | x)"].get_legend() is not None
    assert_png(path)


def test_heldout_series_puts_before_at_zero_and_after_at_the_steps_done(tmp_path):
    csv = tmp_path / "metrics.csv"
    csv.write_text(OPTIMIZATION_CSV)
    heldout = plots.read_heldout(csv)
    assert [r["step"] for r in heldout] == [2]
    before = {"eval_loss": 0.69, "eval_logps/chosen": -20.0, "eval_rewards/margins": 0.0}
    after = {"eval_loss": 0.6, "eval_logps/chosen": -19.0}
    series = plots.heldout_series(heldout, before, after, steps_done=4)
    assert series["eval_loss"] == ([0, 2, 4], [0.69, 0.65, 0.6])  # the csv row: after 2 steps
    assert series["eval_logps/chosen"] == ([0, 2, 4], [-20.0, -19.5, -19.0])
    assert series["eval_rewards/margins"] == ([0], [0.0])  # after did not measure it
    assert series["eval_logps/rejected"] == ([], [])
    # A held-out pass after the last step is the after point already: drawn once.
    assert plots.heldout_series(heldout, before, after, steps_done=2)["eval_loss"] == (
        [0, 2],
        [0.69, 0.65],
    )


def test_heldout_curves_draw_each_series(tmp_path, drawn):
    series = plots.heldout_series([], {"eval_loss": 0.69}, {"eval_loss": 0.5}, steps_done=3)
    path = plots.heldout_curves(series, tmp_path / "heldout_curves.png")
    (fig,) = drawn
    panels = {ax.get_title(): ax.get_lines() for ax in fig.axes}
    (line,) = panels["held-out loss"]
    assert (list(line.get_xdata()), list(line.get_ydata())) == ([0, 3], [0.69, 0.5])
    assert panels["held-out reward accuracy"] == []
    assert_png(path)


REPORT = {
    "before": {"preference_accuracy": 0.5, "reward_margin": 0.0, "win_rate": 0.4, "kl": 0.0},
    "after": {"preference_accuracy": 0.9, "reward_margin": 1.2, "win_rate": None},  # no kl
    "n_pairs": 10,
    "n_prompts": 4,
}


def test_bar_values_mark_unmeasured_values_nan():
    values = plots.bar_values(REPORT)
    assert list(values) == [key for key, _ in plots.BARS]
    assert values["preference_accuracy"] == (0.5, 0.9)
    assert values["reward_margin"] == (0.0, 1.2)
    assert values["win_rate"][0] == 0.4 and math.isnan(values["win_rate"][1])  # None
    assert values["kl"][0] == 0.0 and math.isnan(values["kl"][1])  # missing
    infinite = {**REPORT, "before": {**REPORT["before"], "reward_margin": math.inf}}
    assert math.isnan(plots.bar_values(infinite)["reward_margin"][0])


def test_before_after_bars_show_unmeasured_values_as_empty_na_bars(tmp_path, drawn):
    path = plots.before_after_bars(REPORT, tmp_path / "bars.png")
    (fig,) = drawn
    panels = {ax.get_title(): ax for ax in fig.axes}
    expected = {  # title: (bar heights, labels above them)
        "preference accuracy": ([0.5, 0.9], ["0.5", "0.9"]),
        "win rate": ([0.4, 0.0], ["0.4", "n/a"]),
        "reward margin": ([0.0, 1.2], ["0", "1.2"]),
        "KL(π ‖ π_ref)": ([0.0, 0.0], ["0", "n/a"]),
    }
    assert set(panels) == set(expected)
    for title, (heights, labels) in expected.items():
        ax = panels[title]
        assert [bar.get_height() for bar in ax.patches] == pytest.approx(heights)
        assert [t.get_text() for t in ax.texts] == labels
    assert fig.texts[0].get_text() == "Before vs after training (10 pairs, 4 prompts)"
    assert_png(path)


def test_frontier_skips_points_that_were_not_measured(tmp_path, drawn):
    points = [
        plots.FrontierPoint("start", 0.0, 0.5),
        plots.FrontierPoint("β=0.1", 4.0, 0.9),
        plots.FrontierPoint("no judge", 1.0, float("nan")),
        plots.FrontierPoint("no win rate", 2.0, None),
        plots.FrontierPoint("no kl", float("nan"), 0.7),
        plots.FrontierPoint("diverged", math.inf, 0.6),
    ]
    assert plots.frontier_series(points) == points[:2]
    path = plots.frontier(points, tmp_path / "sub" / "frontier.png", "by β")
    (fig,) = drawn
    (ax,) = fig.axes
    (scatter,) = ax.collections
    assert scatter.get_offsets().tolist() == [[0.0, 0.5], [4.0, 0.9]]
    assert [t.get_text() for t in ax.texts] == ["start", "β=0.1"]
    assert ax.get_title() == "by β"
    assert_png(path)


def test_frontier_with_no_measured_point_draws_an_empty_axis(tmp_path, drawn):
    points = [plots.FrontierPoint("no judge", 0.0, math.nan)]
    assert plots.frontier_series(points) == []
    assert_png(plots.frontier(points, tmp_path / "frontier.png"))
    assert len(drawn[0].axes[0].collections[0].get_offsets()) == 0
    assert len(drawn[0].axes[0].texts) == 0


def test_a_file_counted_from_zero_is_drawn_from_one(tmp_path, caplog):
    """A metrics.csv from before trl's count (Lightning's, from 0) reads as the same file in
    trl's count, train and held-out rows alike, with one note however many plots read it."""
    old = tmp_path / "old.csv"
    header, *rows = OPTIMIZATION_CSV.splitlines()
    old.write_text("\n".join([header, *(f"{int(r[0]) - 1}{r[1:]}" for r in rows)]) + "\n")
    new = tmp_path / "metrics.csv"
    new.write_text(OPTIMIZATION_CSV)
    with caplog.at_level(logging.WARNING):
        assert plots.read_steps(old) == plots.read_steps(new)
        assert plots.read_heldout(old) == plots.read_heldout(new)
    assert caplog.text.count(f"{old} counts steps from 0") == 1
    assert str(new) not in caplog.text
