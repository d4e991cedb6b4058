"""Runs that die and are resumed: metrics.csv and logs/metrics.csv never lose a trained step
(two kills in a row, a kill between a checkpoint and its row, a non-finite stop during a resume);
a non-finite stop keeps only a checkpoint from before the bad step and its advice works;
``--resume`` refuses a changed config or data unless ``--resume-allow-changes``; a metrics.csv
written in Lightning's count (from 0) is renumbered to trl's, never mixed with it.

(Bad model paths, output directories and full disks: ``test_bad_input_run.py``.)
"""

from __future__ import annotations

import json
import logging
import re
import shlex
import signal

import pytest
import torch

from tests.training.conftest import base_args, fit, fit_subprocess, preference_rows, read_metrics
from tests.training.test_faults import kill_after_checkpoint, load_checkpoint, with_fault
from training.fit import main
from training.run.metrics_csv import read_rows, write_rows
from training.run.module import DPOModule

STEPS = 12
RUN = {"max_steps": STEPS, "save_every_n_steps": 3, "learning_rate": 1e-3, "seed": 3}


def steps_in(path) -> list[int]:
    """The optimizer steps a metrics file holds a training row for, in file order."""
    return [int(float(r["step"])) for r in read_rows(path) if r.get("loss")]


@pytest.mark.slow
def test_two_kills_in_a_row_then_a_resume_lose_no_step(tiny_assets, tmp_path):
    whole = fit(base_args(tiny_assets, tmp_path / "whole", **RUN)).history
    out = tmp_path / "run"
    argv = base_args(tiny_assets, out, **RUN)
    last, logs = out / "checkpoints" / "last.ckpt", out / "logs" / "metrics.csv"

    code, _ = kill_after_checkpoint(argv, last, 4)
    assert code == -signal.SIGKILL
    first_kill = load_checkpoint(last)["global_step"]
    assert steps_in(logs)[: first_kill - 1] == list(range(1, first_kill))

    code, _ = kill_after_checkpoint([*argv, "--resume"], last, first_kill + 3)
    assert code == -signal.SIGKILL
    second_kill = load_checkpoint(last)["global_step"]
    assert second_kill > first_kill
    # the second run's file still holds the first run's steps, each once, in order
    held = steps_in(logs)
    assert held == sorted(set(held)) and held[: second_kill - 1] == list(range(1, second_kill))

    done = fit_subprocess([*argv, "--resume"])
    assert done.returncode == 0, done.stderr[-3000:]
    for path in (logs, out / "metrics.csv"):
        assert steps_in(path) == list(range(1, STEPS + 1)), path
    losses = [r["loss"] for r in read_metrics(out)]
    assert losses == pytest.approx([h["loss"] for h in whole], rel=1e-6)


class Killed(Exception):
    """Stands in for a kill at the worst moment: after Lightning saved the step's checkpoint,
    before it wrote the step's metrics row."""


def test_a_kill_between_checkpoint_and_row_loses_no_step(tiny_assets, tmp_path, monkeypatch):
    argv = base_args(tiny_assets, tmp_path, **{**RUN, "save_every_n_steps": 1})
    logs = tmp_path / "logs" / "metrics.csv"
    kill_at = 6  # the row of step 6 (trl's count); its checkpoint is already written

    def killed(self, outputs, batch, batch_idx):
        if self.global_step == kill_at:
            raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(DPOModule, "on_train_batch_end", killed, raising=False)
        with pytest.raises(Killed):
            fit(argv)
    assert load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == kill_at
    assert steps_in(logs) == list(range(1, kill_at))  # the row of step 6 never reached the file

    fit([*argv, "--resume"])
    for path in (logs, tmp_path / "metrics.csv"):
        assert steps_in(path) == list(range(1, STEPS + 1)), path


def test_a_non_finite_stop_during_a_resume_keeps_every_step(
    tiny_assets, tmp_path, monkeypatch, capsys
):
    argv = base_args(tiny_assets, tmp_path, **{**RUN, "save_every_n_steps": 1})
    logs = tmp_path / "logs" / "metrics.csv"
    with monkeypatch.context() as patch:
        with_fault(patch, "loss", 4)
        assert main(argv) == 1
    with monkeypatch.context() as patch:
        with_fault(patch, "gradient", 8)
        assert main([*argv, "--resume"]) == 1
    err = capsys.readouterr().err
    assert "non-finite gradient norm" in err and "at optimizer step 8" in err
    for path in (logs, tmp_path / "metrics.csv"):
        assert steps_in(path) == list(range(1, 9)), path  # the 9th step failed
    assert main([*argv, "--resume"]) == 0
    for path in (logs, tmp_path / "metrics.csv"):
        assert steps_in(path) == list(range(1, STEPS + 1)), path


