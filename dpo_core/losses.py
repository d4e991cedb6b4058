"""DPO losses: ``dpo_loss`` for one loss type, ``combined_dpo_loss`` for trl's weighted list.

Every number follows trl 1.16's ``DPOTrainer._compute_loss`` (dpo_trainer.py:1350-1528), with two
documented differences (and one trl failure):

* **Label smoothing in ``sigmoid``.** We implement conservative DPO (cDPO, Mitchell 2023):
  ``-(1-eps) logsigma(beta D) - eps logsigma(-beta D)``, as the DPO paper's reference code and
  earlier trl releases do. trl 1.16's ``sigmoid`` ignores ``label_smoothing`` (it reads it only for
  ``robust``, ``exo_pair``, ``aot`` and ``aot_unpaired``). With ``eps = 0`` the two agree exactly.
* **Reference-free.** Training against ``NoReference`` (``reference_free=True``) takes the
  reference log-probs as 0; trl 1.16 has no such option.
* **WPO with ``sft`` or ``hinge``.** trl multiplies the weights in place, which raises for
  ``sft`` (B > 1) and breaks ``hinge``'s backward; we multiply out of place.

``trl_defines(loss_type, label_smoothing, reference_free, pair_weighted)`` says whether trl 1.16 computes the same
thing, for the parity suite. The per-pair formulas live in ``dpo_core.loss_functions`` (one small
function each, looked up in ``LOSS_REGISTRY``), the f-DPO score map in ``dpo_core.divergences``.

Both take the policy's and the reference's ``SequenceLogps`` (the typed pair the log-prob entry
returns: (B,) chosen and rejected sums, plus the lengths and per-token values a loss type may
read) and the objective as one ``dpo_core.settings.LossSettings`` (trl's names and defaults).
Rewards are ``beta * (policy - reference)`` log-ratios, detached: trl logs the raw log-ratios,
not the f-divergence scores.

Example, on four log-prob tensors (B,)::

    losses, chosen_rewards, rejected_rewards = dpo_loss(
        SequenceLogps(pi_c, pi_r), SequenceLogps(ref_c, ref_r), LossSettings(beta=0.1)
    )
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dpo_core.divergences import f_divergence_scores
from dpo_core.logp_types import SequenceLogps, split_pairs
from dpo_core.loss_checks import (  # noqa: F401 (the two type sets are re-exported)
    F_DIVERGENCE_LOSS_TYPES,
    LOSS_TYPES,
    check_known_loss_types,
    check_loss_combination,
    check_needs,
    check_pair_shapes,
    check_pair_weights,
)
from dpo_core.loss_functions import LOSS_REGISTRY, LossInputs
from dpo_core.settings import LossSettings

Tensor = torch.Tensor


TRL_LABEL_SMOOTHING_LOSS_TYPES: frozenset[str] = frozenset(
    {"robust", "exo_pair", "aot", "aot_unpaired"}
)
"""Loss types whose trl 1.16 formula reads ``label_smoothing``; ours adds ``sigmoid`` (cDPO)."""


@dataclass
class LossOutput:
    """The weighted combination of several loss types over B pairs.

    Attributes:
        loss: scalar, ``sum_k w_k * mean_i(l_k,i * pair_weight_i)``; the tensor to backpropagate.
        per_type: loss type -> scalar ``mean_i(l_k,i * pair_weight_i)``, before its weight ``w_k``.
        per_pair: loss type -> (B,) ``l_k,i``, before any weight.
        chosen_rewards: (B,) ``beta * (pi_c - ref_c)``, detached.
        rejected_rewards: (B,) ``beta * (pi_r - ref_r)``, detached.
    """

    loss: Tensor
    per_type: dict[str, Tensor]
    per_pair: dict[str, Tensor]
    chosen_rewards: Tensor
    rejected_rewards: Tensor


def dpo_loss(
    policy: SequenceLogps, reference: SequenceLogps, settings: LossSettings | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair loss of one loss type and the detached implicit rewards.

    Args:
        policy: the policy's summed completion log-probs, ``chosen`` and ``rejected`` (B,) each;
            ``ipo`` and ``sigmoid_norm`` read its ``chosen_lengths`` / ``rejected_lengths``,
            ``sft`` its per-token ``token`` values.
        reference: the reference's (B,) each (``SequenceLogps.zeros`` when reference-free).
        settings: the objective, with exactly one ``loss_type``; default ``LossSettings()``
            (sigmoid). Reads ``beta``, ``label_smoothing`` (see the module docstring for
            ``sigmoid``), ``f_divergence_type``, ``f_alpha_divergence_coef`` and
            ``discopop_tau``; the weights belong to ``combined_dpo_loss``.

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each (B,); the rewards are
        ``beta * log-ratio``, detached. ``aot``/``aot_unpaired`` losses are in sorted order.

    Example: ``dpo_loss(SequenceLogps(pi_c, pi_r), SequenceLogps(ref_c, ref_r))``.
    """
    settings = settings or LossSettings()
    if len(settings.loss_type) != 1:
        raise ValueError(
            f"dpo_loss: one loss type, got {settings.loss_type}; use combined_dpo_loss for several"
        )
    out = combined_dpo_loss(policy, reference, settings)
    return out.per_pair[settings.loss_type[0]], out.chosen_rewards, out.rejected_rewards


