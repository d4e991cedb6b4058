"""The PNG plots: written, valid PNG files that matplotlib reads back at the expected size."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image

from training.eval import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path) -> None:
    """A PNG file (its 8-byte signature) that decodes to a non-empty RGB(A) image."""
    assert Path(path).read_bytes()[:8] == PNG_SIGNATURE, path
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4) and min(image.shape[:2]) > 100


METRICS_CSV = (
    "epoch,loss,rewards/chosen,rewards/rejected,rewards/margins,rewards/accuracies,step,"
    "eval_loss\n"
    "0,0.6931,0.0,0.0,0.0,0.0,0,\n"
    "0,0.61,0.05,-0.05,0.1,1.0,1,\n"
    "0,,,,,,1,0.6\n"  # a validation row: no training loss, left out of the curves
    "0,0.52,0.1,-0.12,0.22,1.0,2,\n"
)
REPORT = {
    "before": {"preference_accuracy": 0.5, "reward_margin": 0.0, "win_rate": 0.4, "kl": 0.0},
    "after": {"preference_accuracy": 0.9, "reward_margin": 1.2, "win_rate": None, "kl": 3.5},
    "n_pairs": 10,
    "n_prompts": 4,
}


def test_training_curves_from_metrics_csv(tmp_path):
    csv = tmp_path / "metrics.csv"
    csv.write_text(METRICS_CSV)
    assert [r["step"] for r in plots.read_steps(csv)] == [0, 1, 2]
    path = plots.training_curves(csv, tmp_path / "curves.png")
    assert path == tmp_path / "curves.png"
    assert_png(path)
    assert matplotlib.image.imread(path).shape[1] == 2000  # five 4-inch panels at 100 dpi


def test_before_after_bars_take_unmeasured_values(tmp_path):
    assert_png(plots.before_after_bars(REPORT, tmp_path / "bars.png"))


def test_frontier_skips_points_that_were_not_measured(tmp_path):
    points = [
        plots.FrontierPoint("start", 0.0, 0.5),
        plots.FrontierPoint("β=0.1", 4.0, 0.9),
        plots.FrontierPoint("no judge", 1.0, float("nan")),
    ]
    assert_png(plots.frontier(points, tmp_path / "sub" / "frontier.png"))
