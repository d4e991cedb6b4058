"""Hand-worked values for every loss type, the f-DPO map, WPO weights, the weighted combination
and every error path of ``dpo_core.losses``.

Most tests share one batch of three pairs (``PAIRS``), chosen so the numbers are round::

    policy chosen   pi_c = [-4, -6, -8]     reference chosen   ref_c = [-5, -5, -8]
    policy rejected pi_r = [-9, -3, -8]     reference rejected ref_r = [-5, -5, -8]
    lr_c = pi_c - ref_c = [1, -1, 0]        lr_r = pi_r - ref_r = [-4, 2, 0]
    D = lr_c - lr_r = [5, -3, 0]            beta = 0.2, so beta*D = [1, -0.6, 0]
    beta*lr_c = [0.2, -0.2, 0]              beta*lr_r = [-0.8, 0.4, 0]

Write ``sp(x) = log(1 + e^x)`` (softplus), so ``-logsigma(x) = sp(-x)`` and
``sigma(x) = 1 / (1 + e^-x)``. Expected values are evaluated with ``math`` in float64.
The comparison against trl's own ``_compute_loss`` is in ``test_losses_trl.py``.
"""

from __future__ import annotations

import math

import pytest
import torch

from dpo_core.divergences import f_divergence_scores
from dpo_core.logp_types import SequenceLogps, TokenLogps
from dpo_core.losses import (
    combined_dpo_loss,
    dpo_loss,
    trl_defines,
    wpo_weights,
)
from dpo_core.settings import LossSettings

BETA = 0.2
LOG2 = math.log(2)
# float32 inputs, a handful of float32 operations: each rounds by <= 6e-8 relative, so 1e-6
# relative (plus 1e-6 absolute near 0) bounds the accumulated rounding with a wide margin
# while still catching any wrong term (the smallest term tested is ~1e-2).
TOL = {"rtol": 1e-6, "atol": 1e-6}


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def sp(x: float) -> float:
    return math.log1p(math.exp(x))


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def sides(pairs: tuple[torch.Tensor, ...], **policy_extra) -> tuple[SequenceLogps, SequenceLogps]:
    """``(pi_c, pi_r, ref_c, ref_r)`` as (policy, reference); ``policy_extra`` are the policy's
    optional fields (``chosen_lengths``, ``rejected_lengths``, ``token``)."""
    pi_c, pi_r, ref_c, ref_r = pairs
    return SequenceLogps(pi_c, pi_r, **policy_extra), SequenceLogps(ref_c, ref_r)


def chosen_tokens(logps: torch.Tensor, mask: torch.Tensor) -> TokenLogps:
    """Per-token values over all 2B rows from the chosen half (B, T); the rejected half is zeros."""
    return TokenLogps(
        logps=torch.cat([logps, torch.zeros_like(logps)]),
        mask=torch.cat([mask, torch.zeros_like(mask)]).bool(),
    )


PAIRS = (t(-4, -6, -8), t(-9, -3, -8), t(-5, -5, -8), t(-5, -5, -8))
Z = (1.0, -0.6, 0.0)  # beta * D
ZC = (0.2, -0.2, 0.0)  # beta * lr_c
ZR = (-0.8, 0.4, 0.0)  # beta * lr_r
# Lengths for ipo / sigmoid_norm: lr_c/n_c = [0.5, -1, 0], lr_r/n_r = [-1, 1, 0], so the
# length-normalised margin is [1.5, -2, 0] (the third pair's 0 length is clamped to 1).
LENGTHS = {"chosen_lengths": torch.tensor([2, 1, 0]), "rejected_lengths": torch.tensor([4, 2, 1])}
NORM_MARGIN = (1.5, -2.0, 0.0)


def settings(loss_type: str = "sigmoid", beta: float = BETA, **kwargs) -> LossSettings:
    """One loss type at ``beta`` (the shared batch's 0.2), other fields as given."""
    return LossSettings(beta=beta, loss_type=[loss_type], **kwargs)


def losses_of(
    loss_type: str, pairs=PAIRS, beta: float = BETA, inputs: dict | None = None, **kwargs
) -> torch.Tensor:
    """Per-pair losses of ``loss_type``; ``inputs`` are the policy's optional fields (lengths,
    per-token values)."""
    losses, _, _ = dpo_loss(*sides(pairs, **(inputs or {})), settings(loss_type, beta, **kwargs))
    return losses


def check(actual: torch.Tensor, expected: float | list[float]) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float32), **TOL)


# --- the fifteen loss types ------------------------------------------------------------------


