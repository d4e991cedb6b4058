"""Evaluation metrics on three-pair tensors whose values are worked out by hand."""

from __future__ import annotations

import pytest
import torch

from dpo_core.evaluation import (
    implicit_reward,
    likelihood_displacement,
    preference_summary,
    sequence_kl,
    sequence_kl_stderr,
    win_scores,
)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def test_win_scores_count_ties_as_half():
    assert win_scores(t(1, 2, 3), t(0, 2, 4)).tolist() == [1.0, 0.5, 0.0]


def test_implicit_reward_is_beta_times_the_log_ratio():
    # 0.5 * (-10 - -12) = 1.0; 0.5 * (-8 - -6) = -1.0
    assert implicit_reward(t(-10, -8), t(-12, -6), 0.5).tolist() == [1.0, -1.0]


def test_summary_before_training_is_all_ties():
    """Policy = reference: every reward is 0, so accuracy is exactly 1/2 and margin 0, while the
    policy's own log-probs still say something (it prefers chosen in 2 of 3 pairs)."""
    pi_c, pi_r = t(-10, -20, -30), t(-12, -15, -35)
    s = preference_summary(pi_c, pi_r, pi_c.clone(), pi_r.clone(), beta=0.1)
    assert s.preference_accuracy == 0.5
    assert s.reward_margin == s.reward_chosen == s.reward_rejected == 0.0
    assert s.logp_accuracy == pytest.approx(2 / 3)
    assert s.logps_chosen == pytest.approx(-20.0)
    assert s.logps_rejected == pytest.approx(-62 / 3)


def test_summary_after_training_by_hand():
    """beta 0.5. Log-ratios chosen (+2, 0, -1), rejected (-2, 0, +1):
    rewards chosen (1, 0, -0.5), rejected (-1, 0, 0.5) -> wins 1, 1/2, 0 -> accuracy 0.5;
    margins 2, 0, -1 -> mean 1/3."""
    ref_c, ref_r = t(-10, -10, -10), t(-10, -10, -10)
    pi_c, pi_r = t(-8, -10, -11), t(-12, -10, -9)
    s = preference_summary(pi_c, pi_r, ref_c, ref_r, beta=0.5)
    assert s.preference_accuracy == 0.5
    assert s.reward_margin == pytest.approx(1 / 3)
    assert s.reward_chosen == pytest.approx(1 / 6)
    assert s.reward_rejected == pytest.approx(-1 / 6)
    assert s.logp_accuracy == 0.5  # -8 > -12, tie, -11 < -9


def test_summary_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="ref_rejected_logps"):
        preference_summary(t(1, 2), t(1, 2), t(1, 2), t(1), beta=0.1)
    with pytest.raises(ValueError, match="no pairs"):
        preference_summary(t(), t(), t(), t(), beta=0.1)


def test_sequence_kl_is_the_mean_log_ratio_and_zero_for_the_same_model():
    assert sequence_kl(t(-5, -7), t(-6, -9)) == pytest.approx(1.5)
    assert sequence_kl(t(-5.25, -7.5), t(-5.25, -7.5)) == 0.0


def test_sequence_kl_stderr_is_the_sample_deviation_over_root_n():
    """Log-ratios 1 and 2: mean 1.5, deviations ±0.5, sample variance (0.25 + 0.25) / 1 = 0.5,
    standard error sqrt(0.5) / sqrt(2) = 0.5. Log-ratios 0, 0, 3: mean 1, sample variance
    (1 + 1 + 4) / 2 = 3, standard error sqrt(3 / 3) = 1. (Exact in float64.)"""
    assert sequence_kl_stderr(t(-5, -7), t(-6, -9)) == pytest.approx(0.5, rel=1e-12)
    assert sequence_kl_stderr(t(-1, -2, 0), t(-1, -2, -3)) == pytest.approx(1.0, rel=1e-12)
    assert sequence_kl_stderr(t(-5.25, -7.5), t(-5.25, -7.5)) == 0.0  # the same model
    assert sequence_kl_stderr(t(-5), t(-6)) is None  # one sample: no spread to measure


def test_likelihood_displacement_needs_both_log_probs_to_fall():
    zero = t(0, 0, 0)
    before = preference_summary(t(-10, -10, -10), t(-12, -12, -12), zero, zero, 0.1)
    both_down = preference_summary(t(-11, -11, -11), t(-20, -20, -20), zero, zero, 0.1)
    chosen_up = preference_summary(t(-9, -9, -9), t(-20, -20, -20), zero, zero, 0.1)
    assert likelihood_displacement(before, both_down)
    assert not likelihood_displacement(before, chosen_up)