def combined_dpo_loss(
    policy: SequenceLogps,
    reference: SequenceLogps,
    settings: LossSettings | None = None,
    *,
    pair_weights: Tensor | None = None,
) -> LossOutput:
    """trl's total loss ``sum_k w_k * mean_i(l_k,i * pair_weight_i)`` (dpo_trainer.py:1385-1528).

    Args: as ``dpo_loss``, plus
        settings: any number of loss types (MPO, for example, is ``loss_type=["sigmoid",
            "bco_pair", "sft"]`` with ``loss_weights=[0.8, 0.2, 1.0]``); a type listed twice
            counts twice in ``loss`` (as in trl) and once in ``per_type``.
        pair_weights: (B,) WPO weights ``w_chosen * w_rejected``, multiplied into every loss
            type's per-pair loss, ``sft`` included, before the mean. With ``use_weighting`` they
            default to ``wpo_pair_weights(policy)``; without it they must not be given.

    Raises:
        ValueError: ``pair_weights`` given without ``use_weighting``.
        NotImplementedError: WPO with ``aot``/``aot_unpaired``, which sort the pairs.
    """
    settings = settings or LossSettings()
    if pair_weights is not None and not settings.use_weighting:
        raise ValueError(
            "combined_dpo_loss: pair_weights given but use_weighting=False; WPO weights only "
            "with use_weighting"
        )
    if settings.use_weighting:
        pair_weights = wpo_pair_weights(policy) if pair_weights is None else pair_weights
        check_pair_weights(pair_weights, settings.loss_type, policy.chosen.shape)
    inputs = make_loss_inputs(policy, reference, settings)
    loss: Tensor | float = 0.0
    per_type: dict[str, Tensor] = {}
    per_pair: dict[str, Tensor] = {}
    for name, weight in zip(settings.loss_type, settings.weights, strict=True):
        per_pair[name] = LOSS_REGISTRY[name].fn(inputs)
        weighted = per_pair[name] if pair_weights is None else per_pair[name] * pair_weights
        per_type[name] = weighted.mean()
        loss = loss + per_type[name] * weight  # trl: loss += mean * weight, from 0.0
    chosen_rewards, rejected_rewards = implicit_rewards(inputs)
    return LossOutput(loss, per_type, per_pair, chosen_rewards, rejected_rewards)


def wpo_pair_weights(policy: SequenceLogps) -> Tensor:
    """WPO weight of each pair, ``w_chosen * w_rejected`` (B,), without gradient, from the
    policy's per-token log-probs and ``log Σ p²`` (``LogpOptions.wpo``)."""
    token = policy.token
    if token is None or token.stats is None or token.stats.log_sum_sq_probs is None:
        raise ValueError(
            "combined_dpo_loss: use_weighting needs the policy's per-token log_sum_sq_probs; "
            "compute its log-probs with LogpOptions(wpo=True)"
        )
    w_c, w_r = split_pairs(wpo_weights(token.logps, token.stats.log_sum_sq_probs, token.mask))
    return w_c * w_r


def wpo_weights(token_logps: Tensor, log_sum_sq_probs: Tensor, mask: Tensor) -> Tensor:
    """WPO sequence weights ``w = exp( sum_t m_t (logp_t - log sum_v p_v^2) / max(sum_t m_t, 1) )``.

    The weight is the geometric mean over completion tokens of ``p(y_t) / sum_v p(v)^2``, the
    probability of the sampled token relative to the policy's own "expected" probability, so
    off-policy pairs count less. No gradient flows through it.
    Source: WPO, Zhou et al. 2024, eq. 2; trl 1.16 dpo_trainer.py:1518-1526 (same operations).

    Args:
        token_logps: (N, T) per-token policy log-probs (N = 2B rows, chosen then rejected).
        log_sum_sq_probs: (N, T) ``log sum_v p_v^2`` of the policy's next-token distribution.
        mask: (N, T) shifted completion mask, 1 where a completion token is scored.

    Returns:
        (N,) weights; for ``combined_dpo_loss`` use ``w_chosen * w_rejected`` of ``w.chunk(2)``.
    """
    shapes = {tuple(token_logps.shape), tuple(log_sum_sq_probs.shape), tuple(mask.shape)}
    if token_logps.ndim != 2 or len(shapes) != 1:
        raise ValueError(
            "wpo_weights: token_logps, log_sum_sq_probs and mask must share one (N, T) shape; got "
            f"{tuple(token_logps.shape)}, {tuple(log_sum_sq_probs.shape)}, {tuple(mask.shape)}"
        )
    with torch.no_grad():
        lengths = mask.sum(dim=1).clamp_min(1)
        aligned_logps = (token_logps - log_sum_sq_probs) * mask
        return torch.exp(aligned_logps.sum(dim=1) / lengths)


