"""Length-grouped batches (``--group-by-length``): every row once per epoch, similar lengths."""

from __future__ import annotations

import random
import statistics
from types import SimpleNamespace

import pytest

from training.inputs.data_module import (
    GROUP_WINDOW_BATCHES,
    EpochSampler,
    PreferenceData,
    PreferenceDataModule,
    group_by_length,
    pair_length,
)

NUM_ROWS, BATCH = 300, 4
_rng = random.Random(0)
LENGTHS = [_rng.randint(10, 500) for _ in range(NUM_ROWS)]


def batches(order: list[int], size: int = BATCH) -> list[list[int]]:
    return [order[i : i + size] for i in range(0, len(order), size)]


def spread(order: list[int]) -> float:
    """Mean over batches of (longest - shortest) row length: the padding a batch carries."""
    return statistics.mean(
        max(LENGTHS[i] for i in b) - min(LENGTHS[i] for i in b) for b in batches(order)
    )


@pytest.mark.parametrize("shuffle", [False, True])
def test_every_row_once_per_epoch_and_batches_of_similar_length(shuffle):
    sampler = EpochSampler(NUM_ROWS, seed=3, shuffle=shuffle, lengths=LENGTHS, batch_size=BATCH)
    plain = EpochSampler(NUM_ROWS, seed=3, shuffle=shuffle)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        plain.set_epoch(epoch)
        order = list(sampler)
        assert sorted(order) == list(range(NUM_ROWS))
        # Random lengths in [10, 500]: a random batch of 4 spans ~290 tokens on average; sorted
        # windows of 50 batches leave ~10 (the window's range / 50 per batch).
        assert spread(order) < 0.1 * spread(list(plain))


def test_grouping_keeps_rows_within_their_window():
    """Rows move only inside their window of 50 batches, sorted longest first there."""
    order = list(range(NUM_ROWS))
    grouped = group_by_length(order, LENGTHS, BATCH)
    window = GROUP_WINDOW_BATCHES * BATCH
    for start in range(0, NUM_ROWS, window):
        part = grouped[start : start + window]
        assert sorted(part) == order[start : start + window]
        assert [LENGTHS[i] for i in part] == sorted((LENGTHS[i] for i in part), reverse=True)


def test_the_grouped_order_depends_on_seed_and_epoch_only():
    def order(seed, epoch):
        s = EpochSampler(NUM_ROWS, seed=seed, shuffle=True, lengths=LENGTHS, batch_size=BATCH)
        s.set_epoch(epoch)
        return list(s)

    assert order(1, 2) == order(1, 2)  # a resumed process rebuilds the same order
    assert order(1, 2) != order(1, 3)
    assert order(1, 2) != order(2, 2)


def test_processes_share_each_global_batch_of_similar_lengths():
    """With 2 processes, their k-th batches together are one global batch of 8 similar rows."""
    world = 2
    shards = []
    for rank in range(world):
        sampler = EpochSampler(
            NUM_ROWS, seed=0, shuffle=True, rank=rank, world_size=world,
            lengths=LENGTHS, batch_size=BATCH,
        )  # fmt: skip
        shards.append(batches(list(sampler)))
    merged = [a + b for a, b in zip(*shards, strict=True)]
    assert sorted(i for b in merged for i in b) == list(range(NUM_ROWS))
    assert spread([i for b in merged for i in b]) < 30


def test_wrong_number_of_lengths_is_refused():
    with pytest.raises(ValueError, match="lengths"):
        EpochSampler(5, seed=0, shuffle=False, lengths=[1, 2], batch_size=2)


def test_pair_length_counts_prompt_once_and_truncates_each_sequence():
    feature = {"prompt_ids": [1] * 10, "chosen_ids": [2] * 5, "rejected_ids": [3] * 30}
    assert pair_length(feature, None) == 10 + 5 + 30
    assert pair_length(feature, 20) == 10 + 5 + 10  # prompt + rejected cut to 20


def test_the_data_module_groups_only_when_asked():
    """``--group-by-length`` reaches the train loader; off keeps the file order."""
    features = [
        {"prompt_ids": [1] * n, "chosen_ids": [2], "rejected_ids": [3], "index": i}
        for i, n in enumerate(LENGTHS[:40])
    ]
    tokenizer = SimpleNamespace(pad_token_id=0)
    orders = {}
    for group in (False, True):
        cfg = SimpleNamespace(
            data=SimpleNamespace(
                max_length=None, truncation_mode="keep_start", shuffle=False, group_by_length=group
            ),
            trainer=SimpleNamespace(batch_size=BATCH, seed=0, num_workers=0, eval_batch_size=4),
        )
        module = PreferenceDataModule(PreferenceData(features, []), tokenizer, cfg)
        orders[group] = [i for b in module.train_dataloader() for i in b.index.tolist()]
    assert orders[False] == list(range(40))
    assert sorted(orders[True]) == list(range(40))
    lengths = [LENGTHS[i] for i in orders[True]]
    assert lengths == sorted(lengths, reverse=True)  # 40 rows fit one window
