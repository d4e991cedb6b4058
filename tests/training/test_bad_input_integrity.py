"""Damaged files a run reads back: ``--resume`` falls back from a damaged ``last.ckpt`` to
``previous.ckpt`` (or stops naming both), drops a torn metrics row, refuses a metrics file that is
not text naming it; a full disk while checkpointing names ``checkpoints/`` and leaves no temporary
file (a real small tmpfs as root). Caches and other writes: ``test_bad_input_caches.py``; bad model
paths and simulated full disks of checkpoints, model and metrics: ``test_bad_input_run.py``;
kills and resumes: ``test_bad_input_run_resume.py``.
"""

from __future__ import annotations

import errno
import logging
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from tests.training.conftest import base_args, fit, read_metrics
from tests.training.disk_faults import (
    fails,
    no_temporaries,
    small_tmpfs,
)
from training.fit import main
from training.run.checkpoint_check import BadCheckpoint, verify_checkpoint
from training.run.metrics_csv import read_rows
from training.run.module import DPOModule

STEPS = 6
STOP_AT = 3  # the interrupted run dies with last.ckpt at step 3 and previous.ckpt at step 2
RUN = {"max_steps": STEPS, "save_every_n_steps": 1, "learning_rate": 1e-3, "seed": 3}


def steps_in(path) -> list[int]:
    return [int(float(r["step"])) for r in read_rows(path) if r.get("loss")]


# ------------------------------------------------------------------------------- checkpoints


class Stopped(Exception):
    """Stands in for a kill after the checkpoint of step ``STOP_AT``."""


def interrupt(tiny_assets, out: Path) -> Path:
    """Make ``out`` the output directory of a run that died after step 3's checkpoint:
    ``last.ckpt`` (step 3), ``previous.ckpt`` (step 2) and the metrics rows of steps 0 and 1.
    (Not copied between tests: Lightning's checkpoint state holds the directory's path, and in
    another one it writes ``last-v1.ckpt`` beside ``last.ckpt``.)"""

    def stop(self, outputs, batch, batch_idx):
        if self.global_step == STOP_AT:
            raise Stopped

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(DPOModule, "on_train_batch_end", stop, raising=False)
        with pytest.raises(Stopped):
            fit(base_args_for(tiny_assets, out))
    steps = {p.name: verify_checkpoint(p)["global_step"] for p in out.glob("checkpoints/*")}
    assert steps == {"last.ckpt": STOP_AT, "previous.ckpt": STOP_AT - 1}
    return out


@pytest.fixture(scope="module")
def a_checkpoint(tiny_assets, tmp_path_factory) -> Path:
    """A whole ``last.ckpt`` of an interrupted run, to damage copies of."""
    return interrupt(tiny_assets, tmp_path_factory.mktemp("interrupted")) / "checkpoints/last.ckpt"


def base_args_for(tiny_assets, out: Path, **flags) -> list[str]:
    return base_args(tiny_assets, out, **{**RUN, **flags})


def damage(path: Path, kind: str) -> None:
    """Make the checkpoint at ``path`` unusable in the way ``kind`` says."""
    if kind == "random bytes":
        path.write_bytes(os.urandom(4096))
    elif kind == "truncated":
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size // 2)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "a pickle":
        path.write_bytes(pickle.dumps({"global_step": 3}))
    elif kind == "not a dict":
        torch.save([1, 2, 3], path)
    elif kind == "a foreign dict":
        torch.save({"model": {"w": torch.ones(2)}, "step": 3}, path)
    elif kind == "step not an int":
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)  # not mapped
        checkpoint["global_step"] = "3"
        torch.save(checkpoint, path)
    else:
        raise AssertionError(kind)


DAMAGES = {
    "random bytes": "not a PyTorch checkpoint, or a truncated one (4096 bytes)",
    "truncated": "not a PyTorch checkpoint, or a truncated one",
    "empty": "empty file (0 bytes)",
    "a pickle": "not a PyTorch checkpoint, or a truncated one",
    "not a dict": "holds a list, not a checkpoint's dict",
    "a foreign dict": "not a checkpoint of this trainer (no state_dict, global_step",
    "step not an int": "global_step is '3', not a step count",
}


@pytest.mark.parametrize("kind", list(DAMAGES))
def test_a_damaged_checkpoint_is_named_with_its_cause(a_checkpoint, tmp_path, kind):
    path = tmp_path / "last.ckpt"
    shutil.copyfile(a_checkpoint, path)
    damage(path, kind)
    with pytest.raises(BadCheckpoint, match=DAMAGES[kind].replace("(", r"\(").replace(")", r"\)")):
        verify_checkpoint(path)


@pytest.mark.parametrize("kind", ["random bytes", "not a dict"])
def test_resume_falls_back_from_a_damaged_last_checkpoint_to_previous(
    tiny_assets, tmp_path, kind, caplog, capsys
):
    out = interrupt(tiny_assets, tmp_path / "run")
    last, previous = out / "checkpoints" / "last.ckpt", out / "checkpoints" / "previous.ckpt"
    damage(last, kind)
    with caplog.at_level(logging.WARNING):
        assert main([*base_args_for(tiny_assets, out), "--resume"]) == 0, capsys.readouterr().err
    notes = [r.getMessage() for r in caplog.records if "--resume" in r.getMessage()]
    assert notes == [
        f"--resume: {last}: {DAMAGES[kind]}; resuming from {previous} (step {STOP_AT - 1}), "
        "the checkpoint it replaced"
    ]
    assert verify_checkpoint(last)["global_step"] == STEPS
    for path in (out / "logs" / "metrics.csv", out / "metrics.csv"):
        assert steps_in(path) == list(range(1, STEPS + 1)), path
    no_temporaries(out)