def trl_defines(
    loss_type: str,
    label_smoothing: float = 0.0,
    reference_free: bool = False,
    pair_weighted: bool = False,
) -> bool:
    """Whether trl 1.16 computes this loss, and its gradient, exactly as we do (for the parity suite).

    False for: ``reference_free`` (trl has no such mode); ``sigmoid`` with ``eps != 0`` (trl
    ignores eps, we apply cDPO); ``exo_pair`` with ``eps == 0`` (both raise). With WPO
    (``pair_weighted``, trl's ``use_weighting``) also for ``aot``/``aot_unpaired`` (both raise),
    ``sft`` and ``hinge``: trl multiplies the weights in place (dpo_trainer.py:1526), which fails
    on ``sft``'s expanded scalar when B > 1 and breaks ``hinge``'s backward (relu's saved output).
    True otherwise: the other losses read eps exactly as trl (``robust``, ``exo_pair``, ``aot*``)
    or ignore it, as trl does.
    """
    check_known_loss_types([loss_type])
    if reference_free:
        return False
    if pair_weighted and loss_type in {"aot", "aot_unpaired", "sft", "hinge"}:
        return False
    if loss_type == "sigmoid":
        return label_smoothing == 0.0
    if loss_type == "exo_pair":
        return label_smoothing != 0.0
    return True


def implicit_rewards(inputs: LossInputs) -> tuple[Tensor, Tensor]:
    """``(beta * lr_c, beta * lr_r)``, each (B,), detached: DPO's implicit rewards (eq. 5)."""
    return (
        inputs.beta * inputs.chosen_logratios.detach(),
        inputs.beta * inputs.rejected_logratios.detach(),
    )


def make_loss_inputs(
    policy: SequenceLogps, reference: SequenceLogps, settings: LossSettings
) -> LossInputs:
    """Check everything ``settings.loss_type`` needs and derive log-ratios and f-DPO scores once:
    ``lr = policy - reference`` for each half, the heart of DPO's implicit reward (Eq. 5).

    Raises ``ValueError`` naming the argument for: shape mismatches, a loss missing an input it
    needs, ``exo_pair`` with eps = 0, and a non-default ``f_divergence_type`` with a loss outside
    ``F_DIVERGENCE_LOSS_TYPES``. Warns when ``robust`` gets eps outside [0, 0.5). (Each field on
    its own was checked when ``settings`` was made.)
    """
    s = settings
    check_loss_combination(s.loss_type, s.label_smoothing, s.f_divergence_type)
    pairs = {
        "policy_chosen_logps": policy.chosen,
        "policy_rejected_logps": policy.rejected,
        "ref_chosen_logps": reference.chosen,
        "ref_rejected_logps": reference.rejected,
    }
    check_pair_shapes(pairs)
    token = policy.token
    optional = {
        "chosen_lengths": policy.chosen_lengths,
        "rejected_lengths": policy.rejected_lengths,
        "chosen_token_logps": None if token is None else split_pairs(token.logps)[0],
        "chosen_token_mask": None if token is None else split_pairs(token.mask)[0],
    }
    check_needs(s.loss_type, optional, batch_size=policy.chosen.shape[0])
    chosen_logratios = policy.chosen - reference.chosen
    rejected_logratios = policy.rejected - reference.rejected
    f_type, alpha = s.f_divergence_type, s.f_alpha_divergence_coef
    return LossInputs(
        **pairs,
        chosen_logratios=chosen_logratios,
        rejected_logratios=rejected_logratios,
        chosen_scores=f_divergence_scores(chosen_logratios, f_type, alpha),
        rejected_scores=f_divergence_scores(rejected_logratios, f_type, alpha),
        beta=s.beta,
        label_smoothing=s.label_smoothing,
        discopop_tau=s.discopop_tau,
        chosen_lengths=_at_least_one(policy.chosen_lengths),
        rejected_lengths=_at_least_one(policy.rejected_lengths),
        chosen_token_logps=optional["chosen_token_logps"],
        chosen_token_mask=optional["chosen_token_mask"],
    )


def _at_least_one(lengths: Tensor | None) -> Tensor | None:
    """Completion lengths clamped to >= 1, as trl's ``completion_mask.sum(dim=1).clamp(min=1.0)``."""
    return None if lengths is None else lengths.clamp(min=1.0)
