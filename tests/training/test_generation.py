"""The batches that generation and scoring build (token ids in, token ids out)."""

from __future__ import annotations

from training.eval.before_after import distinct_prompts
from training.eval.sampling import cut_at_eos, left_pad
from training.eval.scoring import completion_batch


def test_left_pad_right_aligns_prompts():
    ids, mask = left_pad([[1, 5], [1]], pad_id=0)
    assert ids.tolist() == [[1, 5], [0, 1]]
    assert mask.tolist() == [[1, 1], [0, 1]]


def test_cut_at_eos_keeps_the_eos_and_drops_what_follows():
    assert cut_at_eos([7, 8, 2, 0, 0], eos_id=2) == [7, 8, 2]
    assert cut_at_eos([7, 8, 9], eos_id=2) == [7, 8, 9]  # ran out of tokens: kept whole


def test_completion_batch_masks_the_completion_only():
    batch = completion_batch([[1, 5], [1]], [[7, 2], [8, 9, 2]], pad_id=0)
    assert batch.input_ids.tolist() == [[1, 5, 7, 2], [1, 8, 9, 2]]
    assert batch.completion_mask.tolist() == [[0, 0, 1, 1], [0, 1, 1, 1]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1]]


def test_distinct_prompts_takes_the_first_row_of_each_prompt():
    features = [{"prompt_ids": p} for p in ([1], [2], [1], [3], [2], [4])]
    assert distinct_prompts(features, 3) == [0, 1, 3]
    assert distinct_prompts(features, 10) == [0, 1, 3, 5]