def test_a_damaged_last_checkpoint_without_previous_stops_naming_it(tiny_assets, tmp_path, capsys):
    out = tmp_path / "run"
    last = out / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(os.urandom(1000))
    line = fails([*base_args_for(tiny_assets, out), "--resume"], capsys)
    assert line == (
        f"error: --resume: {last}: not a PyTorch checkpoint, or a truncated one (1000 bytes); "
        "no previous.ckpt beside it to fall back to. Start again without --resume, or into "
        "another --output-dir."
    )
    assert "weights_only" not in line
    assert last.stat().st_size == 1000  # left as it was


def test_choose_checkpoint_without_last(a_checkpoint, tmp_path, caplog):
    from training.base.errors import RunError
    from training.run.checkpoint_check import choose_checkpoint

    assert choose_checkpoint(tmp_path) is None  # neither file: a run from the beginning
    previous = tmp_path / "previous.ckpt"
    shutil.copyfile(a_checkpoint, previous)
    with caplog.at_level(logging.WARNING):
        path, checkpoint = choose_checkpoint(tmp_path)
    assert path == previous and checkpoint["global_step"] == STOP_AT
    assert f"{tmp_path / 'last.ckpt'}: no such file; resuming from {previous}" in caplog.text
    damage(previous, "empty")
    with pytest.raises(RunError, match="previous.ckpt: empty file"):
        choose_checkpoint(tmp_path)


def test_both_checkpoints_damaged_stops_naming_both(tiny_assets, tmp_path, capsys):
    out = interrupt(tiny_assets, tmp_path / "run")
    last, previous = out / "checkpoints" / "last.ckpt", out / "checkpoints" / "previous.ckpt"
    damage(last, "a foreign dict")
    damage(previous, "truncated")
    line = fails([*base_args_for(tiny_assets, out), "--resume"], capsys)
    assert f"--resume: {last}: not a checkpoint of this trainer" in line
    assert f"{previous}: not a PyTorch checkpoint, or a truncated one" in line
    assert "no intact checkpoint to resume from" in line


def test_full_disk_while_checkpointing_on_a_real_tmpfs(tiny_assets, tmp_path, capsys, monkeypatch):
    """``checkpoints/`` holds one checkpoint (~2 MB) but not a second beside it."""
    out = tmp_path / "run"
    folder = out / "checkpoints"
    with small_tmpfs(folder, "3m") as real:
        if not real:
            from training.run import callbacks

            real_save = torch.save
            calls = {"n": 0}

            def save(obj, f, *args, **kwargs):
                calls["n"] += 1
                if calls["n"] == 2:
                    f.write(b"PK\x03\x04 partial")
                    raise OSError(errno.ENOSPC, "No space left on device")
                return real_save(obj, f, *args, **kwargs)

            monkeypatch.setattr(callbacks.torch, "save", save)
        line = fails(base_args_for(tiny_assets, out), capsys)
        last = folder / "last.ckpt"
        assert f"{last}: no space left on device while writing a checkpoint" in line
        assert verify_checkpoint(last)["global_step"] == 1
        assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt"]  # no temporary


# ------------------------------------------------------------------------------- metrics


def tear_last_row(path: Path, how: str) -> list[str]:
    """Append a torn row to ``path``, as a kill mid-append leaves it; returns the rows' steps
    before."""
    text = path.read_bytes().decode()
    lines = text.splitlines()
    header, rows = lines[0].split(","), lines[1:]
    assert header[-1] == "step"
    if how == "step cut short":  # "1x" cut to "1": every field parses, the step is a real one
        torn = ",".join(rows[0].split(",")[:-1] + ["1"])
    else:  # fewer fields
        torn = rows[0][: len(rows[0]) // 2]
    path.write_bytes((text + torn).encode())
    return [r.split(",")[-1] for r in rows]


@pytest.mark.parametrize("how", ["step cut short", "fewer fields"])
def test_a_torn_last_metrics_row_is_dropped_on_resume(tiny_assets, tmp_path, how, caplog):
    out = interrupt(tiny_assets, tmp_path / "run")
    logs = out / "logs" / "metrics.csv"
    loss_at_2 = float(read_rows(logs)[1]["loss"])
    assert tear_last_row(logs, how) == ["1", "2"]
    with caplog.at_level(logging.WARNING):
        assert main([*base_args_for(tiny_assets, out), "--resume"]) == 0
    assert f"--resume: {logs}: dropped a torn last row" in caplog.text
    for path in (logs, out / "metrics.csv"):
        assert steps_in(path) == list(range(1, STEPS + 1)), path
    assert read_metrics(out)[1]["loss"] == loss_at_2  # the row written whole, not the torn one


def test_a_metrics_file_that_is_not_text_is_named(tiny_assets, tmp_path, capsys):
    out = tmp_path / "run"
    logs = out / "logs" / "metrics.csv"
    logs.parent.mkdir(parents=True)
    logs.write_bytes(b"loss,step\r\n0.69,0\r\n" + b"\xff\xfe\x00\x81,1\r\n")
    line = fails([*base_args_for(tiny_assets, out), "--resume"], capsys)
    assert line == (
        f"error: --resume: {logs}: not a metrics file (byte 0xff at offset 19 is not UTF-8 "
        "text); move it aside to resume without the earlier rows"
    )
    assert "codec" not in line
