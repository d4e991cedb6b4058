"""Properties of the DPO losses that hold for any log-probs (hypothesis, bounded examples).

Float32 tolerances: the losses are a few float32 operations on values of magnitude <= ~100, each
rounding by <= 6e-8 relative; ``REL`` = 1e-6 relative and ``ABS`` = 1e-5 absolute (an ulp of
100 is 7.6e-6) bound that accumulated rounding; a wrong formula misses them by orders of magnitude.
"""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dpo_core.batch import PreferenceBatch
from dpo_core.logp_types import LogpOptions, SequenceLogps, TokenLogps
from dpo_core.losses import LOSS_TYPES, dpo_loss
from dpo_core.reference import NoReference
from dpo_core.settings import LossSettings

REL, ABS = 1e-6, 1e-5
FAST = settings(max_examples=40, deadline=None)
FEW = settings(max_examples=15, deadline=None)  # these run all 15 loss types per example
betas = st.floats(0.01, 1.0)
margins = st.floats(-100.0, 100.0, width=32)
logps = st.floats(-100.0, 0.0, width=32)


def t(values) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.float32)


def one(loss_type: str, beta: float, **kw) -> LossSettings:
    """The settings of one loss type at ``beta``."""
    return LossSettings(beta=beta, loss_type=[loss_type], **kw)


def pair(chosen: torch.Tensor, rejected: torch.Tensor, extra: dict | None = None) -> SequenceLogps:
    """(B,) chosen and rejected log-probs; ``extra`` holds the optional (B,) ``chosen_lengths``,
    ``rejected_lengths`` and the chosen half's (B, T) ``chosen_token_logps`` /
    ``chosen_token_mask`` (the rejected half of ``token`` is then zeros, unscored)."""
    extra = extra or {}
    token = None
    if "chosen_token_logps" in extra:
        logps, mask = extra["chosen_token_logps"], extra["chosen_token_mask"]
        token = TokenLogps(
            logps=torch.cat([logps, torch.zeros_like(logps)]),
            mask=torch.cat([mask, torch.zeros_like(mask)]).bool(),
        )
    return SequenceLogps(
        chosen, rejected, extra.get("chosen_lengths"), extra.get("rejected_lengths"), token
    )


def loss_of(pairs, settings: LossSettings, extra: dict | None = None) -> torch.Tensor:
    """Per-pair losses of ``(pi_c, pi_r, ref_c, ref_r)``; ``extra`` as in ``pair`` (policy's)."""
    pc, pr, rc, rr = pairs
    return dpo_loss(pair(pc, pr, extra), pair(rc, rr), settings)[0]


def margin_loss(
    loss_type: str, d: torch.Tensor, beta: float, inputs: dict | None = None, **kw
) -> torch.Tensor:
    """Loss at margin D = d exactly: policy chosen d, everything else 0."""
    zeros = torch.zeros_like(d)
    return loss_of((d, zeros, zeros, zeros), one(loss_type, beta, **kw), inputs)


