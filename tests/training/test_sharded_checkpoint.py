"""Sharded checkpoints of ``--strategy fsdp`` (``training.run.sharded_checkpoint``).

- ``last.ckpt`` is a directory: one DCP shard per process and ``meta.pt``, no temporaries left;
- 2 steps + ``--resume`` + 2 steps equals 4 steps in one go, bit for bit (2 processes, gloo),
  full fine-tuning and LoRA;
- resumed by 1 process (DCP reshards), the run goes on as the 2-process run does, within the
  bounds of 1 process against 2 (``test_sharding.py``);
- a one-file checkpoint (a run without fsdp) resumes under fsdp; a sharded one without fsdp is
  refused in one line;
- atomic: a kill between the write and its publication leaves the whole previous checkpoint,
  which ``--resume`` takes; a torn shard is named and passed over.
"""

from __future__ import annotations

import logging
import os
import shutil

import pytest
import torch

from tests.training.conftest import (
    STEP_KEYS,
    assert_steps_close,
    assert_weights_close,
    base_args,
    load_weights,
    read_metrics,
)
from tests.training.test_sharding import fit_sharded, single
from training.run.checkpoint_check import BadCheckpoint, choose_checkpoint, verify_checkpoint
from training.run.nan_stop import keep_good_checkpoint
from training.run.sharded_checkpoint import full_model_state, publish, publish_if_whole

# A constant learning rate: a 2-step run's schedule is the first half of the 4-step run's, so
# the resumed run can equal the whole one bit for bit.
OPTIONS = dict(lr_scheduler_type="constant", warmup_ratio=0.0, save_every_n_steps=1)
OPTIONS |= dict(learning_rate=5e-3, batch_size=2)
RESUME = ["--resume", "--resume-allow-changes"]  # --max-steps 2 -> 4 (and what a test changes)


@pytest.fixture(scope="module")
def runs(tiny_assets, tmp_path_factory):
    """4 sharded steps in one go (``whole``) and the first 2 of them (``half``, kept as it is:
    tests resume copies of it)."""
    root = tmp_path_factory.mktemp("sharded-runs")
    fit_sharded(base_args(tiny_assets, root / "whole", max_steps=4, **OPTIONS))
    fit_sharded(base_args(tiny_assets, root / "half", max_steps=2, **OPTIONS))
    return root


def copy_of(runs, name: str, tmp_path):
    """A copy of ``runs/name`` to resume (the original stays for the other tests)."""
    return shutil.copytree(runs / name, tmp_path / name)


@pytest.mark.slow
def test_last_checkpoint_is_one_shard_per_process(runs):
    folder = runs / "half" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt"]  # no temporary, no previous
    last = folder / "last.ckpt"
    assert sorted(p.name for p in last.iterdir()) == [
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
        "meta.pt",
    ]
    meta = verify_checkpoint(last)
    assert meta["global_step"] == 2 and "state_dict" not in meta  # the weights are in the shards
    assert len(meta["rng_states"]) == 2  # each process's generators
    assert meta["dpo_run"]["config"]["trainer.strategy"] == "fsdp"


