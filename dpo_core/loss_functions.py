"""The fifteen per-pair preference losses of trl 1.16, one small pure function each.

Every function takes a ``LossInputs`` (the log-probs of B pairs and what is derived from them) and
returns the per-pair loss, shape (B,). ``LOSS_REGISTRY`` maps trl's ``loss_type`` name to the
function and to what it needs; ``dpo_core.losses`` builds the inputs, checks them and dispatches.

Notation (shapes (B,)): ``lr_c = pi_c - ref_c`` and ``lr_r = pi_r - ref_r`` are the chosen and
rejected log-ratios (policy minus reference summed completion log-probs); ``s_c``, ``s_r`` are the
f-DPO scores of those log-ratios (``dpo_core.divergences``; equal to ``lr`` for reverse KL);
``D = s_c - s_r`` is the margin; ``beta`` the KL strength, ``eps`` the label smoothing and
``sigma`` the logistic sigmoid. Each expression follows trl 1.16 ``dpo_trainer.py:1385-1509``
operation for operation, so that float32 results agree bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


@dataclass(frozen=True)
class LossInputs:
    """Everything a per-pair loss may read, for B preference pairs.

    Attributes:
        policy_chosen_logps: (B,) summed completion log-probs of the chosen answers under the policy.
        policy_rejected_logps: (B,) the same for the rejected answers.
        ref_chosen_logps: (B,) the same under the reference (zeros when reference-free).
        ref_rejected_logps: (B,) likewise.
        chosen_logratios: (B,) ``lr_c = policy_chosen_logps - ref_chosen_logps``.
        rejected_logratios: (B,) ``lr_r``.
        chosen_scores: (B,) ``s_c``, the f-divergence map of ``lr_c``.
        rejected_scores: (B,) ``s_r``.
        beta: KL strength, > 0.
        label_smoothing: eps, the assumed probability that a label is flipped.
        discopop_tau: temperature of DiscoPOP's mixing sigmoid, > 0.
        chosen_lengths: (B,) completion token counts (unshifted mask, clamped to >= 1), or None.
        rejected_lengths: (B,) likewise, or None.
        chosen_token_logps: (B, T) per-token policy log-probs of the chosen rows, or None.
        chosen_token_mask: (B, T) 1 on the chosen completion tokens those log-probs score, or None.
    """

    policy_chosen_logps: Tensor
    policy_rejected_logps: Tensor
    ref_chosen_logps: Tensor
    ref_rejected_logps: Tensor
    chosen_logratios: Tensor
    rejected_logratios: Tensor
    chosen_scores: Tensor
    rejected_scores: Tensor
    beta: float
    label_smoothing: float
    discopop_tau: float
    chosen_lengths: Tensor | None = None
    rejected_lengths: Tensor | None = None
    chosen_token_logps: Tensor | None = None
    chosen_token_mask: Tensor | None = None

    @property
    def margin(self) -> Tensor:
        """(B,) ``D = s_c - s_r``."""
        return self.chosen_scores - self.rejected_scores

    @property
    def length_normalised_margin(self) -> Tensor:
        """(B,) ``s_c / n_c - s_r / n_r`` (the lengths are required; see ``LOSS_REGISTRY``)."""
        return (
            self.chosen_scores / self.chosen_lengths - self.rejected_scores / self.rejected_lengths
        )


def sigmoid_loss(x: LossInputs) -> Tensor:
    """DPO with conservative label smoothing: ``-(1-eps) logsigma(beta D) - eps logsigma(-beta D)``.

    Source: DPO, Rafailov et al. 2023, eq. 7; cDPO, Mitchell 2023, "A note on DPO with noisy
    preferences and relationship to IPO", eq. 3 (the expected DPO loss when a label is flipped with probability eps).
    With ``eps = 0`` this is exactly trl's ``-logsigmoid(beta * D)``. trl 1.16 ignores
    ``label_smoothing`` for ``sigmoid``; earlier trl releases, like the DPO reference code, used the
    cDPO form above, which we keep. ``dpo_core.losses.trl_defines`` tells the two apart.
    """
    z = x.beta * x.margin
    if x.label_smoothing == 0.0:
        return -F.logsigmoid(z)  # trl's expression; avoids 0 * inf when |z| is infinite
    eps = x.label_smoothing
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def hinge_loss(x: LossInputs) -> Tensor:
    """``relu(1 - beta D)``. Source: SLiC-HF, Zhao et al. 2023 (rank calibration, unit margin); RSO, Liu et al. 2023."""
    return torch.relu(1 - x.beta * x.margin)


def ipo_loss(x: LossInputs) -> Tensor:
    """``((s_c/n_c - s_r/n_r) - 1/(2 beta))^2``, regressing the per-token margin to ``1/(2 beta)``.

    Source: IPO, Azar et al. 2023, eq. 17 (beta plays the paper's tau). trl normalises the scores
    by the completion lengths ``n`` (its note: the form the IPO authors used).
    """
    return (x.length_normalised_margin - 1 / (2 * x.beta)) ** 2


def exo_pair_loss(x: LossInputs) -> Tensor:
    """``KL(q || p)`` for ``q = (sigma(beta D), sigma(-beta D))``, ``p = (1-eps, eps)``.

    ``= q_w (logsigma(beta D) - log(1-eps)) + q_l (logsigma(-beta D) - log eps)``.
    Source: EXO, Ji et al. 2024, eq. 16 with K = 2. Needs eps > 0 (``log eps``).
    """
    delta = x.margin
    # A float32 tensor, as trl makes it, so log(1-eps) and log(eps) round exactly as trl's.
    eps = torch.tensor(x.label_smoothing, device=delta.device)
    # beta * delta is written out at each use, as in trl: one shared product would make autograd
    # sum the incoming gradients before multiplying by beta, which rounds differently (1 ulp).
    chosen_term = torch.sigmoid(x.beta * delta) * (F.logsigmoid(x.beta * delta) - torch.log1p(-eps))
    rejected_term = torch.sigmoid(-x.beta * delta) * (
        F.logsigmoid(-x.beta * delta) - torch.log(eps)
    )
    return chosen_term + rejected_term


def nca_pair_loss(x: LossInputs) -> Tensor:
    """``-logsigma(beta lr_c) - 1/2 logsigma(-beta lr_c) - 1/2 logsigma(-beta lr_r)``.

    Source: NCA, Chen et al. 2024 ("Noise Contrastive Alignment"), the pairwise NCA loss.
    Uses the raw log-ratios, never f-divergence scores.
    """
    chosen_rewards = x.beta * x.chosen_logratios
    rejected_rewards = x.beta * x.rejected_logratios
    return (
        -F.logsigmoid(chosen_rewards)
        - 0.5 * F.logsigmoid(-chosen_rewards)
        - 0.5 * F.logsigmoid(-rejected_rewards)
    )


def robust_loss(x: LossInputs) -> Tensor:
    """``[-(1-eps) logsigma(beta D) + eps logsigma(-beta D)] / (1 - 2 eps)``, unbiased under label noise.

    Source: rDPO, Chowdhury et al. 2024 ("Provably Robust DPO"). Meaningful for eps in [0, 0.5).
    """
    eps, delta = x.label_smoothing, x.margin
    # Two products, not one shared z, so the gradient rounds as trl's (see exo_pair_loss).
    clean_term = -(1 - eps) * F.logsigmoid(x.beta * delta)
    flipped_term = -eps * F.logsigmoid(-x.beta * delta)
    return (clean_term - flipped_term) / (1 - 2 * eps)


def bco_pair_loss(x: LossInputs) -> Tensor:
    """``-logsigma(beta lr_c) - logsigma(-beta lr_r)``, chosen as positive, rejected as negative.

    Source: BCO, Jung et al. 2024, without the running reward shift (trl omits it here).
    """
    chosen_rewards = x.beta * x.chosen_logratios
    rejected_rewards = x.beta * x.rejected_logratios
    return -F.logsigmoid(chosen_rewards) - F.logsigmoid(-rejected_rewards)


def sppo_hard_loss(x: LossInputs) -> Tensor:
    """``(lr_c - 1/(2 beta))^2 + (lr_r + 1/(2 beta))^2``.

    Source: SPPO, Wu et al. 2024, eq. 4.7 of Algorithm 1 with the hard win probability P = 1 / 0.
    """
    winner_error = (x.chosen_logratios - 0.5 / x.beta) ** 2
    loser_error = (x.rejected_logratios + 0.5 / x.beta) ** 2
    return winner_error + loser_error


def _smoothed_logistic(beta: float, eps: float, d: Tensor) -> Tensor:
    """``-(1-eps) logsigma(beta d) - eps logsigma(-beta d)`` in trl's AOT operation order."""
    return -F.logsigmoid(beta * d) * (1 - eps) - F.logsigmoid(-beta * d) * eps


def aot_loss(x: LossInputs) -> Tensor:
    """``d = sort(pi_c - pi_r) - sort(ref_c - ref_r)``, then cDPO's smoothed logistic of ``beta d``.

    Source: AOT, Melnyk et al. 2024, the paired variant. The sort is over the micro-batch, so element
    i of the result belongs to the i-th smallest margins, not to pair i.
    """
    policy_sorted, _ = torch.sort(x.policy_chosen_logps - x.policy_rejected_logps, dim=0)
    ref_sorted, _ = torch.sort(x.ref_chosen_logps - x.ref_rejected_logps, dim=0)
    return _smoothed_logistic(x.beta, x.label_smoothing, policy_sorted - ref_sorted)


def aot_unpaired_loss(x: LossInputs) -> Tensor:
    """``d = sort(lr_c) - sort(lr_r)``, then cDPO's smoothed logistic of ``beta d``.

    Source: AOT, Melnyk et al. 2024, the unpaired variant. Sorted over the micro-batch, as ``aot``.
    """
    chosen_sorted, _ = torch.sort(x.chosen_logratios, dim=0)
    rejected_sorted, _ = torch.sort(x.rejected_logratios, dim=0)
    return _smoothed_logistic(x.beta, x.label_smoothing, chosen_sorted - rejected_sorted)


def apo_zero_loss(x: LossInputs) -> Tensor:
    """``(1 - sigma(beta lr_c)) + sigma(beta lr_r)``: push chosen up, rejected down.

    Source: APO, D'Oosterlinck et al. 2024, eq. 7 (APO-zero).
    """
    return (1 - torch.sigmoid(x.beta * x.chosen_logratios)) + torch.sigmoid(
        x.beta * x.rejected_logratios
    )


def apo_down_loss(x: LossInputs) -> Tensor:
    """``sigma(beta lr_c) + (1 - sigma(beta (lr_c - lr_r)))``: both down, rejected more.

    Source: APO, D'Oosterlinck et al. 2024, eq. 8 (APO-down).
    """
    chosen_term = torch.sigmoid(x.beta * x.chosen_logratios)
    margin_term = 1 - torch.sigmoid(x.beta * (x.chosen_logratios - x.rejected_logratios))
    return chosen_term + margin_term


def discopop_loss(x: LossInputs) -> Tensor:
    """``z = beta D``, ``m = sigma(z / tau)``: ``(1 - m)(-logsigma(z)) + m exp(-z)``.

    Source: DiscoPOP ("log-ratio modulated loss"), Lu et al. 2024, eq. 5; tau = ``discopop_tau``.
    As in trl, ``exp(-z)`` overflows for ``z < -88.7`` (float32) and ``m * exp(-z) = 0 * inf``
    makes the loss nan there, although its limit is the logistic term.
    """
    z = x.margin * x.beta
    modulation = torch.sigmoid(z / x.discopop_tau)
    return -F.logsigmoid(z) * (1 - modulation) + torch.exp(-z) * modulation


def sft_loss(x: LossInputs) -> Tensor:
    """Negative log-likelihood of the chosen tokens: one token-level mean over the micro-batch.

    ``l = -sum_{i,t} m_it logp_it / sum_{i,t} m_it`` over the chosen rows, broadcast to (B,).
    Source: RPO, Pang et al. 2024 ("Iterative Reasoning Preference Optimization"), the NLL term.
    Computed as trl does (a masked select, then ``mean``), so the rounding matches.
    """
    mask = x.chosen_token_mask.bool()
    nll = -x.chosen_token_logps[mask].mean()
    return nll.expand(x.chosen_token_logps.shape[0])


def sigmoid_norm_loss(x: LossInputs) -> Tensor:
    """``-logsigma(beta (s_c/n_c - s_r/n_r))``: DPO on per-token (length-normalised) scores.

    Source: SimPO, Meng et al. 2024, eq. 4 without the reward margin but with the reference;
    the length-normalised DPO of Tulu 3 (Lambert et al. 2024, eq. 6).
    """
    return -F.logsigmoid(x.beta * x.length_normalised_margin)


LENGTHS = ("chosen_lengths", "rejected_lengths")
CHOSEN_TOKENS = ("chosen_token_logps", "chosen_token_mask")


@dataclass(frozen=True)
class LossSpec:
    """A registered loss: its function, the optional inputs it needs, whether f-DPO applies.

    Attributes:
        fn: ``LossInputs -> (B,)`` per-pair loss.
        needs: names of ``LossInputs`` fields (``dpo_loss`` keyword arguments) that must not be None.
        f_divergence: True when trl 1.16 allows a non-default ``f_divergence_type`` with it
            (``sft`` is allowed although it never reads the scores).
    """

    fn: Callable[[LossInputs], Tensor]
    needs: tuple[str, ...] = ()
    f_divergence: bool = False


LOSS_REGISTRY: dict[str, LossSpec] = {
    "sigmoid": LossSpec(sigmoid_loss, f_divergence=True),
    "hinge": LossSpec(hinge_loss, f_divergence=True),
    "ipo": LossSpec(ipo_loss, needs=LENGTHS, f_divergence=True),
    "exo_pair": LossSpec(exo_pair_loss, f_divergence=True),
    "nca_pair": LossSpec(nca_pair_loss),
    "robust": LossSpec(robust_loss, f_divergence=True),
    "bco_pair": LossSpec(bco_pair_loss),
    "sppo_hard": LossSpec(sppo_hard_loss),
    "aot": LossSpec(aot_loss),
    "aot_unpaired": LossSpec(aot_unpaired_loss),
    "apo_zero": LossSpec(apo_zero_loss),
    "apo_down": LossSpec(apo_down_loss),
    "discopop": LossSpec(discopop_loss, f_divergence=True),
    "sft": LossSpec(sft_loss, needs=CHOSEN_TOKENS, f_divergence=True),
    "sigmoid_norm": LossSpec(sigmoid_norm_loss, needs=LENGTHS, f_divergence=True),
}
"""trl's ``loss_type`` name -> ``LossSpec``, in trl's order."""
