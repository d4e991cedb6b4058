"""Bad inputs and a hostile disk end ``python -m training.fit`` with one ``error:`` line that
names the path and the cause, exit code 1 and no traceback, before anything is loaded where the
cause can be seen without loading; nothing is written, and no earlier checkpoint is lost.

(Kills, resumes and non-finite stops: ``test_bad_input_run_resume.py``.)
"""

from __future__ import annotations

import errno
import shutil
from types import SimpleNamespace

import pytest
import torch

import training.fit
from tests.training.conftest import base_args
from training.base.errors import RunError
from training.fit import main
from training.run import callbacks, metrics_csv, outputs
from training.run.callbacks import AtomicCheckpointIO, read_checkpoint


def fails(argv: list[str], capsys) -> str:
    """Run ``main(argv)``; assert exit code 1 and a one-line error without traceback."""
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "error: " in err
    return err


def model_copy(tiny_assets, tmp_path):
    """A copy of the tiny model directory, to damage."""
    return shutil.copytree(tiny_assets.model_dir, tmp_path / "model")


def no_loading(monkeypatch):
    """Make any loading of model or data fail the test: the check must come first."""

    def loaded(*_args, **_kwargs):
        raise AssertionError("loading started before the check")

    monkeypatch.setattr(training.fit, "prepare_inputs", loaded)


def test_missing_model_directory(tiny_assets, tmp_path, capsys, monkeypatch):
    no_loading(monkeypatch)
    missing = tmp_path / "no-such-model"
    out = tmp_path / "out"
    err = fails(base_args(tiny_assets, out, model=missing), capsys)
    assert f"--model {missing}: no such file or directory" in err
    assert not out.exists()


def test_empty_model_directory(tiny_assets, tmp_path, capsys, monkeypatch):
    no_loading(monkeypatch)
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    err = fails(base_args(tiny_assets, out, model=empty), capsys)
    assert f"--model {empty}: the directory is empty" in err
    assert "sentencepiece" not in err
    assert not out.exists()


def test_corrupt_config_json(tiny_assets, tmp_path, capsys, monkeypatch):
    no_loading(monkeypatch)
    model = model_copy(tiny_assets, tmp_path)
    (model / "config.json").write_text('{"model_type": "llama", ')
    out = tmp_path / "out"
    err = fails(base_args(tiny_assets, out, model=model), capsys)
    assert f"{model / 'config.json'}: not valid JSON" in err
    assert not out.exists()


def test_truncated_safetensors(tiny_assets, tmp_path, capsys, monkeypatch):
    no_loading(monkeypatch)
    model = model_copy(tiny_assets, tmp_path)
    weights = model / "model.safetensors"
    full = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(full // 2)
    out = tmp_path / "out"
    err = fails(base_args(tiny_assets, out, model=model), capsys)
    assert f"{weights}: truncated ({full // 2} bytes" in err
    assert not out.exists()


def test_missing_weights(tiny_assets, tmp_path, capsys, monkeypatch):
    no_loading(monkeypatch)
    model = model_copy(tiny_assets, tmp_path)
    (model / "model.safetensors").unlink()
    err = fails(base_args(tiny_assets, tmp_path / "out", model=model), capsys)
    assert f"--model {model}: no weights" in err


def test_read_only_output_dir_is_found_before_loading(tiny_assets, tmp_path, capsys, monkeypatch):
    # Tests may run as root, for whom chmod does not make a directory read-only: the file
    # system's answer is simulated where the check writes its probe file.
    no_loading(monkeypatch)
    out = tmp_path / "out"
    out.mkdir()

    def refused(*_args, dir=None, **_kwargs):  # noqa: A002 - tempfile's name
        raise PermissionError(errno.EACCES, "Permission denied", str(dir))

    monkeypatch.setattr(outputs.tempfile, "mkstemp", refused)
    err = fails(base_args(tiny_assets, out), capsys)
    assert f"--output-dir {out}: not writable (permission denied)" in err
    assert list(out.iterdir()) == []


def test_output_dir_that_is_a_file(tiny_assets, tmp_path, capsys, monkeypatch):
    no_loading(monkeypatch)
    out = tmp_path / "out"
    out.write_text("not a directory")
    err = fails(base_args(tiny_assets, out), capsys)
    assert f"--output-dir {out}: exists and is not a directory" in err
    assert out.read_text() == "not a directory"


def full_disk_on_write(monkeypatch, failing_write: int) -> None:
    """``torch.save`` writes part of checkpoint number ``failing_write`` (1-based), then fails
    as a full disk does (ENOSPC); the writes before it succeed."""
    real_save = torch.save
    calls = {"n": 0}

    def save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == failing_write:
            f.write(b"PK\x03\x04 partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(callbacks.torch, "save", save)


def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint(
    tiny_assets, tmp_path, capsys, monkeypatch
):
    full_disk_on_write(monkeypatch, failing_write=3)
    argv = base_args(tiny_assets, tmp_path, max_steps=5, save_every_n_steps=1)
    err = fails(argv, capsys)
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert f"{last}: no space left on device while writing a checkpoint" in err
    assert f"the checkpoint written before, {last}, is intact" in err
    assert read_checkpoint(last)["global_step"] == 2  # the second write, whole
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]  # no temporary
    assert not (tmp_path / "model").exists()


def test_full_disk_reported_by_torchs_zip_writer(tmp_path, monkeypatch):
    # torch's zip writer reports a full disk as "file write failed" from inline_container.cc;
    # the free space left, smaller than what remained to write, tells it apart.
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 1, "w": torch.ones(4)}, path)

    def failing(obj, f, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . file write failed")

    monkeypatch.setattr(callbacks.torch, "save", failing)
    monkeypatch.setattr(callbacks.shutil, "disk_usage", lambda _: SimpleNamespace(free=0))
    with pytest.raises(RunError, match="no space left on device while writing a checkpoint"):
        AtomicCheckpointIO().save_checkpoint({"global_step": 2, "w": torch.ones(1000)}, path)
    assert read_checkpoint(path)["global_step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_full_disk_while_saving_the_model(tiny_assets, tmp_path, capsys, monkeypatch):
    def no_space(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(outputs, "save_model", no_space)
    err = fails(base_args(tiny_assets, tmp_path, save_every_n_steps=1), capsys)
    assert f"{tmp_path / 'model'}: no space left on device while saving the trained model" in err
    assert read_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 3


def test_full_disk_while_logging_keeps_the_rows_written(tiny_assets, tmp_path, capsys, monkeypatch):
    appends = {"n": 0}

    def full_after_two_appends(path, mode="r", *args, **kwargs):
        if mode == "a":
            appends["n"] += 1
            if appends["n"] > 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(metrics_csv, "open", full_after_two_appends, raising=False)
    err = fails(base_args(tiny_assets, tmp_path, max_steps=5), capsys)
    logs = tmp_path / "logs" / "metrics.csv"
    assert f"{logs}: no space left on device while writing the metrics" in err
    # the first row is written whole, the next two appended: none of them is lost
    for path in (logs, tmp_path / "metrics.csv"):
        assert [r["step"] for r in metrics_csv.read_rows(path)] == ["1", "2", "3"]


def test_debug_shows_the_traceback(tiny_assets, tmp_path, monkeypatch):
    missing = tmp_path / "no-such-model"
    with pytest.raises(RunError, match="no such file or directory"):
        main([*base_args(tiny_assets, tmp_path / "out", model=missing), "--debug"])
    monkeypatch.setenv("DPO_DEBUG", "1")
    with pytest.raises(RunError):
        main(base_args(tiny_assets, tmp_path / "out", model=missing))
