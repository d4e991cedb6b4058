"""The training data order: epoch-seeded, shardable over processes, resumable mid-epoch."""

from __future__ import annotations

import pytest

from training.inputs.data_module import EpochSampler, ResumableDataLoader


def test_unshuffled_order_is_the_file_order():
    assert list(EpochSampler(5, seed=0, shuffle=False)) == [0, 1, 2, 3, 4]


def test_shuffled_order_depends_on_seed_and_epoch_only():
    ran = EpochSampler(10, seed=7, shuffle=True)
    orders = []
    for epoch in range(3):
        ran.set_epoch(epoch)
        orders.append(list(ran))
    assert all(sorted(order) == list(range(10)) for order in orders)
    assert orders[0] != orders[1] != orders[2]
    fresh = EpochSampler(10, seed=7, shuffle=True)  # as a resumed process builds it
    fresh.set_epoch(2)
    assert list(fresh) == orders[2]
    other_seed = EpochSampler(10, seed=8, shuffle=True)
    other_seed.set_epoch(2)
    assert list(other_seed) != orders[2]


@pytest.mark.parametrize("shuffle", [False, True])
def test_processes_batches_together_are_one_process_batch(shuffle):
    num_rows, batch, world = 11, 2, 3  # 11 rows do not split evenly: the order is padded
    single = EpochSampler(num_rows, seed=1, shuffle=shuffle)
    single.set_epoch(4)
    order = list(single)
    shards = []
    for rank in range(world):
        sampler = EpochSampler(num_rows, seed=1, shuffle=shuffle, rank=rank, world_size=world)
        sampler.set_epoch(4)
        shards.append(list(sampler))
    assert {len(s) for s in shards} == {len(shards[0])} == {4}  # ceil(11 / 3) each
    padded = order + order[: 4 * world - num_rows]
    for k in range(2):  # batch k of every process = rows k*6 .. k*6+5 of the one order
        together = sorted(i for s in shards for i in s[k * batch : (k + 1) * batch])
        assert together == sorted(padded[k * batch * world : (k + 1) * batch * world])


def loader(num_rows: int = 10, batch_size: int = 3) -> ResumableDataLoader:
    sampler = EpochSampler(num_rows, seed=0, shuffle=True)
    sampler.set_epoch(1)
    return ResumableDataLoader(list(range(num_rows)), batch_size=batch_size, sampler=sampler)


def test_a_loaded_state_continues_where_the_epoch_stopped():
    whole = [b.tolist() for b in loader()]
    interrupted = loader()
    batches = iter(interrupted)
    seen = [next(batches).tolist() for _ in range(2)]
    state = interrupted.state_dict()
    assert state == {"batches_served": 2}

    resumed = loader()
    resumed.load_state_dict(state)
    rest = [b.tolist() for b in resumed]
    assert seen + rest == whole
    assert [b.tolist() for b in resumed] == whole  # the next epoch starts from its beginning


def test_the_state_after_a_whole_epoch_starts_the_next_one():
    finished = loader()
    assert len(list(finished)) == len(finished) == 4
    assert finished.state_dict() == {"batches_served": 0}
