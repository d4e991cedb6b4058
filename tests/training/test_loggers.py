"""``--report-to`` and ``--logging-steps``: real wandb (offline) and MLflow (file store) runs get
trl's metric names at trl's step count, averaged over each window as trl does; held-out rows of
metrics.csv are numbered as trl numbers them."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from tests.training.conftest import base_args, fit, read_metrics


def mlflow_series(out: Path, name: str) -> list[tuple[int, float]]:
    """(step, value) of one metric in the run's MLflow file store."""
    (run,) = [p for p in (out / "mlruns").glob("*/*") if (p / "metrics").is_dir()]
    lines = (run / "metrics" / name).read_text().split("\n")
    return [(int(s), float(v)) for _, v, s in (line.split() for line in lines if line)]


def test_every_logger_at_once_with_trl_names_and_windows(tiny_assets, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    argv = base_args(
        tiny_assets, tmp_path, max_steps=4, eval_fraction=0.25, eval_every_n_steps=2,
        report_to=["csv", "tensorboard", "wandb", "mlflow"], logging_steps=2,
    )  # fmt: skip
    fit(argv)
    steps = read_metrics(tmp_path)
    assert [int(r["step"]) for r in steps] == [1, 2, 3, 4]  # metrics.csv: every step, from 1
    with open(tmp_path / "metrics.csv", newline="") as f:
        held_out = [int(r["step"]) for r in csv.DictReader(f) if r.get("eval_loss")]
    assert held_out == [2, 4]  # metrics.csv: the held-out pass after the 2nd step, at its row
    # MLflow: one row per 2 steps, at trl's steps, the mean over the window (learning_rate: last)
    loss = mlflow_series(tmp_path, "loss")
    assert [s for s, _ in loss] == [2, 4]
    assert math.isclose(loss[0][1], (steps[0]["loss"] + steps[1]["loss"]) / 2, rel_tol=1e-6)
    lr = mlflow_series(tmp_path, "learning_rate")
    assert math.isclose(lr[1][1], steps[3]["learning_rate"], rel_tol=1e-6)
    assert [s for s, _ in mlflow_series(tmp_path, "eval_loss")] == held_out  # one count
    assert mlflow_series(tmp_path, "rewards/chosen")  # trl's names, slash included
    # wandb: an offline run directory whose records carry trl's names
    (run_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    records = run_file.read_bytes()
    for name in (b"rewards/chosen", b"rewards/accuracies", b"eval_loss", b"learning_rate"):
        assert name in records
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_report_to_none_writes_metrics_csv_alone(tiny_assets, tmp_path):
    fit(base_args(tiny_assets, tmp_path, max_steps=1, report_to=["none"]))
    assert len(read_metrics(tmp_path)) == 1
    assert not (tmp_path / "tensorboard").exists() and not (tmp_path / "mlruns").exists()