def test_sigmoid():
    """-logsigma(beta D) = sp(-beta D) = [sp(-1), sp(0.6), log 2] = [0.3133, 1.0375, 0.6931]."""
    check(losses_of("sigmoid"), [sp(-z) for z in Z])


def test_sigmoid_cdpo_label_smoothing():
    """eps = 0.25: 0.75 sp(-z) + 0.25 sp(z); at z = 0 both terms are log 2, so the sum is log 2."""
    expected = [0.75 * sp(-z) + 0.25 * sp(z) for z in Z]
    check(losses_of("sigmoid", label_smoothing=0.25), expected)
    assert expected[2] == pytest.approx(LOG2)


def test_hinge():
    """relu(1 - beta D) = relu([0, 1.6, 1]) = [0, 1.6, 1]."""
    check(losses_of("hinge"), [0.0, 1.6, 1.0])


def test_ipo():
    """1/(2 beta) = 2.5; (margin/len - 2.5)^2 = [(1.5-2.5)^2, (-2-2.5)^2, (0-2.5)^2] = [1, 20.25, 6.25]."""
    check(losses_of("ipo", inputs=LENGTHS), [1.0, 20.25, 6.25])


def test_exo_pair():
    """eps = 0.1: sigma(z)(logsigma(z) - log 0.9) + sigma(-z)(logsigma(-z) - log 0.1)."""
    expected = [sig(z) * (-sp(-z) - math.log(0.9)) + sig(-z) * (-sp(z) - math.log(0.1)) for z in Z]
    check(losses_of("exo_pair", label_smoothing=0.1), expected)


def test_nca_pair():
    """sp(-a) + sp(a)/2 + sp(b)/2 with a = beta lr_c, b = beta lr_r; third pair: 2 log 2."""
    expected = [sp(-a) + 0.5 * sp(a) + 0.5 * sp(b) for a, b in zip(ZC, ZR)]
    check(losses_of("nca_pair"), expected)
    assert expected[2] == pytest.approx(2 * LOG2)


def test_robust():
    """eps = 0.1: (0.9 sp(-z) - 0.1 sp(z)) / 0.8; at z = 0: 0.8 log 2 / 0.8 = log 2."""
    check(losses_of("robust", label_smoothing=0.1), [(0.9 * sp(-z) - 0.1 * sp(z)) / 0.8 for z in Z])


def test_bco_pair():
    """sp(-a) + sp(b): [sp(-0.2) + sp(-0.8), sp(0.2) + sp(0.4), 2 log 2]."""
    check(losses_of("bco_pair"), [sp(-a) + sp(b) for a, b in zip(ZC, ZR)])


def test_sppo_hard():
    """0.5/beta = 2.5: (lr_c - 2.5)^2 + (lr_r + 2.5)^2 = [2.25+2.25, 12.25+20.25, 6.25+6.25]."""
    check(losses_of("sppo_hard"), [4.5, 32.5, 12.5])


def test_aot_sorts_policy_and_reference_margins():
    """beta = 0.5, eps = 0.1. Policy margins pi_c - pi_r = [5, -3, 0] sort to [-3, 0, 5];
    reference margins ref_c - ref_r = [1, 3, -2] sort to [-2, 1, 3]; d = [-1, -1, 2],
    beta d = [-0.5, -0.5, 1]; loss 0.9 sp(-x) + 0.1 sp(x). (Unsorted, d would be [4, -6, 2].)"""
    pairs = (t(-4, -6, -8), t(-9, -3, -8), t(-4, -2, -10), t(-5, -5, -8))
    expected = [0.9 * sp(-x) + 0.1 * sp(x) for x in (-0.5, -0.5, 1.0)]
    check(losses_of("aot", pairs, beta=0.5, label_smoothing=0.1), expected)


def test_aot_unpaired_sorts_each_side():
    """lr_c = [1, -1, 0] sorts to [-1, 0, 1]; lr_r = [-4, 2, 0] to [-4, 0, 2]; d = [3, 0, -1],
    beta d = [0.6, 0, -0.2]; eps = 0 leaves sp(-x)."""
    check(losses_of("aot_unpaired"), [sp(-x) for x in (0.6, 0.0, -0.2)])


def test_apo_zero():
    """(1 - sigma(a)) + sigma(b): third pair 1 - 0.5 + 0.5 = 1."""
    check(losses_of("apo_zero"), [1 - sig(a) + sig(b) for a, b in zip(ZC, ZR)])


