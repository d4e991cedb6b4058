"""Faults during training: a run killed mid-training resumes to the exact uninterrupted result,
checkpoints are atomic, and a non-finite loss or gradient stops the run with a clear message
while the last good checkpoint stays good."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

import training.fit
from tests.conftest import REPO_ROOT
from tests.training.conftest import base_args, child_env, fit, fit_subprocess, read_metrics

# 32 rows / 4 per batch = 8 steps an epoch: 14 steps run into the second epoch, whose shuffled
# order differs from the first. The kill comes in the second epoch, mid-epoch, so the resumed
# run must restore both the epoch's order and the position in it.
RESUME = {
    "max_steps": 14,
    "shuffle": True,
    "save_every_n_steps": 1,
    "learning_rate": 1e-3,
    "seed": 3,
}
KILL_AT_STEP = 10


def load_checkpoint(path) -> dict:
    # A Lightning checkpoint holds loop and callback state besides tensors.
    return torch.load(path, map_location="cpu", weights_only=False)


def kill_after_checkpoint(argv: list[str], checkpoint, step: int, timeout: float = 240):
    """Start ``python -m training.fit argv``; SIGKILL it once ``checkpoint`` holds ``step``
    optimizer steps. Returns (return code, number of times the checkpoint was read while the
    run was writing it)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "training.fit", *argv],
        cwd=REPO_ROOT,
        env=child_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    reads, deadline = 0, time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if checkpoint.exists():
                # Every read must succeed: the file is always a whole checkpoint.
                reads += 1
                if load_checkpoint(checkpoint)["global_step"] >= step:
                    proc.send_signal(signal.SIGKILL)
                    break
            time.sleep(0.01)
    finally:
        if proc.poll() is None:  # not killed above (timeout, or a failed read): do not leak it
            proc.kill()
        proc.wait()
    return proc.returncode, reads


@pytest.mark.slow
def test_resume_after_sigkill_equals_an_uninterrupted_run(tiny_assets, tmp_path):
    whole = fit(base_args(tiny_assets, tmp_path / "whole", **RESUME))

    out = tmp_path / "killed"
    argv = base_args(tiny_assets, out, **RESUME)
    last = out / "checkpoints" / "last.ckpt"
    code, reads = kill_after_checkpoint(argv, last, KILL_AT_STEP)
    assert code == -signal.SIGKILL, "the run ended before it could be killed mid-training"
    assert reads > 0
    killed_at = load_checkpoint(last)["global_step"]
    assert KILL_AT_STEP <= killed_at < RESUME["max_steps"]

    resumed = fit_subprocess([*argv, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # Nothing but the checkpoint itself: a temporary left by the kill is cleaned up.
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]
    assert load_checkpoint(last)["global_step"] == RESUME["max_steps"]

    # CPU, same seed, same data order, restored optimizer and schedule: bit for bit.
    theirs = whole.policy.state_dict()
    ours = load_file(out / "model" / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for name, t in ours.items():
        assert torch.equal(t, theirs[name]), name
    # metrics.csv covers the whole run, each step once: the interrupted run's steps, then the
    # resumed run's, and every step logs what the uninterrupted run logged at that step
    # (num_tokens, a running total, included).
    resumed_rows = read_metrics(out)
    assert [int(r["step"]) for r in resumed_rows] == list(range(1, RESUME["max_steps"] + 1))
    whole_steps = read_metrics(tmp_path / "whole")
    for step, row in enumerate(resumed_rows):
        assert row == whole_steps[step], f"step {step}"


class Fault(L.Callback):
    """At optimizer step ``step``, put a nan into the weights (the loss goes nan) or into one
    gradient (the loss is still finite). The weights' nan goes into every row of the first
    weight (the input embeddings: every token's), not into one token's row, which a
    padding-free forward may never read (row 0 is the pad token's).

    ``diverge``: as the update of step ``step - 1`` ends (before its checkpoint is written), the
    LM head's weight becomes finite but huge (1e38, near float32's largest; the input
    embeddings would be normalised back by the first RMSNorm), as after a diverging update: the
    logits of step ``step`` overflow. That checkpoint holds weights that fail, as a real divergence's
    would, on any CPU (a diverging learning rate is not the same on every machine)."""

    def __init__(self, kind: str, step: int) -> None:
        self.kind, self.step = kind, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.kind == "loss" and trainer.global_step == self.step:
            with torch.no_grad():
                weight = next(pl_module.model.parameters())
                weight.view(weight.shape[0], -1)[:, 0] = float("nan")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.kind == "diverge" and trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.model.get_output_embeddings().weight.fill_(1e38)

    def on_after_backward(self, trainer, pl_module) -> None:
        if self.kind == "gradient" and trainer.global_step == self.step:
            next(pl_module.model.parameters()).grad.view(-1)[0] = float("nan")


def with_fault(monkeypatch, kind: str, step: int) -> None:
    """Inject a ``Fault`` at ``step`` into the next in-process runs."""
    make_trainer = training.fit.make_trainer

    def patched(*args, **kwargs):
        trainer = make_trainer(*args, **kwargs)
        trainer.callbacks.insert(0, Fault(kind, step))
        return trainer

    monkeypatch.setattr(training.fit, "make_trainer", patched)


@pytest.mark.parametrize(
    ("kind", "message"),
    [("loss", "non-finite DPO loss"), ("gradient", "non-finite gradient norm")],
)
def test_non_finite_values_stop_training_and_keep_the_last_good_checkpoint(
    tiny_assets, tmp_path, monkeypatch, capsys, kind, message
):
    fault_step = 2
    with_fault(monkeypatch, kind, fault_step)
    argv = base_args(tiny_assets, tmp_path, max_steps=5, save_every_n_steps=1)
    assert training.fit.main(argv) == 1

    err = capsys.readouterr().err
    assert f"error: {message}" in err
    assert f"at optimizer step {fault_step}" in err
    assert f"{tmp_path}/checkpoints" in err and "--resume" in err
    assert "Traceback" not in err

    # The checkpoint of the bad step holds the weights that step ran on (resuming from it would
    # repeat the failure): the one before it is kept (training.run.nan_stop).
    checkpoint = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == fault_step - 1
    weights = checkpoint["state_dict"].values()
    assert all(torch.isfinite(t).all() for t in weights if t.is_floating_point())
    assert not (tmp_path / "model").exists()  # a failed run publishes no model
