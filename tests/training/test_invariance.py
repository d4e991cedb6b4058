"""Run-level invariants (as trl's ``tests/invariant``): settings that should give the same run
do, step by step, on loss, rewards/*, logps/* and grad_norm, and in the final weights.

- 8 pairs in one micro-batch == 1 pair x 8 accumulated micro-batches;
- 2 DDP processes x 2 pairs (gloo, CPU) == 1 process x 4 pairs;
- reference log-probs precomputed and cached == a live frozen-copy reference, and a second run
  reads the cache instead of recomputing it.
"""

from __future__ import annotations

import pytest

import dpo_core.reference
from tests.training.conftest import (
    assert_steps_close,
    assert_weights_close,
    base_args,
    fit,
    fit_subprocess,
    read_metrics,
)

# Three steps at a high learning rate: from step 1 on the policy has moved away from the
# reference, so rewards are non-zero and depend on every row and on the update.
STEPS = {"max_steps": 3, "learning_rate": 5e-3}


def test_gradient_accumulation_1x8_equals_8x1(tiny_assets, tmp_path):
    one = fit(base_args(tiny_assets, tmp_path / "8x1", batch_size=8, **STEPS))
    accumulated = fit(
        base_args(
            tiny_assets, tmp_path / "1x8", batch_size=1, gradient_accumulation_steps=8, **STEPS
        )
    )
    assert one.history[1]["rewards/margins"] != 0  # the comparison covers non-trivial rewards
    assert_steps_close(accumulated.history, one.history)
    # The CSV the user reads says the same as the module's own record.
    assert_steps_close(read_metrics(tmp_path / "1x8"), accumulated.history)
    assert_weights_close(accumulated.model_dir, one.model_dir, tiny_assets.model_dir)


@pytest.mark.slow
@pytest.mark.parametrize("precompute", [False, True], ids=["live-reference", "precomputed"])
def test_ddp_two_processes_equal_one_process(tiny_assets, tmp_path, precompute):
    """With a precomputed reference, both processes compute the cache and write it atomically
    under their own temporary names; the run must not notice."""
    options = dict(precompute_ref_log_probs=precompute, **STEPS)
    ddp_args = base_args(
        tiny_assets, tmp_path / "ddp", strategy="ddp", devices=2, batch_size=2, **options
    )
    child = fit_subprocess(ddp_args)
    assert child.returncode == 0, child.stderr[-3000:]
    single = fit(base_args(tiny_assets, tmp_path / "single", batch_size=4, **options))
    ddp = read_metrics(tmp_path / "ddp")
    assert ddp[1]["rewards/margins"] != 0
    # Both halves of every step's 4 rows were seen: the token count adds up exactly.
    assert [r["num_tokens"] for r in ddp] == [r["num_tokens"] for r in single.history]
    assert_steps_close(ddp, single.history)
    assert_weights_close(tmp_path / "ddp" / "model", single.model_dir, tiny_assets.model_dir)
    caches = sorted(p.name for p in (tmp_path / "ddp").glob("reference_logps/*"))
    assert len(caches) == precompute and not any(n.endswith(".tmp") for n in caches)


def test_precomputed_reference_equals_live_and_is_reused(tiny_assets, tmp_path, monkeypatch):
    live = fit(base_args(tiny_assets, tmp_path / "live", precompute_ref_log_probs=False, **STEPS))
    cached_dir = tmp_path / "cached"
    first = fit(base_args(tiny_assets, cached_dir, precompute_ref_log_probs=True, **STEPS))
    assert first.history[1]["rewards/margins"] != 0
    assert_steps_close(first.history, live.history)

    (cache_file,) = (cached_dir / "reference_logps").glob("train-*.pt")
    written = cache_file.stat().st_mtime_ns

    def no_recompute(*args, **kwargs):
        raise AssertionError("the reference log-probs were recomputed, not read from the cache")

    monkeypatch.setattr(dpo_core.reference, "precompute_reference_logps", no_recompute)
    # a second run into the same directory replaces the first; the cache stays
    second = fit(
        base_args(
            tiny_assets,
            cached_dir,
            precompute_ref_log_probs=True,
            overwrite_output_dir=True,
            **STEPS,
        )
    )
    assert cache_file.stat().st_mtime_ns == written
    assert list((cached_dir / "reference_logps").glob("train-*.pt")) == [cache_file]
    # Same cached values, same rows, same seed: the same run, bit for bit.
    assert second.history == first.history