@st.composite
def pair_batches(draw, min_pairs: int = 1) -> dict:
    """B pairs of log-probs, completion lengths and per-token chosen log-probs."""
    b = draw(st.integers(min_pairs, 6))
    column = st.lists(logps, min_size=b, max_size=b)
    lengths = st.lists(st.integers(0, 50), min_size=b, max_size=b)
    seed = draw(st.integers(0, 2**16))
    tokens = -10 * torch.rand(b, 4, generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(b, 4)
    mask[:, 3] = 0  # the last token column is padding
    return {
        "pairs": [t(draw(column)) for _ in range(4)],
        "extra": {
            "chosen_lengths": torch.tensor(draw(lengths)),
            "rejected_lengths": torch.tensor(draw(lengths)),
            "chosen_token_logps": tokens,
            "chosen_token_mask": mask,
        },
    }


def smoothing_for(loss_type: str) -> float:
    return 0.1 if loss_type in {"exo_pair", "robust", "aot", "aot_unpaired"} else 0.0


@FAST
@given(a=logps, b=logps, beta=betas)
def test_sigmoid_at_zero_margin_is_log_2(a, b, beta):
    """pi_c = pi_r and ref_c = ref_r give D = 0 exactly, so the loss is -logsigma(0) = log 2."""
    loss = loss_of((t([a]), t([a]), t([b]), t([b])), one("sigmoid", beta))
    torch.testing.assert_close(loss, t([math.log(2)]), rtol=1.2e-7, atol=0)  # one float32 ulp


@FAST
@given(d1=margins, d2=margins, beta=betas)
def test_sigmoid_and_hinge_do_not_increase_with_the_margin(d1, d2, beta):
    lo, hi = t([min(d1, d2)]), t([max(d1, d2)])
    for loss_type in ("sigmoid", "hinge"):
        l_lo, l_hi = margin_loss(loss_type, lo, beta), margin_loss(loss_type, hi, beta)
        assert l_hi <= l_lo + REL * l_lo.abs(), (loss_type, l_lo, l_hi)


@FAST
@given(m1=margins, m2=margins, beta=betas)
def test_ipo_grows_with_the_distance_to_its_target(m1, m2, beta):
    """With unit lengths the IPO loss is (D - 1/(2 beta))^2: larger when D is farther away."""
    target = 1 / (2 * beta)
    near, far = sorted((m1, m2), key=lambda m: abs(m - target))
    unit = {"chosen_lengths": torch.ones(1), "rejected_lengths": torch.ones(1)}
    l_near = margin_loss("ipo", t([near]), beta, unit)
    l_far = margin_loss("ipo", t([far]), beta, unit)
    assert l_near <= l_far + REL * l_far + ABS, (l_near, l_far)


@FAST
@given(batch=pair_batches(), beta=betas)
def test_swapping_chosen_and_rejected_negates_the_margin(batch, beta):
    """Swapping gives l(-D); and the logistic identity -logsigma(x) + logsigma(-x) = -x gives
    l(D) - l(-D) = -beta D."""
    pc, pr, rc, rr = batch["pairs"]
    loss = loss_of((pc, pr, rc, rr), one("sigmoid", beta))
    swapped = loss_of((pr, pc, rr, rc), one("sigmoid", beta))
    d = (pc - rc) - (pr - rr)
    torch.testing.assert_close(swapped, margin_loss("sigmoid", -d, beta), rtol=0, atol=0)
    torch.testing.assert_close(loss - swapped, -beta * d, rtol=REL, atol=ABS)


@FAST
@given(d=margins, beta=betas)
def test_cdpo_at_half_smoothing_is_even_and_smallest_at_zero(d, beta):
    """eps = 1/2: l = -(logsigma(x) + logsigma(-x))/2 = log(2 cosh(x/2)), x = beta D; it is even in
    D and >= log 2 (not constant: the two flipped labels balance only at D = 0)."""
    loss = margin_loss("sigmoid", t([d]), beta, label_smoothing=0.5)
    mirrored = margin_loss("sigmoid", t([-d]), beta, label_smoothing=0.5)
    assert torch.equal(loss, mirrored)
    x = beta * float(t(d))
    torch.testing.assert_close(loss, t([math.log(2 * math.cosh(x / 2))]), rtol=REL, atol=ABS)
    assert loss >= math.log(2) * (1 - REL)


@FAST
@given(eps=st.floats(0.01, 0.45), beta=betas)
def test_cdpo_minimum_sits_at_log_odds_of_the_smoothing(eps, beta):
    """d/dx [-(1-eps) logsigma(x) - eps logsigma(-x)] = -(1-eps) sigma(-x) + eps sigma(x) = 0 at
    sigma(x) = 1 - eps, i.e. x* = beta D* = log((1-eps)/eps)."""
    d = t([math.log((1 - eps) / eps) / beta]).requires_grad_(True)
    margin_loss("sigmoid", d, beta, label_smoothing=eps).sum().backward()
    assert abs(d.grad.item()) <= 1e-6  # beta * (a few float32 ulps of sigmoid values <= 1)


@FAST
@given(
    beta=st.sampled_from([0.05, 0.1, 0.25, 0.5]),
    n_c=st.integers(1, 40),
    n_r=st.integers(1, 40),
    rejected=st.floats(-3.0, 0.0),
    offset=st.floats(-2.0, 2.0),
)
def test_ipo_minimum_sits_at_normalised_margin_half_over_beta(beta, n_c, n_r, rejected, offset):
    """Per-token chosen log-ratio r + 1/(2 beta) + offset over rejected r: loss = offset^2, with
    its minimum 0 at offset 0."""
    target = 1 / (2 * beta)
    lengths = {"chosen_lengths": torch.tensor([n_c]), "rejected_lengths": torch.tensor([n_r])}
    zero = torch.zeros(1)
    pc, pr = t([(rejected + target + offset) * n_c]), t([rejected * n_r])
    at = loss_of((pc, pr, zero, zero), one("ipo", beta), lengths)
    pc_min = t([(rejected + target) * n_c])
    at_min = loss_of((pc_min, pr, zero, zero), one("ipo", beta), lengths)
    # The normalised margin carries float32 rounding of values <= 400 (ulp 3e-5) divided by n.
    assert at_min.item() <= (3e-5) ** 2
    torch.testing.assert_close(at, t([offset**2]), rtol=1e-4, atol=1e-4)
    assert at_min <= at + 1e-9


@FEW
@given(batch=pair_batches(), beta=betas)
def test_reference_free_equals_zero_reference(batch, beta):
    """Reference-free training (the ``NoReference`` source, settings with reference_free=True)
    gives exactly the losses and rewards of an explicit all-zero reference."""
    pc, pr, _, _ = batch["pairs"]
    zeros = torch.zeros_like(pc)
    policy = pair(pc, pr, batch["extra"])
    ids = torch.zeros(2 * len(pc), 5, dtype=torch.long)
    no_reference = NoReference()(PreferenceBatch(ids, ids, ids), LogpOptions())
    for loss_type in LOSS_TYPES:
        eps = smoothing_for(loss_type)
        free_settings = one(loss_type, beta, label_smoothing=eps, reference_free=True)
        free = dpo_loss(policy, no_reference, free_settings)
        explicit_settings = one(loss_type, beta, label_smoothing=eps)
        explicit = dpo_loss(policy, SequenceLogps(zeros, zeros), explicit_settings)
        for a, b in zip(free, explicit):  # equal_nan: see the discopop note in the next test
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@FAST
@given(d=st.lists(margins, min_size=1, max_size=6), beta=betas)
def test_sigmoid_gradient_is_minus_beta_sigma_of_minus_beta_d(d, beta):
    """d/dD [-logsigma(beta D)] = -beta sigma(-beta D) (DPO paper, section 4)."""
    d = t(d).requires_grad_(True)
    margin_loss("sigmoid", d, beta).sum().backward()
    expected = -beta * torch.sigmoid(-beta * d.detach())
    torch.testing.assert_close(d.grad, expected, rtol=REL, atol=1e-7)  # gradients are <= beta


@FEW
@given(batch=pair_batches(min_pairs=2), beta=betas, seed=st.integers(0, 2**16))
def test_per_pair_losses_follow_their_pair_under_permutation(batch, beta, seed):
    """Elementwise losses permute with the pairs (exactly); aot/aot_unpaired sort, so their output
    does not change at all; sft is one batch mean, equal up to summation order."""
    perm = torch.randperm(len(batch["pairs"][0]), generator=torch.Generator().manual_seed(seed))
    permuted_extra = {k: v[perm] for k, v in batch["extra"].items()}
    for loss_type in LOSS_TYPES:
        s = one(loss_type, beta, label_smoothing=smoothing_for(loss_type))
        losses = loss_of(batch["pairs"], s, batch["extra"])
        permuted = loss_of([p[perm] for p in batch["pairs"]], s, permuted_extra)
        if loss_type in {"aot", "aot_unpaired"}:
            assert torch.equal(permuted, losses), loss_type
        elif loss_type == "sft":
            torch.testing.assert_close(permuted, losses, rtol=REL, atol=0)  # summation order
        else:  # equal_nan: discopop overflows to nan below beta*D = -88.7, as trl's does
            torch.testing.assert_close(permuted, losses[perm], rtol=0, atol=0, equal_nan=True)