def test_apo_down():
    """sigma(a) + 1 - sigma(beta (lr_c - lr_r)) = sigma(a) + 1 - sigma(z): third pair 1."""
    check(losses_of("apo_down"), [sig(a) + 1 - sig(z) for a, z in zip(ZC, Z)])


def test_discopop():
    """tau = 0.05: m = sigma(z / tau) = sigma([20, -12, 0]); (1 - m) sp(-z) + m e^-z.
    Third pair: 0.5 log 2 + 0.5 = 0.8466."""
    expected = [(1 - sig(z / 0.05)) * sp(-z) + sig(z / 0.05) * math.exp(-z) for z in Z]
    check(losses_of("discopop"), expected)
    assert expected[2] == pytest.approx(0.5 * LOG2 + 0.5)


def test_discopop_is_nan_where_exp_overflows_as_in_trl():
    """beta D = -90: exp(90) = inf in float32 and sigma(-90 / 0.05) = 0, so 0 * inf = nan (trl's
    formula too); at beta D = -80, exp(80) = 5.5e34 is finite and the loss is sp(80) = 80."""
    losses = losses_of("discopop", (t(-90, -80), t(0, 0), t(0, 0), t(0, 0)), beta=1.0)
    assert torch.isnan(losses[0])
    torch.testing.assert_close(losses[1:], t(80.0), rtol=1e-6, atol=0)  # float32 rounding


def test_sft_is_one_token_mean_over_the_batch():
    """Masked tokens (-100) are ignored: -(-1 - 2 - 3 - 0.5 - 0.5 - 1 - 1) / 7 = 9/7 for every pair."""
    logps = t(-1, -2, -100, -100, -3, -100, -100, -100, -0.5, -0.5, -1, -1).reshape(3, 4)
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    sft = losses_of("sft", inputs={"token": chosen_tokens(logps, mask)})
    check(sft, [9 / 7] * 3)


def test_sigmoid_norm():
    """-logsigma(beta * [1.5, -2, 0]) = [sp(-0.3), sp(0.4), log 2]."""
    check(losses_of("sigmoid_norm", inputs=LENGTHS), [sp(-BETA * m) for m in NORM_MARGIN])


# --- rewards, reference-free ---------------------------------------------------------------


def test_rewards_are_beta_logratios_detached():
    """chosen 0.2 * [1, -1, 0], rejected 0.2 * [-4, 2, 0], whatever the loss or f-divergence."""
    pi_c = PAIRS[0].clone().requires_grad_(True)
    pairs = (pi_c, *PAIRS[1:])
    losses, chosen, rejected = dpo_loss(*sides(pairs), settings(f_divergence_type="forward_kl"))
    check(chosen, [0.2, -0.2, 0.0])
    check(rejected, [-0.8, 0.4, 0.0])
    assert losses.requires_grad
    assert not chosen.requires_grad and not rejected.requires_grad


def test_reference_free_ignores_the_reference():
    """Reference-free (the reference ``SequenceLogps.zeros``, what ``NoReference`` yields):
    D = pi_c - pi_r = [5, -3, 0], the same beta D as PAIRS by construction."""
    policy = SequenceLogps(PAIRS[0], PAIRS[1])
    losses, chosen, _ = dpo_loss(policy, SequenceLogps.zeros(3), settings())
    check(losses, [sp(-z) for z in Z])
    check(chosen, [0.2 * -4, 0.2 * -6, 0.2 * -8])


# --- f-divergences ------------------------------------------------------------------------


def test_f_divergence_maps():
    """lr = [0, 1, -2]: forward_kl 1 - e^-lr; js log 2 + logsigma(lr) = log 2 - sp(-lr);
    alpha 0.5: (e^{-lr/2} - 1) / (-1/2); alpha 1: lr."""
    lr = t(0, 1, -2)
    check(f_divergence_scores(lr, "reverse_kl"), [0.0, 1.0, -2.0])
    check(f_divergence_scores(lr, "forward_kl"), [1 - math.exp(-x) for x in (0, 1, -2)])
    check(f_divergence_scores(lr, "js_divergence"), [LOG2 - sp(-x) for x in (0, 1, -2)])
    expected = [(math.exp(-0.5 * x) - 1) / -0.5 for x in (0, 1, -2)]
    check(f_divergence_scores(lr, "alpha_divergence", alpha=0.5), expected)
    check(f_divergence_scores(lr, "alpha_divergence", alpha=1.0 + 1e-7), [0.0, 1.0, -2.0])
    with pytest.raises(ValueError, match="'alpha_divergence' needs alpha"):
        f_divergence_scores(lr, "alpha_divergence")