def test_a_non_finite_stop_without_checkpoints_says_none_is_kept(
    tiny_assets, tmp_path, monkeypatch, capsys
):
    with_fault(monkeypatch, "loss", 2)
    argv = base_args(tiny_assets, tmp_path, max_steps=5, save_every_n_steps=50)
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "non-finite DPO loss" in err and "at optimizer step 2" in err
    checkpoints = tmp_path / "checkpoints"
    assert f"No checkpoint is kept in {checkpoints}: none was written before step 2" in err
    assert f"kept {checkpoints}" not in err and "--resume-allow-changes" not in err
    assert "Start again without --resume and with a lower learning rate" in err
    assert not checkpoints.exists()
    assert steps_in(tmp_path / "metrics.csv") == [1, 2]  # the 3rd step failed


# A diverging update at step 3 (``Fault("diverge")``: deterministic on every CPU, unlike a
# diverging learning rate), at a learning rate whose tenth the advice then resumes with.
LEARNING_RATE = 0.01
DIVERGE_AT = 3
MAX_STEPS = 6


def test_a_non_finite_stop_keeps_the_checkpoint_before_the_bad_step_and_its_advice_works(
    tiny_assets, tmp_path, capsys, monkeypatch
):
    argv = base_args(
        tiny_assets,
        tmp_path,
        max_steps=MAX_STEPS,
        save_every_n_steps=1,
        learning_rate=LEARNING_RATE,
    )
    with_fault(monkeypatch, "diverge", DIVERGE_AT)
    assert main(argv) == 1
    err = capsys.readouterr().err
    bad = int(re.search(r"at optimizer step (\d+)", err).group(1))
    assert bad >= 2, err  # a checkpoint from before the bad step exists
    last = tmp_path / "checkpoints" / "last.ckpt"
    # the checkpoint of the bad step holds the weights that failed: removed, with its reason
    assert f"removed {last} (from step {bad}, it holds the weights" in err
    kept = bad - 1
    assert f"kept {last}: step {kept}, weights checked finite." in err
    assert load_checkpoint(last)["global_step"] == kept

    advice = re.search(r"To continue from step \d+ with a lower learning rate: (.*?) \(", err)
    assert advice is not None, err
    flags = shlex.split(advice.group(1))
    lower = float(flags[flags.index("--learning-rate") + 1])
    assert lower == pytest.approx(LEARNING_RATE / 10)
    capsys.readouterr()
    monkeypatch.undo()  # the resumed run trains without the fault
    assert main([*argv, *flags]) == 0, capsys.readouterr().err
    steps = read_metrics(tmp_path)
    assert [int(r["step"]) for r in steps] == list(range(1, MAX_STEPS + 1))
    expected = [lower * (MAX_STEPS - s) / MAX_STEPS for s in range(kept, MAX_STEPS)]
    assert [r["learning_rate"] for r in steps[kept:]] == pytest.approx(expected, rel=1e-6)


def test_resume_refuses_a_changed_config(tiny_assets, tmp_path, capsys):
    argv = base_args(tiny_assets, tmp_path, save_every_n_steps=1)
    assert main(argv) == 0
    written = ("metrics.csv", "config.yaml", "logs/metrics.csv", "checkpoints/last.ckpt")
    before = {name: (tmp_path / name).read_bytes() for name in written}
    err_argv = [*argv, "--resume", "--learning-rate", "0.01", "--beta", "0.5"]
    capsys.readouterr()
    assert main(err_argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"--resume: {tmp_path / 'checkpoints' / 'last.ckpt'} (step 3)" in err
    assert "2 difference(s)" in err
    assert "dpo.beta: 0.1 -> 0.5" in err and "optim.learning_rate: 1e-06 -> 0.01" in err
    assert "--resume-allow-changes" in err
    assert {name: (tmp_path / name).read_bytes() for name in written} == before


def test_resume_refuses_other_data(tiny_assets, tmp_path, capsys):
    argv = base_args(tiny_assets, tmp_path, save_every_n_steps=1)
    assert main(argv) == 0
    rows = preference_rows()
    rows[0]["chosen"] = " It is bright."
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps(r) + "\n" for r in rows))
    capsys.readouterr()
    changed = base_args(tiny_assets, tmp_path, save_every_n_steps=1, dataset=other)
    assert main([*changed, "--resume"]) == 1
    err = capsys.readouterr().err
    for name in ("data.dataset:", "data.dataset_file:", "data.train_rows:"):
        assert name in err
    assert "data.heldout_rows" not in err  # no held-out rows either way: no difference


