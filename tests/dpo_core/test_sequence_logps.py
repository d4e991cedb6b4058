"""dpo_core.logps after the head: per-sequence sums, LD-DPO weighting, completion lengths and
the shape checks, on hand-worked token log-probs and against trl's LD-DPO expression."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dpo_core.logp_types import TokenLogps, split_pairs
from dpo_core.logps import completion_lengths, ld_sums
from tests.dpo_core.oracle import score_hidden
from tests.dpo_core.tiny import SPANS, make_batch, make_head


def hand_token_logps() -> TokenLogps:
    """B = 2 pairs on a (4, 5) shifted grid; logps are -(k) for the k-th completion token.

    rows: chosen_0 has 3 scored tokens, chosen_1 has 1, rejected_0 has 2, rejected_1 has 4.
    """
    mask = torch.tensor(
        [[0, 1, 1, 1, 0], [0, 0, 0, 1, 0], [1, 1, 0, 0, 0], [0, 1, 1, 1, 1]], dtype=torch.bool
    )
    logps = -(mask.cumsum(1) * mask).float()
    return TokenLogps(logps=logps, mask=mask)


def test_sequence_logps_and_split_pairs():
    """Sums: chosen_0 -1-2-3 = -6, chosen_1 -1, rejected_0 -1-2 = -3, rejected_1 -1-2-3-4 = -10."""
    chosen, rejected = split_pairs(hand_token_logps().row_sums())
    assert chosen.tolist() == [-6.0, -1.0] and rejected.tolist() == [-3.0, -10.0]


def test_ld_sums_hand_worked():
    """ld_alpha = 0.5. Pair 0: shared = min(3, 2) = 2 -> chosen -1-2 + 0.5·(-3) = -4.5,
    rejected -1-2 = -3. Pair 1: shared = min(1, 4) = 1 -> chosen -1,
    rejected -1 + 0.5·(-2-3-4) = -5.5. With ld_alpha = 1 it is the plain sum."""
    token = hand_token_logps()
    chosen, rejected = ld_sums(token, 0.5)
    assert chosen.tolist() == [-4.5, -1.0] and rejected.tolist() == [-3.0, -5.5]
    plain = split_pairs(token.row_sums())
    for got, want in zip(ld_sums(token, 1.0), plain):
        assert torch.equal(got, want)


def test_ld_sums_keeps_gradient():
    token = hand_token_logps()
    token.logps.requires_grad_(True)
    chosen, rejected = ld_sums(token, 0.25)
    (chosen.sum() + rejected.sum()).backward()
    # d/dlogp: 1 on the shared tokens, 0.25 on the tail, 0 off the mask (pair 0 chosen tail = k 3)
    assert token.logps.grad[0].tolist() == [0.0, 1.0, 1.0, 0.25, 0.0]
    assert token.logps.grad[3].tolist() == [0.0, 1.0, 0.25, 0.25, 0.25]


def test_completion_lengths_count_unshifted_and_clamp():
    """Unshifted counts: a completion starting at position 0 counts that token; empty -> 1."""
    completion_mask = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]])
    chosen, rejected = completion_lengths(completion_mask)
    assert chosen.tolist() == [3, 1] and rejected.tolist() == [2, 2]


def test_no_completion_tokens_gives_zero_and_a_graph():
    batch = make_batch([(4, 0), (3, 0)], length=6, vocab=20)
    head = make_head("linear", hidden=8, vocab=20)
    hidden = torch.randn(2, 6, 8, requires_grad=True)
    out = score_hidden(hidden, head, batch.input_ids, batch.completion_mask, stats=True)
    assert not out.logps.any() and not out.stats.is_top1.any()
    out.logps.sum().backward()
    assert not hidden.grad.any()


def test_bad_shapes_are_refused():
    head = nn.Linear(4, 10)
    with pytest.raises(ValueError, match="completion_mask has shape"):
        score_hidden(torch.zeros(2, 5, 4), head, torch.zeros(2, 5).long(), torch.zeros(2, 6))
    with pytest.raises(ValueError, match="hidden_states must be"):
        score_hidden(torch.zeros(10, 4), head, torch.zeros(2, 5).long(), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="chunk_size"):
        score_hidden(
            torch.zeros(2, 5, 4), head, torch.zeros(2, 5).long(), torch.zeros(2, 5), chunk_size=0
        )
    with pytest.raises(ValueError, match="even first dimension"):
        split_pairs(torch.zeros(3))


def _trl_ld_logps(per_token_logps, shift_completion_mask, ld_alpha):
    """trl 1.16's LD-DPO sum, copied verbatim from dpo_trainer.py:1303-1315."""
    comp_pos = shift_completion_mask.cumsum(dim=1)
    comp_lens = shift_completion_mask.sum(dim=1).long()
    chosen_lens, rejected_lens = comp_lens.chunk(2, dim=0)
    shared_lens = torch.minimum(chosen_lens, rejected_lens)
    shared_lens = torch.cat([shared_lens, shared_lens], dim=0)
    shared_mask = (comp_pos > 0) & (comp_pos <= shared_lens.unsqueeze(1))
    tail_mask = comp_pos > shared_lens.unsqueeze(1)
    shared_logps = (per_token_logps * shared_mask).sum(dim=1)
    tail_logps = (per_token_logps * tail_mask).sum(dim=1)
    return (shared_logps + ld_alpha * tail_logps).chunk(2, dim=0)


def test_ld_sums_equals_trl_expression():
    batch = make_batch(SPANS, length=10, vocab=50)
    head = make_head("linear", hidden=12, vocab=50)
    hidden = torch.randn(6, 10, 12, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        token = score_hidden(hidden, head, batch.input_ids, batch.completion_mask)
    for alpha in (0.0, 0.3, 1.0):
        theirs = _trl_ld_logps(token.logps, batch.completion_mask[:, 1:], alpha)
        for got, want in zip(ld_sums(token, alpha), theirs):
            assert torch.equal(got, want)  # the same sums of the same float32 terms
