"""training.run.metrics_csv: a resumed run's metrics.csv keeps the interrupted run's earlier steps;
steps are trl's count."""

from __future__ import annotations

import csv

from training.run.metrics_csv import StepCSVLogger, read_rows, restore_earlier_rows


def write(path, rows):
    fields = sorted({k for r in rows for k in r})
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def test_earlier_steps_go_back_in_front_and_redone_steps_come_from_the_resumed_run(tmp_path):
    path = tmp_path / "metrics.csv"
    earlier = [{"step": str(s), "loss": f"old{s}"} for s in range(5)]  # killed after step 4
    write(path, [{"step": str(s), "loss": f"new{s}", "eval_loss": "0.5"} for s in (3, 4, 5)])
    assert restore_earlier_rows(path, earlier) == 3
    rows = read_rows(path)
    assert [r["step"] for r in rows] == ["0", "1", "2", "3", "4", "5"]
    assert [r["loss"] for r in rows] == ["old0", "old1", "old2", "new3", "new4", "new5"]
    assert rows[0]["eval_loss"] == "" and rows[3]["eval_loss"] == "0.5"  # union of the headers
    assert not list(tmp_path.glob("*.tmp"))


def test_nothing_earlier_leaves_the_file_alone(tmp_path):
    path = tmp_path / "metrics.csv"
    write(path, [{"step": "0", "loss": "1"}])
    before = path.read_text()
    assert restore_earlier_rows(path, []) == 0
    assert restore_earlier_rows(path, [{"step": "0", "loss": "9"}]) == 0  # redone: new wins
    assert path.read_text() == before
    assert read_rows(tmp_path / "absent.csv") == []


def test_the_csv_logger_writes_trls_step(tmp_path):
    logger = StepCSVLogger(str(tmp_path), "logs")
    logger.log_metrics({"loss": 0.7}, step=0)  # Lightning's index of the first step
    logger.log_metrics({"eval_loss": 0.6}, step=0)  # the held-out pass after it
    logger.save()
    rows = read_rows(tmp_path / "logs" / "metrics.csv")
    assert [(r["step"], r["loss"], r["eval_loss"]) for r in rows] == [
        ("1", "0.7", ""),
        ("1", "", "0.6"),
    ]
