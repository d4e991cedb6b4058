"""Tests for dpo_core.collate: truncation, padding, masks, pass-through columns, and trl's collator."""

from __future__ import annotations

import doctest

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dpo_core.collate
from dpo_core.batch import PreferenceBatch
from dpo_core.collate import PreferenceCollator, check_truncation_mode, pad_right, truncate

PAIRS = [
    {"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6]},
    {"prompt_ids": [7, 8], "chosen_ids": [9], "rejected_ids": [10, 11]},
]


def test_docstring_example():
    """The worked example in PreferenceCollator's docstring runs and gives what it shows."""
    result = doctest.testmod(dpo_core.collate)
    assert result.attempted >= 4 and result.failed == 0


def test_no_truncation_matches_trls_docstring_example():
    """trl's own DataCollatorForPreference example (dpo:108-123), pad id 0, no max_length."""
    batch = PreferenceCollator(pad_token_id=0)(PAIRS)
    assert isinstance(batch, PreferenceBatch) and batch.num_pairs == 2
    assert batch.input_ids.tolist() == [
        [1, 2, 3, 4, 5],
        [7, 8, 9, 0, 0],
        [1, 2, 3, 6, 0],
        [7, 8, 10, 11, 0],
    ]
    assert batch.attention_mask.tolist() == [
        [1, 1, 1, 1, 1],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 1, 1, 0],
    ]
    assert batch.completion_mask.tolist() == [
        [0, 0, 0, 1, 1],
        [0, 0, 1, 0, 0],
        [0, 0, 0, 1, 0],
        [0, 0, 1, 1, 0],
    ]
    assert (
        batch.input_ids.dtype
        == batch.attention_mask.dtype
        == batch.completion_mask.dtype
        == torch.long
    )
    assert (
        batch.index is None and batch.ref_chosen_logps is None and batch.ref_rejected_logps is None
    )


def test_keep_end_can_leave_a_completion_only_row():
    """max_length 2, keep_end: each sequence keeps its last 2 tokens. Chosen 0 [1,2,3,4,5] -> [4,5]
    (prompt gone, all completion); rejected 0 [1,2,3,6] -> [3,6]."""
    batch = PreferenceCollator(pad_token_id=0, max_length=2, truncation_mode="keep_end")(PAIRS)
    assert batch.input_ids.tolist() == [[4, 5], [8, 9], [3, 6], [10, 11]]
    assert batch.completion_mask.tolist() == [[1, 1], [0, 1], [0, 1], [1, 1]]
    assert batch.attention_mask.tolist() == [[1, 1]] * 4


def test_pad_to_multiple_of_and_pad_id():
    """Longest sequence 5 -> padded to 8 with pad id 99; masks padded with 0."""
    batch = PreferenceCollator(pad_token_id=99, pad_to_multiple_of=4)(PAIRS)
    assert batch.input_ids.shape == (4, 8)
    assert batch.input_ids[1].tolist() == [7, 8, 9, 99, 99, 99, 99, 99]
    assert batch.attention_mask.sum(1).tolist() == [5, 3, 4, 4]
    assert batch.completion_mask[:, 5:].sum() == 0


def test_index_and_reference_logps_pass_through():
    features = [
        {**PAIRS[0], "index": 12, "ref_chosen_logps": -1.25, "ref_rejected_logps": -2.5},
        {**PAIRS[1], "index": 4, "ref_chosen_logps": -3.0, "ref_rejected_logps": -0.1},
    ]
    batch = PreferenceCollator(pad_token_id=0)(features)
    assert batch.index.tolist() == [12, 4] and batch.index.dtype == torch.long
    assert batch.ref_chosen_logps.dtype == batch.ref_rejected_logps.dtype == torch.float32
    assert batch.ref_chosen_logps.tolist() == [-1.25, -3.0]
    assert torch.equal(batch.ref_rejected_logps, torch.tensor([-2.5, -0.1], dtype=torch.float32))


def test_truncate_and_pad_right_helpers():
    assert truncate([1, 2, 3], [0, 1, 1], 2, "keep_start") == ([1, 2], [0, 1])
    assert truncate([1, 2, 3], [0, 1, 1], 2, "keep_end") == ([2, 3], [1, 1])
    assert truncate([1, 2, 3], [0, 1, 1], None, "keep_end") == ([1, 2, 3], [0, 1, 1])
    assert pad_right([[1], [2, 3, 4]], -1, multiple=2).tolist() == [[1, -1, -1, -1], [2, 3, 4, -1]]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"truncation_mode": "keep_middle"}, "truncation_mode"),
        ({"max_length": 0}, "max_length"),
        ({"pad_to_multiple_of": 0}, "pad_to_multiple_of"),
    ],
)
def test_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PreferenceCollator(pad_token_id=0, **kwargs)


def test_check_truncation_mode_names_the_setting():
    check_truncation_mode("keep_end")
    with pytest.raises(ValueError, match=r"^--truncation-mode must be one of keep_start, keep_end"):
        check_truncation_mode("keep_middle", "--truncation-mode")


@pytest.mark.parametrize(
    ("features", "match"),
    [
        ([], "empty list"),
        ([PAIRS[0], {"prompt_ids": [1], "chosen_ids": [2]}], "feature 1 has no 'rejected_ids'"),
        ([{**PAIRS[0], "index": 0}, PAIRS[1]], "feature 1 has no 'index' but feature 0 has"),
        ([PAIRS[0], {**PAIRS[1], "ref_chosen_logps": -1.0}], "feature 0 has no 'ref_chosen_logps'"),
    ],
)
def test_bad_features(features, match):
    with pytest.raises(ValueError, match=match):
        PreferenceCollator(pad_token_id=0)(features)


# --- against trl's DataCollatorForPreference on random features ---------------------------------

id_lists = st.lists(st.integers(1, 50), min_size=0, max_size=6)
features_st = st.lists(
    st.fixed_dictionaries(
        {
            "prompt_ids": id_lists,
            "chosen_ids": id_lists.filter(bool),
            "rejected_ids": id_lists.filter(bool),
            "ref_chosen_logps": st.floats(-100, 0, width=32),
            "ref_rejected_logps": st.floats(-100, 0, width=32),
        }
    ),
    min_size=1,
    max_size=4,
)


@settings(max_examples=150, deadline=None)
@given(
    features=features_st,
    max_length=st.one_of(st.none(), st.integers(1, 10)),
    mode=st.sampled_from(["keep_start", "keep_end"]),
    multiple=st.one_of(st.none(), st.integers(1, 4)),
)
def test_matches_trl_collator(features, max_length, mode, multiple):
    """Exactly trl's tensors (values and dtypes) for any features, limits and modes."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    theirs = DataCollatorForPreference(
        pad_token_id=0, max_length=max_length, truncation_mode=mode, pad_to_multiple_of=multiple
    )(features)
    ours = PreferenceCollator(
        pad_token_id=0, max_length=max_length, truncation_mode=mode, pad_to_multiple_of=multiple
    )(features)
    for key in (
        "input_ids",
        "attention_mask",
        "completion_mask",
        "ref_chosen_logps",
        "ref_rejected_logps",
    ):
        got, want = getattr(ours, key), theirs[key]
        assert got.dtype == want.dtype and torch.equal(got, want), key
