"""dpo_core.pair_layout: where each pair's segment goes, and what the packed rows hold."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dpo_core.collate import PreferenceCollator
from dpo_core.pair_layout import (
    choose_layout,
    first_fit_decreasing,
    layout_cost,
    one_pair_per_row,
    pack_pairs,
)


def collate(spans, seed: int = 0):
    """Pairs with (P, C, R) lengths and distinct random ids, collated as training does."""
    g = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(1, 1000, (n,), generator=g).tolist()

    features = [
        {"prompt_ids": ids(p), "chosen_ids": ids(c), "rejected_ids": ids(r)} for p, c, r in spans
    ]
    return PreferenceCollator(pad_token_id=0)(features)


def test_first_fit_decreasing_example():
    layout = first_fit_decreasing([3, 5, 2, 4], capacity=7)
    assert layout.rows == (1, 0, 0, 1) and layout.offsets == (4, 0, 5, 0)
    assert (layout.num_rows, layout.row_length) == (2, 7)


def test_a_segment_longer_than_the_rows_is_refused():
    with pytest.raises(ValueError, match="does not fit"):
        first_fit_decreasing([3, 9], capacity=8)


def test_two_pairs_in_one_row_hand_worked():
    """Pair 0: prompt [1, 2], chosen [3], rejected [4, 5] (5 tokens); pair 1: prompt [6],
    chosen [7, 8], rejected [9] (4 tokens). In one row of 9: segments end to end, positions
    restarting, each segment blind to the other."""
    features = [
        {"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4, 5]},
        {"prompt_ids": [6], "chosen_ids": [7, 8], "rejected_ids": [9]},
    ]
    batch = PreferenceCollator(pad_token_id=0)(features)
    packed = pack_pairs(batch, first_fit_decreasing([5, 4], capacity=9))
    assert packed.input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 2, 3, 0, 1, 2, 1]]
    allowed = packed.allowed[0, 0].int()
    assert allowed[3].tolist() == [1, 1, 0, 1, 0, 0, 0, 0, 0]  # rejected 4: prompt + itself
    assert allowed[5].tolist() == [0, 0, 0, 0, 0, 1, 0, 0, 0]  # pair 1's prompt: itself only
    assert allowed[8].tolist() == [0, 0, 0, 0, 0, 1, 0, 0, 1]  # rejected 9: its prompt, itself
    # chosen 3 from 1; chosen 7, 8 from 5, 6; rejected 4 from 1, 5 from 3; rejected 9 from 5.
    assert packed.targets.tolist() == [3, 7, 8, 4, 5, 9]
    assert packed.hidden_index.tolist() == [1, 5, 6, 1, 3, 5]


spans_strategy = st.lists(
    st.tuples(st.integers(0, 6), st.integers(0, 6), st.integers(0, 6)).filter(
        lambda s: s[1] + s[2] > 0  # a pair with no completion token at all is not a pair
    ),
    min_size=1,
    max_size=6,
)


@settings(max_examples=60, deadline=None)
@given(spans=spans_strategy, extra=st.integers(0, 12), seed=st.integers(0, 3))
def test_packed_rows_hold_each_token_once_and_predict_from_its_plain_state(spans, extra, seed):
    """For any pairs and any capacity: rows within capacity, every real token exactly once,
    no padding state scored, each scored state at the position and with the token it has in
    its plain row, and attention only within a segment."""
    batch = collate(spans, seed)
    lengths = [p + c + r for p, c, r in spans]
    layout = first_fit_decreasing(lengths, max(lengths) + extra)
    assert layout.row_length <= max(lengths) + extra
    packed = pack_pairs(batch, layout)
    real = packed.input_ids != 0  # ids are drawn from 1..999; 0 is padding
    assert int(real.sum()) == sum(lengths)
    flat_ids, flat_pos = packed.input_ids.flatten(), packed.position_ids.flatten()
    plain_rows, t = packed.mask.nonzero(as_tuple=True)  # the plain grid's scored (row, t)
    assert torch.equal(flat_pos[packed.hidden_index], t)
    assert torch.equal(flat_ids[packed.hidden_index], batch.input_ids[plain_rows, t])
    assert bool(real.flatten()[packed.hidden_index].all())
    segment = torch.full(packed.input_ids.shape, -1)
    for i, (row, offset, n) in enumerate(zip(layout.rows, layout.offsets, lengths, strict=True)):
        segment[row, offset : offset + n] = i
    same = segment.unsqueeze(-1) == segment.unsqueeze(-2)
    assert not bool((packed.allowed[:, 0] & ~same).any())


def test_padding_free_layout_costs_less_than_one_padded_pair_per_row():
    """Rows no longer than the longest pair, each forwarded at its fill: the same real
    positions as one pair per row, no padding, and no row's attention larger."""
    lengths = [100, 60, 40, 30, 20, 10]
    alone = one_pair_per_row(lengths)
    packed = choose_layout(lengths)
    assert packed.separate_rows and packed.fills == (100, 100, 60)
    assert sum(packed.fills) == sum(lengths)
    assert layout_cost(packed, 256) < layout_cost(alone, 256)
    assert choose_layout(lengths, padding_free=False) == alone and not alone.separate_rows
