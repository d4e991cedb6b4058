"""A run's life: signals, its output directory, and runs that train nothing.

- SIGTERM (a cluster scheduler) and SIGINT (Ctrl-C), sent for real to ``python -m training.fit``:
  the run stops at an optimizer-step boundary, keeps ``checkpoints/last.ckpt``, config.yaml and
  metrics.csv (no model/), prints one line with the ``--resume`` command and exits 143 / 130; the
  command then finishes the run bit for bit as an uninterrupted one, LoRA dropout included.
- An output directory belongs to one run: a live run's lock refuses a second one, a dead run's
  lock is taken over; a fresh run into another run's directory is refused unless
  ``--overwrite-output-dir``.
- A finished run extended with a larger ``--max-steps`` trains the new steps; a resume with
  nothing left to train says so and exits 0; one past the steps asked exits 1.

(Kills, non-finite stops and changed settings on resume: ``test_bad_input_run_resume.py``.)
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import training.fit
from tests.conftest import REPO_ROOT
from tests.training.conftest import base_args, child_env, fit, load_weights, read_metrics
from tests.training.test_faults import load_checkpoint
from training.fit import main
from training.run.metrics_csv import read_rows

# LoRA with dropout: the resumed run must draw the same dropout masks as an uninterrupted one.
# 32 rows / 4 a batch = 8 steps an epoch; shuffled, the run crosses into the second epoch.
DROPOUT_RUN = {
    "lora": True,
    "lora_dropout": 0.3,
    "max_steps": 12,
    "shuffle": True,
    "save_every_n_steps": 50,  # no periodic checkpoint: the one kept is the stop's own
    "learning_rate": 1e-3,
    "seed": 3,
}


def signal_after_steps(argv: list[str], out, signum: int, steps: int, timeout: float = 180):
    """Start ``python -m training.fit argv``; send ``signum`` once logs/metrics.csv holds
    ``steps`` trained steps. Returns (exit code, stderr, steps on disk when signalled)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "training.fit", *argv],
        cwd=REPO_ROOT,
        env={**child_env(), "TQDM_DISABLE": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    logs, seen, deadline = out / "logs" / "metrics.csv", 0, time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            seen = len([r for r in read_rows(logs) if r.get("loss")])
            if seen >= steps:
                proc.send_signal(signum)
                break
            time.sleep(0.02)
        _, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:  # not stopped in time: do not leak it
            proc.kill()
            proc.wait()
    return proc.returncode, err, seen


def the_stop_line(err: str, name: str) -> str:
    """The one line a stopped run prints; there is exactly one, and no traceback."""
    lines = [line for line in err.splitlines() if line.startswith("stopped by")]
    assert len(lines) == 1, err[-3000:]
    assert lines[0].startswith(f"stopped by {name}"), lines[0]
    assert "Traceback" not in err, err[-3000:]
    return lines[0]


def resume_argv(line: str) -> list[str]:
    """The arguments of the ``python -m training.fit ...`` command at the end of ``line``."""
    command = shlex.split(line.split("resume with: ", 1)[1])
    assert command[:3] == ["python", "-m", "training.fit"] and "--resume" in command
    return command[3:]


@pytest.mark.slow
def test_sigterm_stops_at_a_step_and_the_resume_is_bit_for_bit_with_dropout(tiny_assets, tmp_path):
    whole = fit(base_args(tiny_assets, tmp_path / "whole", **DROPOUT_RUN))
    out = tmp_path / "run"
    argv = base_args(tiny_assets, out, **DROPOUT_RUN)

    code, err, seen = signal_after_steps(argv, out, signal.SIGTERM, steps=5)
    assert code == 143, err[-3000:]
    line = the_stop_line(err, "SIGTERM")
    last = out / "checkpoints" / "last.ckpt"
    step = load_checkpoint(last)["global_step"]
    assert seen <= step < DROPOUT_RUN["max_steps"]
    assert f"at optimizer step {step}: {last} (step {step})" in line
    assert (out / "config.yaml").is_file() and not (out / "model").exists()
    assert [int(r["step"]) for r in read_metrics(out)] == list(range(1, step + 1))
    assert not (out / "run.lock").exists()

    resumed = subprocess.run(
        [sys.executable, "-m", "training.fit", *resume_argv(line)],
        cwd=REPO_ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    theirs = load_weights(tmp_path / "whole" / "model")
    ours = load_weights(out / "model")
    assert ours.keys() == theirs.keys()
    for name, tensor in ours.items():
        assert torch.equal(tensor, theirs[name]), name
    assert read_metrics(out) == read_metrics(tmp_path / "whole")
    assert len(whole.history) == DROPOUT_RUN["max_steps"]


@pytest.mark.slow
def test_ctrl_c_stops_and_keeps_a_checkpoint_even_with_checkpoints_off(tiny_assets, tmp_path):
    argv = base_args(tiny_assets, tmp_path, max_steps=200, save_every_n_steps=0)
    code, err, _ = signal_after_steps(argv, tmp_path, signal.SIGINT, steps=2)
    assert code == 130, err[-3000:]
    line = the_stop_line(err, "SIGINT")
    step = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["global_step"]
    assert 2 <= step < 200 and f"(step {step})" in line
    assert resume_argv(line) == [*argv, "--resume"]
    assert (tmp_path / "config.yaml").is_file() and not (tmp_path / "model").exists()
    assert [int(r["step"]) for r in read_metrics(tmp_path)] == list(range(1, step + 1))


def test_a_signal_while_loading_stops_with_nothing_to_resume(
    tiny_assets, tmp_path, monkeypatch, capsys
):
    def interrupted_load(cfg):
        os.kill(os.getpid(), signal.SIGTERM)  # the handler raises here, as Ctrl-C would
        raise AssertionError("not stopped")

    monkeypatch.setattr(training.fit, "prepare_inputs", interrupted_load)
    assert main(base_args(tiny_assets, tmp_path)) == 143
    err = capsys.readouterr().err
    assert "stopped by SIGTERM before training: nothing to resume; start again with:" in err
    assert not (tmp_path / "run.lock").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers put back


def test_a_second_run_into_a_locked_directory_is_refused(tiny_assets, tmp_path, capsys):
    lock = tmp_path / "run.lock"
    lock.write_text(f"pid={os.getpid()} host={socket.gethostname()}\n")
    assert main(base_args(tiny_assets, tmp_path)) == 1
    err = capsys.readouterr().err
    assert (
        f"error: --output-dir {tmp_path}: in use by process {os.getpid()} on "
        f"{socket.gethostname()} (lock {lock})" in err
    )
    assert lock.is_file() and not (tmp_path / "checkpoints").exists()


def test_a_dead_runs_lock_is_taken_over(tiny_assets, tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "run.lock").write_text(f"pid={dead.pid} host={socket.gethostname()}\n")
    assert main(base_args(tiny_assets, tmp_path)) == 0
    assert f"left by process {dead.pid}" in caplog.text and "taken over" in caplog.text
    assert not (tmp_path / "run.lock").exists()


def test_a_fresh_run_into_another_runs_directory_needs_overwrite(tiny_assets, tmp_path, capsys):
    argv = base_args(tiny_assets, tmp_path, save_every_n_steps=1)
    assert main(argv) == 0
    first = (tmp_path / "checkpoints" / "last.ckpt").read_bytes()
    capsys.readouterr()
    assert main([*argv, "--learning-rate", "1e-3"]) == 1
    err = capsys.readouterr().err
    assert f"--output-dir {tmp_path} holds another run (checkpoints/, model/)" in err
    assert "--resume" in err and "--overwrite-output-dir" in err
    assert (tmp_path / "checkpoints" / "last.ckpt").read_bytes() == first

    assert main([*argv, "--learning-rate", "1e-3", "--overwrite-output-dir"]) == 0
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.ckpt"]
    assert [r["learning_rate"] for r in read_metrics(tmp_path)][0] == pytest.approx(1e-3)

    # --resume reads the run's own last.ckpt only: a stray last-v1.ckpt (the old run's, with
    # other settings, which a resume from it would refuse) is not looked at.
    (tmp_path / "checkpoints" / "last-v1.ckpt").write_bytes(first)
    assert main([*argv, "--learning-rate", "1e-3", "--resume"]) == 0


def test_extending_a_finished_run_trains_the_new_steps(tiny_assets, tmp_path, capsys):
    # No periodic checkpoint before the end (as on the embedded default): the last step's own.
    argv = base_args(tiny_assets, tmp_path, max_steps=4, save_every_n_steps=50)
    assert main(argv) == 0
    longer = base_args(tiny_assets, tmp_path, max_steps=6, save_every_n_steps=50)
    assert main([*longer, "--resume", "--resume-allow-changes"]) == 0
    assert [int(r["step"]) for r in read_metrics(tmp_path)] == list(range(1, 7))
    assert load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 6
    capsys.readouterr()

    # Nothing left to train: said, the outputs written again, exit 0, no nan.
    assert main([*longer, "--resume"]) == 0
    out = capsys.readouterr().out
    done = re.search(r"done: loss (\S+),", out)
    assert done is not None and done.group(1) != "nan", out
    assert [int(r["step"]) for r in read_metrics(tmp_path)] == list(range(1, 7))

    # Fewer steps than the checkpoint holds: nothing trained, and the run says so.
    assert main([*argv, "--resume", "--resume-allow-changes"]) == 1
    err = capsys.readouterr().err
    assert "is at step 6, past the 4 steps asked" in err


def test_a_second_signal_while_stopping_exits_at_once(monkeypatch, capfd):
    from training.run import signals

    exits = []
    monkeypatch.setattr(signals.os, "_exit", exits.append)
    stop = signals.SignalStop()
    with stop.installed(), stop.deferred():
        stop.handle(signal.SIGTERM, None)  # the first is recorded: training stops at a step
        assert exits == [] and stop.signum == signal.SIGTERM
        stop.handle(signal.SIGINT, None)
    assert exits == [130]
    assert "second signal (SIGINT) while stopping: exiting now" in capfd.readouterr().err
