"""parity.sides.padding_free_check: the padding-free forward against plain float32 and float64."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

import dpo_core.packing
from dpo_core.collate import PreferenceCollator
from parity.check.compare import compare_padding_free
from parity.sides import padding_free_check
from tests.dpo_core.tiny import tiny_llama

torch.set_num_threads(1)


def uneven_batches(vocab: int, n: int = 3, pairs: int = 6) -> list:
    """Batches of one long pair (prompt 60, completions 30 and 40) and short ones (prompts of
    0-20, completions of 1-15): much padding, and short pairs that share rows as long as it."""
    rng = random.Random(0)

    def ids(k: int) -> list[int]:
        return [rng.randrange(1, vocab) for _ in range(k)]

    def pair(p: int, c: int, r: int) -> dict:
        return {"prompt_ids": ids(p), "chosen_ids": ids(c), "rejected_ids": ids(r)}

    collate = PreferenceCollator(pad_token_id=0)
    short = [(rng.randint(0, 20), rng.randint(1, 15), rng.randint(1, 15)) for _ in range(n * pairs)]
    return [
        collate([pair(60, 30, 40)] + [pair(*s) for s in short[b * pairs : (b + 1) * pairs - 1]])
        for b in range(n)
    ]


def test_padding_free_is_as_accurate_as_plain_and_packs_pairs():
    model = tiny_llama()
    check = padding_free_check.measure(model, uneven_batches(model.config.vocab_size))
    assert check.sequences == 3 * 12 and check.rows < check.pairs == 18
    assert 0 < check.plain_error < 1e-4  # float32 vs float64, sums of <= 70 tokens of O(5)
    assert check.packed_error <= check.bound
    row = compare_padding_free(check)
    assert row.passed and row.gated and row.floor == check.plain_error


def test_a_mask_without_blocks_fails_the_check(monkeypatch):
    """A plain causal mask over each packed row: rejected tokens see the chosen ones and later
    pairs see earlier ones. A real difference, far above the floor. (The load-time probe,
    ``dpo_core.packing.probe_blocker``, would catch this leak and run plain; here the leak comes
    after the probe passed, as a packing bug the probe's few tokens missed would.)"""
    model = tiny_llama()
    assert dpo_core.packing.model_blocker(model) is None  # the verdict, taken before the leak
    real_pack = dpo_core.packing.pack_pairs

    def leaky_pack(batch, layout=None):
        packed = real_pack(batch, layout)
        q = torch.arange(packed.input_ids.shape[1])
        causal = q.unsqueeze(-1) >= q.unsqueeze(-2)
        packed.allowed = causal.expand_as(packed.allowed).clone()
        return packed

    monkeypatch.setattr(dpo_core.packing, "pack_pairs", leaky_pack)
    check = padding_free_check.measure(model, uneven_batches(model.config.vocab_size))
    assert check.packed_error > 100 * check.bound
    assert not compare_padding_free(check).passed


def test_four_bit_models_are_reported_not_measured():
    import bitsandbytes as bnb  # why here: optional, heavy, and prints a banner

    model = nn.Sequential(bnb.nn.Linear4bit(64, 64))
    check = padding_free_check.measure(model, [])
    assert "4-bit" in check.skipped
    row = compare_padding_free(check)
    assert row.passed and not row.gated and "4-bit" in row.note


@pytest.mark.parametrize("factor", [1.0, 3.0])
def test_bound_is_the_factor_times_the_floor_plus_one_rounding(factor, monkeypatch):
    monkeypatch.setattr(padding_free_check, "FACTOR", factor)
    check = padding_free_check.PaddingFreeCheck(plain_error=1e-5, scale=100.0)
    assert check.bound == pytest.approx(factor * 1e-5 + torch.finfo(torch.float32).eps * 100)