def test_alpha_divergence_clamps_the_exponent():
    """alpha = 2 so t = lr: float32 clamps t at 80, float16 at 11 (e^11 - 1 = 59873 < 65504)."""
    big32 = f_divergence_scores(t(100.0), "alpha_divergence", alpha=2.0)
    torch.testing.assert_close(big32, t(math.exp(80) - 1), rtol=1e-6, atol=0)  # float32 rounding
    big16 = f_divergence_scores(torch.tensor([20.0], dtype=torch.float16), "alpha_divergence", 2.0)
    assert big16.dtype == torch.float16
    assert big16.item() == torch.tensor(math.exp(11) - 1, dtype=torch.float16).item()


def test_f_divergence_feeds_scores_into_the_loss():
    """forward_kl: s_c = 1 - e^-lr_c, s_r = 1 - e^-lr_r; sigmoid: sp(-beta (s_c - s_r));
    ipo: ((s_c/n_c - s_r/n_r) - 2.5)^2 with the clamped lengths [2, 1, 1] and [4, 2, 1]."""
    s = [(1 - math.exp(-c), 1 - math.exp(-r)) for c, r in ((1, -4), (-1, 2), (0, 0))]
    sigmoid = losses_of("sigmoid", f_divergence_type="forward_kl")
    check(sigmoid, [sp(-BETA * (c - r)) for c, r in s])
    ipo = losses_of("ipo", f_divergence_type="forward_kl", inputs=LENGTHS)
    lengths = ((2, 4), (1, 2), (1, 1))
    check(ipo, [(c / nc - r / nr - 2.5) ** 2 for (c, r), (nc, nr) in zip(s, lengths)])


def test_f_divergence_is_not_applied_to_raw_logratio_losses():
    with pytest.raises(ValueError, match=r"f_divergence_type='js_divergence'.*\['bco_pair'\]"):
        dpo_loss(*sides(PAIRS), settings("bco_pair", f_divergence_type="js_divergence"))
    with pytest.raises(ValueError, match="f_divergence_type 'kl' unknown"):
        settings(f_divergence_type="kl")


# --- weighted combination and WPO -----------------------------------------------------------


def test_combined_loss_weights_and_pair_weights():
    """sigmoid (weight 1) + hinge (weight 0.5), pair weights [1, 0, 2]:
    sigmoid mean = (sp(-1) * 1 + 0 + log 2 * 2) / 3, hinge mean = (0 + 0 + 1 * 2) / 3."""
    wpo = LossSettings(
        beta=BETA, loss_type=["sigmoid", "hinge"], loss_weights=[1.0, 0.5], use_weighting=True
    )
    out = combined_dpo_loss(*sides(PAIRS), wpo, pair_weights=t(1, 0, 2))
    sigmoid_mean = (sp(-1) + 2 * LOG2) / 3
    hinge_mean = 2 / 3
    check(out.per_type["sigmoid"], sigmoid_mean)
    check(out.per_type["hinge"], hinge_mean)
    check(out.loss, sigmoid_mean + 0.5 * hinge_mean)
    check(out.chosen_rewards, [0.2, -0.2, 0.0])


def test_combined_single_type_is_the_mean_of_dpo_loss():
    out = combined_dpo_loss(*sides(PAIRS), settings())
    check(out.loss, sum(sp(-z) for z in Z) / 3)
    check(out.per_pair["sigmoid"], [sp(-z) for z in Z])


def test_wpo_weights():
    """Row 0: (-1 - -0.5) + (-3 - -0.5) = -3 over 2 tokens -> e^-1.5 (the masked -50 is ignored);
    row 1: no completion token -> length clamped to 1, sum 0 -> e^0 = 1;
    row 2: (-0.2 - -0.7) over 1 token -> e^0.5."""
    logps = t(-1, -3, -50, -9, -9, -9, -0.2, -9, -9).reshape(3, 3).requires_grad_(True)
    log_sum_sq = t(-0.5, -0.5, 0, -1, -1, -1, -0.7, -1, -1).reshape(3, 3)
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 0]])
    w = wpo_weights(logps, log_sum_sq, mask)
    check(w, [math.exp(-1.5), 1.0, math.exp(0.5)])
    assert not w.requires_grad