@pytest.mark.slow
def test_resume_of_a_sharded_run_is_exact(runs, tiny_assets, tmp_path):
    """2 steps, then a resume to 4, equals 4 steps in one go, bit for bit in every metric
    (metrics.csv merged: the first 2 rows from the first run) and every weight."""
    parts = copy_of(runs, "half", tmp_path)
    fit_sharded([*base_args(tiny_assets, parts, max_steps=4, **OPTIONS), *RESUME])
    keys = ("loss", "rewards/margins", "logps/chosen", "grad_norm", "num_tokens")
    theirs, ours = read_metrics(runs / "whole"), read_metrics(parts)
    assert [[r[k] for k in keys] for r in ours] == [[r[k] for k in keys] for r in theirs]
    a, b = load_weights(parts / "model"), load_weights(runs / "whole" / "model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_resume_of_a_sharded_lora_run_is_exact(tiny_assets, tmp_path):
    """The same with LoRA: the frozen base is in the shards too, the optimizer state only for
    the adapters; the resumed adapter equals the one of 4 steps in one go, bit for bit."""
    options = OPTIONS | dict(lora=True, lora_r=4)
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    fit_sharded(base_args(tiny_assets, whole, max_steps=4, **options))
    fit_sharded(base_args(tiny_assets, parts, max_steps=2, **options))
    fit_sharded([*base_args(tiny_assets, parts, max_steps=4, **options), *RESUME])
    keys = ("loss", "rewards/margins", "grad_norm", "num_tokens")
    theirs, ours = read_metrics(whole), read_metrics(parts)
    assert [[r[k] for k in keys] for r in ours] == [[r[k] for k in keys] for r in theirs]
    a, b = load_weights(parts / "model"), load_weights(whole / "model")
    assert any("lora_B" in k for k in a)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_one_process_resumes_a_two_process_checkpoint(runs, tiny_assets, tmp_path):
    """DCP reshards the 2 processes' shards into 1 process's on load. 1 process x 4 pairs goes
    on with the rows 2 x 2 pairs would have trained (the sampler's position counts batches of
    the same global batch), within the bounds of 1 process against 2 (``test_sharding``)."""
    parts = copy_of(runs, "half", tmp_path)
    argv = base_args(tiny_assets, parts, max_steps=4, **(OPTIONS | dict(batch_size=4)))
    output = fit_sharded([*argv, *RESUME], devices=1)
    assert "trainer.devices: 2 -> 1" in output
    ours, theirs = read_metrics(parts), read_metrics(runs / "whole")
    assert [r["num_tokens"] for r in ours] == [r["num_tokens"] for r in theirs]
    assert_steps_close(ours, theirs, keys=STEP_KEYS)
    assert_weights_close(parts / "model", runs / "whole" / "model", tiny_assets.model_dir)


@pytest.mark.slow
def test_a_one_file_checkpoint_resumes_under_fsdp(runs, tiny_assets, tmp_path):
    """2 steps of 1 process without fsdp (one file), then 2 sharded processes to step 4: the
    full state dict is scattered to the shards, the Adam moments by parameter name (keyed by
    position, they would land on other parameters: a shape error, or for parameters of one
    shape steps 3-4 far outside these bounds); the run equals the sharded one within the
    bounds of 1 process against 2."""
    parts = tmp_path / "parts"
    single(base_args(tiny_assets, parts, max_steps=2, **(OPTIONS | dict(batch_size=4))))
    assert (parts / "checkpoints" / "last.ckpt").is_file()
    fit_sharded([*base_args(tiny_assets, parts, max_steps=4, **OPTIONS), *RESUME])
    assert (parts / "checkpoints" / "last.ckpt").is_dir()  # from then on, sharded
    ours, theirs = read_metrics(parts), read_metrics(runs / "whole")
    assert [r["num_tokens"] for r in ours] == [r["num_tokens"] for r in theirs]
    assert_steps_close(ours, theirs, keys=STEP_KEYS)
    assert_weights_close(parts / "model", runs / "whole" / "model", tiny_assets.model_dir)


@pytest.mark.slow
def test_a_sharded_checkpoint_without_fsdp_is_one_line(runs, tiny_assets, tmp_path, capsys):
    from training.fit import main

    parts = copy_of(runs, "half", tmp_path)
    argv = base_args(tiny_assets, parts, max_steps=4, **(OPTIONS | dict(batch_size=4)))
    assert main([*argv, *RESUME, "--threads", "1"]) != 0
    err = capsys.readouterr().err.strip()
    assert "is a sharded checkpoint" in err and "resume it with --strategy fsdp" in err
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert verify_checkpoint(parts / "checkpoints" / "last.ckpt")["global_step"] == 2
    assert len(read_metrics(parts)) == 2  # nothing trained, nothing logged


@pytest.mark.slow
def test_a_kill_between_write_and_publication_leaves_the_previous_whole(
    runs, tmp_path, monkeypatch, caplog
):
    """``publish`` moves ``last.ckpt`` to ``previous.ckpt``, then the new one to ``last.ckpt``;
    killed in between (the second rename never happens), ``--resume`` takes the previous. The
    temporary of a writer killed mid-write is ignored, and removed by the next save."""
    folder = tmp_path / "checkpoints"
    shutil.copytree(runs / "half" / "checkpoints" / "last.ckpt", folder / "last.ckpt")
    new = shutil.copytree(runs / "whole" / "checkpoints" / "last.ckpt", folder / ".last.ckpt.x.tmp")
    replace = os.replace

    def killed_at_second(src, dst):
        if src == new:
            raise KeyboardInterrupt  # as a kill: nothing after it runs
        replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_at_second)
    with pytest.raises(KeyboardInterrupt):
        publish(new, folder / "last.ckpt", folder / "previous.ckpt")
    monkeypatch.setattr(os, "replace", replace)
    assert not (folder / "last.ckpt").exists()
    with caplog.at_level(logging.WARNING):
        path, meta = choose_checkpoint(folder)
    assert path == folder / "previous.ckpt" and meta["global_step"] == 2
    assert "last.ckpt: no such file; resuming from" in caplog.text
    # The next save: a writer killed mid-write left its temporary; it is removed.
    shutil.copytree(new, folder / ".last.ckpt.dead.tmp")
    assert publish_if_whole(new, folder / "last.ckpt", folder / "previous.ckpt") == ""
    # (the previous one goes, as each save removes it before writing: at most two on disk)
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt"]
    assert verify_checkpoint(folder / "last.ckpt")["global_step"] == 4


