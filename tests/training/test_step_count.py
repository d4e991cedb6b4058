"""training.base.step_count: trl's step count, and a metrics file in Lightning's told apart."""

from __future__ import annotations

from training.base.step_count import counts_from_zero, renumbered_from_one, step_of, trl_step


def test_trl_step_numbers_the_step_just_completed():
    # Lightning logs the k-th optimizer step (and the held-out pass after it) at k - 1
    assert [trl_step(s) for s in (None, 0, 1, 7)] == [1, 1, 2, 8]


def test_a_file_in_lightnings_count_is_told_apart_and_renumbered():
    old = [
        {"step": "0", "loss": "0.7", "eval_loss": ""},
        {"step": "1", "loss": "0.6", "eval_loss": ""},
        {"step": "1", "loss": "", "eval_loss": "0.65"},  # the held-out pass after the 2nd step
    ]
    assert counts_from_zero(old)
    new = renumbered_from_one(old)
    assert [(r["step"], r["loss"], r["eval_loss"]) for r in new] == [
        ("1", "0.7", ""),
        ("2", "0.6", ""),
        ("2", "", "0.65"),
    ]
    assert not counts_from_zero(new)  # renumbering twice is impossible: a second look leaves it


def test_rows_read_as_numbers_stay_numbers():
    new = renumbered_from_one([{"step": 0.0, "loss": 0.7}, {"step": 1.0, "eval_loss": 0.6}])
    assert new == [{"step": 1, "loss": 0.7}, {"step": 2, "eval_loss": 0.6}]
    assert [step_of(r) for r in ({"step": "3.0"}, {"step": 3.0}, {"step": "3"})] == [3, 3, 3]