def test_trl_defines():
    assert trl_defines("sigmoid") and not trl_defines("sigmoid", label_smoothing=0.1)
    assert trl_defines("robust", 0.1) and trl_defines("hinge", 0.3)
    assert not trl_defines("exo_pair", 0.0) and trl_defines("exo_pair", 1e-3)
    assert not trl_defines("ipo", reference_free=True)
    # trl 1.16 multiplies WPO weights in place: sft (expanded scalar) fails for B > 1 and hinge
    # (relu output) fails in backward; see test_losses_trl.py.
    assert not trl_defines("sft", pair_weighted=True) and not trl_defines(
        "hinge", pair_weighted=True
    )
    assert trl_defines("sigmoid", pair_weighted=True) and not trl_defines("aot", pair_weighted=True)


# --- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("loss_type", "missing"),
    [
        ("ipo", "chosen_lengths"),
        ("sigmoid_norm", "chosen_lengths"),
        ("sft", "chosen_token_logps"),
    ],
)
def test_missing_extra_names_the_loss_and_key(loss_type, missing):
    with pytest.raises(ValueError, match=f"loss_type '{loss_type}' needs '{missing}'"):
        dpo_loss(*sides(PAIRS), settings(loss_type))


def test_unknown_loss_type_and_keyword():
    with pytest.raises(
        ValueError, match=r"loss_type \['dpo'\] unknown; choose from sigmoid, hinge"
    ):
        settings("dpo")
    with pytest.raises(ValueError, match="loss_type is empty"):
        LossSettings(loss_type=[])
    with pytest.raises(TypeError, match="discopop_temperature"):
        dpo_loss(*sides(PAIRS), settings("discopop"), discopop_temperature=0.1)
    with pytest.raises(TypeError, match="discopop_temperature"):
        settings("discopop", discopop_temperature=0.1)


def test_exo_pair_needs_label_smoothing():
    with pytest.raises(ValueError, match="'exo_pair' needs label_smoothing > 0"):
        dpo_loss(*sides(PAIRS), settings("exo_pair"))


def test_robust_warns_outside_its_range():
    with pytest.warns(UserWarning, match=r"'robust' expects label_smoothing in \[0, 0.5\)"):
        dpo_loss(*sides(PAIRS), settings("robust", label_smoothing=0.6))


def test_wpo_with_sorting_losses_is_not_implemented():
    with pytest.raises(NotImplementedError, match=r"\['aot'\]"):
        wpo = LossSettings(loss_type=["sigmoid", "aot"], use_weighting=True)
        combined_dpo_loss(*sides(PAIRS), wpo, pair_weights=t(1, 1, 1))


def test_pair_weights_come_exactly_with_use_weighting():
    """With use_weighting the weights default to the policy's WPO weights, so a policy without
    per-token log_sum_sq_probs is an error; without use_weighting, weights must not be given."""
    with pytest.raises(ValueError, match="use_weighting needs the policy's per-token log_sum_sq"):
        combined_dpo_loss(*sides(PAIRS), settings(use_weighting=True))
    with pytest.raises(ValueError, match="pair_weights given but use_weighting=False"):
        combined_dpo_loss(*sides(PAIRS), settings(), pair_weights=t(1, 1, 1))


def test_dpo_loss_takes_one_loss_type():
    with pytest.raises(ValueError, match="use combined_dpo_loss"):
        dpo_loss(*sides(PAIRS), LossSettings(loss_type=["sigmoid", "hinge"]))


def test_bad_shapes_and_weights():
    with pytest.raises(
        ValueError, match=r"ref_rejected_logps has shape \(2,\); expected \(B,\) = \(3,\)"
    ):
        dpo_loss(*sides((*PAIRS[:3], t(1, 2))))
    with pytest.raises(
        ValueError, match=r"ref_chosen_logps has shape \(3, 1\); expected \(B,\) = \(3,\)"
    ):
        dpo_loss(*sides((*PAIRS[:2], PAIRS[2][:, None], PAIRS[3])))
    with pytest.raises(ValueError, match="loss_weights has 1 values for 2 loss types"):
        LossSettings(loss_type=["sigmoid", "hinge"], loss_weights=[1.0])
    with pytest.raises(ValueError, match=r"chosen_lengths has shape \(2,\)"):
        lengths = {"chosen_lengths": torch.ones(2), "rejected_lengths": torch.ones(3)}
        dpo_loss(*sides(PAIRS, **lengths), settings("ipo"))
    with pytest.raises(ValueError, match="chosen_token_mask has no completion token"):
        zeros = torch.zeros(3, 2)
        dpo_loss(*sides(PAIRS, token=chosen_tokens(zeros, zeros)), settings("sft"))
    with pytest.raises(ValueError, match="beta must be > 0"):
        settings(beta=0.0)
    with pytest.raises(ValueError, match="discopop_tau must be > 0"):
        settings(discopop_tau=0.0)
