"""Padding-free rows through ``training.fit`` (``dpo_core.pair_layout``): on real hh-rlhf rows of
uneven length, a run trains exactly as with one pair per row and as the plain forward (within
``STEP_TOL``: float32 rounding of the attention sums) in every mode, and several pairs really
share a row, all rows in one backbone call, in the training step, the reference precomputation and
the held-out evaluation."""

from __future__ import annotations

import json
import sys

import pytest
import torch

import dpo_core.packing
from tests.conftest import load_hh_rows
from tests.training.conftest import assert_steps_close, base_args, fit

# The first 13 hh-rlhf rows at max_length 256 (the tiny model's position limit): line 4's
# prompt alone fills it and is dropped, as trl drops it; the 12 kept are 3 steps of 4 pairs, so
# the run reads every row and the reference is precomputed (unless a mode says otherwise), and
# 2 DDP processes split every step evenly. Sequences of 50-256 tokens: much padding.
NUM_ROWS, STEPS, MAX_LENGTH = 13, 3, 256
MODES = {
    "full": {},
    "lora": {"lora": True},
    "lora_live_reference": {"lora": True, "precompute_ref_log_probs": False},
    "qlora": {"load_in_4bit": True, "qlora_adapter_dtype": "float32"},
    "accumulation": {"batch_size": 2, "gradient_accumulation_steps": 2},
}


@pytest.fixture(scope="module")
def hh_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("hh") / "hh.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in load_hh_rows(NUM_ROWS)))
    return path


def in_probe() -> bool:
    frame = sys._getframe()
    while frame is not None:
        if frame.f_code.co_name == "probe_blocker":
            return True
        frame = frame.f_back
    return False


@pytest.fixture
def layouts(monkeypatch):
    """Every packed forward as (grad enabled, rows, pairs, padding-free: the layout was chosen
    padding-free), in call order; the load-time probe's (``dpo_core.packing.probe_blocker``) is
    not one of the run's."""
    calls = []
    real_pack, real_choose = dpo_core.packing.pack_pairs, dpo_core.packing.choose_layout
    asked = {}

    def choose(lengths, hidden_size, padding_free=True):
        asked["padding_free"] = padding_free
        return real_choose(lengths, hidden_size, padding_free)

    def spy(batch, layout=None):
        packed = real_pack(batch, layout)
        if in_probe():
            return packed
        rows, free = packed.input_ids.shape[0], asked.pop("padding_free")
        calls.append((torch.is_grad_enabled(), rows, batch.num_pairs, free))
        return packed

    monkeypatch.setattr(dpo_core.packing, "choose_layout", choose)
    monkeypatch.setattr(dpo_core.packing, "pack_pairs", spy)
    return calls


def run(tiny_assets, out, hh_file, **flags):
    options = {
        "dataset": hh_file,
        "max_steps": STEPS,
        "max_length": MAX_LENGTH,
        "learning_rate": 5e-3,
    }
    return fit(base_args(tiny_assets, out, **(options | flags)))


@pytest.mark.parametrize("mode", sorted(MODES))
def test_padding_free_trains_like_one_pair_per_row_and_plain(
    mode, tiny_assets, tmp_path, hh_file, layouts
):
    packed = run(tiny_assets, tmp_path / "packed", hh_file, **MODES[mode])
    training = [(rows, pairs, free) for grad, rows, pairs, free in layouts if grad]
    assert training and all(free for _, _, free in training)
    if MODES[mode].get("batch_size", 4) > 2:  # 2 pairs never share a row no longer than either
        assert any(rows < pairs for rows, pairs, _ in training), training
    layouts.clear()
    one_per_row = run(tiny_assets, tmp_path / "rows", hh_file, padding_free=False, **MODES[mode])
    assert all(rows == pairs and not free for _, rows, pairs, free in layouts)
    plain = run(tiny_assets, tmp_path / "plain", hh_file, prompt_sharing=False, **MODES[mode])
    assert packed.history[-1]["rewards/margins"] != 0  # trained: the comparison means something
    assert_steps_close(packed.history, one_per_row.history)
    assert_steps_close(packed.history, plain.history)


def test_precomputation_and_held_out_evaluation_are_padding_free(
    tiny_assets, tmp_path, hh_file, layouts
):
    """Before the first training step the reference log-probs are precomputed, after the last
    the held-out pairs are scored: both without gradients, both padding-free; the evaluation's
    numbers equal the plain forward's."""
    evaluation = {"evaluate": True, "eval_fraction": 0.25, "num_prompts": 0, "eval_batch_size": 3}
    packed = run(tiny_assets, tmp_path / "packed", hh_file, **evaluation)
    grads = [grad for grad, *_ in layouts]
    first, last = grads.index(True), len(grads) - 1 - grads[::-1].index(True)
    precompute, heldout = layouts[:first], layouts[last + 1 :]
    assert not any(grad for grad, *_ in precompute + heldout)
    for phase in (precompute, heldout):
        assert phase and all(free for *_, free in phase)
    plain = run(tiny_assets, tmp_path / "plain", hh_file, prompt_sharing=False, **evaluation)
    for key, value in plain.after.items():
        # float32 sums of ~30 token log-probs in two summation orders (STEP_TOL's reasoning)
        assert packed.after[key] == pytest.approx(value, rel=1e-5, abs=1e-5), key


@pytest.mark.slow
def test_ddp_with_padding_free_rows_equals_one_plain_process(tiny_assets, tmp_path, hh_file):
    """2 DDP processes x 2 uneven pairs, padding-free (gloo, CPU) == 1 process x 4 pairs on the
    plain forward."""
    from tests.training.conftest import fit_subprocess, read_metrics

    options = {
        "dataset": hh_file,
        "max_steps": STEPS,
        "max_length": MAX_LENGTH,
        "learning_rate": 5e-3,
    }
    ddp_args = base_args(
        tiny_assets, tmp_path / "ddp", strategy="ddp", devices=2, batch_size=2, **options
    )
    child = fit_subprocess(ddp_args)
    assert child.returncode == 0, child.stderr[-3000:]
    plain = run(tiny_assets, tmp_path / "plain", hh_file, prompt_sharing=False)
    ddp = read_metrics(tmp_path / "ddp")
    assert ddp[-1]["rewards/margins"] != 0
    assert [r["num_tokens"] for r in ddp] == [r["num_tokens"] for r in plain.history]
    assert_steps_close(ddp, plain.history)
