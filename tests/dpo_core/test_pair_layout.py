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


def test_padding_free_layout_costs_no_more_than_one_padded_pair_per_row():
    """First fit decreasing at the longest pair's length is a candidate: no more rows than one
    pair per row, none wider, so the chosen layout never costs more."""
    lengths = [100, 60, 40, 30, 20, 10]
    alone = one_pair_per_row(lengths)
    at_longest = first_fit_decreasing(lengths, max(lengths))
    assert at_longest.fills == (100, 100, 60)
    assert layout_cost(at_longest, 256) < layout_cost(alone, 256)
    # 3 rows of 100: 3 * (1536 * 100 + 100²) = 490,800; 2 rows of 130 (100 + 30, 60 + 40 + 20
    # + 10): 2 * (1536 * 130 + 130²) = 433,160, less padding for a little more attention.
    packed = choose_layout(lengths, hidden_size=256)
    assert packed.fills == (130, 130) and layout_cost(packed, 256) == 433_160
    assert choose_layout(lengths, 256, padding_free=False) == alone


def test_choose_layout_hand_worked():
    """Lengths [6, 5, 3, 2] (total 16), h = 4, in units of ``layout_cost``: one row of 16 costs
    24 * 16 + 16² = 640; capacity 8, rows 6 + 2 and 5 + 3, 2 * (24 * 8 + 8²) = 512; capacity 6,
    rows 6, 5, 3 + 2, 3 * (24 * 6 + 6²) = 540. Two rows of 8. Lengths [6, 5, 3]: three rows
    of 6 (4 padding positions) cost 3 * (6h * 6 + 36), one row of 14 costs 6h * 14 + 196: the
    rows at h = 2 (324 < 364), the one row at h = 64 (7,020 > 5,572), where padding costs more
    than attention."""
    layout = choose_layout([6, 5, 3, 2], hidden_size=4)
    assert layout.rows == (0, 1, 1, 0) and layout.offsets == (0, 0, 5, 6)
    assert layout.fills == (8, 8) and layout_cost(layout, 4) == 512
    assert layout_cost(first_fit_decreasing([6, 5, 3, 2], 16), 4) == 640
    assert layout_cost(first_fit_decreasing([6, 5, 3, 2], 6), 4) == 540
    assert choose_layout([6, 5, 3], hidden_size=2).fills == (6, 5, 3)
    assert choose_layout([6, 5, 3], hidden_size=64).fills == (14,)


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 300), min_size=1, max_size=12), hidden=st.integers(1, 1024))
def test_chosen_layout_is_the_cheapest_candidate(lengths, hidden):
    """Every segment placed once, within its row; and the chosen layout costs no more than each
    capacity ``max(longest, ceil(total / k))`` (one row of all, ..., the longest segment)."""
    layout = choose_layout(lengths, hidden)
    assert sum(layout.fills) == sum(lengths)
    for i, n in enumerate(lengths):
        assert layout.offsets[i] + n <= layout.fills[layout.rows[i]]
    cost = layout_cost(layout, hidden)
    for k in range(1, len(lengths) + 1):
        capacity = max(max(lengths), -(-sum(lengths) // k))
        assert cost <= layout_cost(first_fit_decreasing(lengths, capacity), hidden)
    assert cost <= layout_cost(one_pair_per_row(lengths), hidden)