def test_resume_allow_changes_applies_and_records_them(tiny_assets, tmp_path):
    argv = base_args(tiny_assets, tmp_path, save_every_n_steps=1, max_steps=3)
    assert main(argv) == 0
    changed = base_args(tiny_assets, tmp_path, save_every_n_steps=1, max_steps=5)
    assert main([*changed, "--resume", "--resume-allow-changes", "--learning-rate", "0.01"]) == 0
    config = (tmp_path / "config.yaml").read_text()
    assert "# resumed at step 3 with --resume-allow-changes; changed:" in config
    assert "#   optim.learning_rate: 1e-06 -> 0.01" in config
    assert "#   trainer.max_steps: 3 -> 5" in config
    assert "resume_allow_changes: true" in config
    steps = read_metrics(tmp_path)
    assert [int(r["step"]) for r in steps] == list(range(1, 6))
    assert all("resume_changes" not in r for r in steps[:3])
    assert all(r["resume_changes"] == 2 for r in steps[3:])
    # the new learning rate trains: linear decay of 0.01 over 5 steps, at steps 3 and 4
    assert [r["learning_rate"] for r in steps[3:]] == pytest.approx([0.01 * 2 / 5, 0.01 * 1 / 5])


def test_a_setting_added_since_the_checkpoint_counts_as_its_default():
    """A checkpoint written before ``--num-nodes`` existed records no ``trainer.num_nodes``: it
    resumes as the default (1) without --resume-allow-changes, and refuses 2."""
    import dataclasses

    from training.base.config import FitConfig
    from training.run.resume import comparable_config, differences

    cfg = FitConfig()
    old = {"config": comparable_config(cfg), "data": {}}
    del old["config"]["trainer.num_nodes"]
    assert differences(old, {"config": comparable_config(cfg), "data": {}}) == []
    two = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, num_nodes=2))
    assert differences(old, {"config": comparable_config(two), "data": {}}) == [
        "trainer.num_nodes: 1 -> 2"
    ]


def to_lightnings_count(out) -> list[dict]:
    """Rewrite a finished 3-step run as a run from before metrics.csv took trl's count, killed
    between the last checkpoint and its row: logs/metrics.csv numbered from 0, without the 3rd
    step's row, which the checkpoint carries numbered 2. Returns the rows as they were."""
    logs = out / "logs" / "metrics.csv"
    rows = read_rows(logs)
    old = [{**r, "step": str(int(r["step"]) - 1)} for r in rows if r["step"] != "3"]
    write_rows(logs, old, list(rows[0]))
    last = out / "checkpoints" / "last.ckpt"
    checkpoint = load_checkpoint(last)
    assert checkpoint["global_step"] == 3 and checkpoint["dpo_run"]["last_row"]["step"] == 3
    checkpoint["dpo_run"]["last_row"]["step"] = 2
    torch.save(checkpoint, last)
    return rows


def test_a_resume_renumbers_metrics_written_from_zero(tiny_assets, tmp_path, caplog):
    run = {**RUN, "save_every_n_steps": 1, "eval_fraction": 0.25, "eval_every_n_steps": 2}
    assert main(base_args(tiny_assets, tmp_path, **{**run, "max_steps": 3})) == 0
    before = to_lightnings_count(tmp_path)
    longer = base_args(tiny_assets, tmp_path, **{**run, "max_steps": 5})
    logs = tmp_path / "logs" / "metrics.csv"
    old = logs.read_bytes()
    assert main([*longer, "--resume"]) == 1  # refused (max_steps changed): the file as it was
    assert logs.read_bytes() == old
    with caplog.at_level(logging.WARNING):
        assert main([*longer, "--resume", "--resume-allow-changes"]) == 0
    assert f"--resume: {logs} counted steps from 0" in caplog.text
    for path in (logs, tmp_path / "metrics.csv"):
        rows = read_rows(path)
        assert steps_in(path) == [1, 2, 3, 4, 5], path  # one count, each step once
        assert [int(r["step"]) for r in rows if r.get("eval_loss")] == [2, 4], path
    # the first run's rows come back at trl's count, the carried 3rd step's included
    again = {(r["step"], r["loss"], r["eval_loss"]) for r in read_rows(logs)}
    assert {(r["step"], r["loss"], r["eval_loss"]) for r in before} <= again