@pytest.mark.slow
def test_a_checkpoint_without_every_shard_is_not_published(runs, tmp_path):
    """A process on a machine without this file system wrote its shard elsewhere: the
    checkpoint is not published, ``last.ckpt`` stays, the message names the shard and why."""
    folder = tmp_path / "checkpoints"
    shutil.copytree(runs / "half" / "checkpoints" / "last.ckpt", folder / "last.ckpt")
    new = shutil.copytree(runs / "whole" / "checkpoints" / "last.ckpt", folder / ".last.ckpt.x.tmp")
    (new / "__1_0.distcp").unlink()
    problem = publish_if_whole(new, folder / "last.ckpt", folder / "previous.ckpt")
    assert "__1_0.distcp" in problem and "a file system all machines share" in problem
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt"]
    assert verify_checkpoint(folder / "last.ckpt")["global_step"] == 2


@pytest.mark.slow
def test_a_torn_shard_is_named_and_passed_over(runs, tmp_path, caplog):
    folder = tmp_path / "checkpoints"
    shutil.copytree(runs / "half" / "checkpoints" / "last.ckpt", folder / "previous.ckpt")
    last = shutil.copytree(runs / "whole" / "checkpoints" / "last.ckpt", folder / "last.ckpt")
    shard = last / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(BadCheckpoint, match=r"shard file\(s\) missing or truncated: __1_0.distcp"):
        verify_checkpoint(last)
    with caplog.at_level(logging.WARNING):
        path, meta = choose_checkpoint(folder)
    assert path == folder / "previous.ckpt" and meta["global_step"] == 2
    (last / ".metadata").unlink()
    with pytest.raises(BadCheckpoint, match="no shard index"):
        verify_checkpoint(last)


@pytest.mark.slow
def test_a_non_finite_stop_judges_the_shards(runs, tmp_path):
    """After a non-finite value at step 3, the step-2 checkpoint is kept if its weights,
    gathered from its shards, are finite; a checkpoint of the bad step itself is removed."""
    whole = full_model_state(runs / "half" / "checkpoints" / "last.ckpt")
    assert whole and all(torch.isfinite(t).all() for t in whole.values())
    folder = tmp_path / "checkpoints"
    shutil.copytree(runs / "half" / "checkpoints" / "last.ckpt", folder / "last.ckpt")
    assert keep_good_checkpoint(folder, bad_step=3) == (2, [])
    assert keep_good_checkpoint(folder, bad_step=2)[0] is None  # it holds the bad step's weights
    assert not (folder / "last.ckpt").exists()
