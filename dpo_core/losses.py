"""DPO losses: ``dpo_loss`` for one loss type, ``combined_dpo_loss`` for trl's weighted list.

Every number follows trl 1.16's ``DPOTrainer._compute_loss`` (dpo_trainer.py:1350-1528), with two
documented differences (and one trl failure):

* **Label smoothing in ``sigmoid``.** We implement conservative DPO (cDPO, Mitchell 2023):
  ``-(1-eps) logsigma(beta D) - eps logsigma(-beta D)``, as the DPO paper's reference code and
  earlier trl releases do. trl 1.16's ``sigmoid`` ignores ``label_smoothing`` (it reads it only for
  ``robust``, ``exo_pair``, ``aot`` and ``aot_unpaired``). With ``eps = 0`` the two agree exactly.
* **Reference-free.** ``reference_free=True`` takes the reference log-probs as 0; trl 1.16 has
  no such option.
* **WPO with ``sft`` or ``hinge``.** trl multiplies the weights in place, which raises for
  ``sft`` (B > 1) and breaks ``hinge``'s backward; we multiply out of place.

``trl_defines(loss_type, label_smoothing, reference_free, pair_weighted)`` says whether trl 1.16 computes the same
thing, for the parity suite. The per-pair formulas live in ``dpo_core.loss_functions`` (one small
function each, looked up in ``LOSS_REGISTRY``), the f-DPO score map in ``dpo_core.divergences``.

Rewards are ``beta * (policy - reference)`` log-ratios, detached: trl logs the raw log-ratios,
not the f-divergence scores.

Example: ``losses, chosen_rewards, rejected_rewards = dpo_loss(pi_c, pi_r, ref_c, ref_r)``;
``combined_dpo_loss(..., loss_type=["sigmoid", "sft"], chosen_token_logps=..., ...).loss``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dpo_core.divergences import f_divergence_scores
from dpo_core.loss_checks import (  # noqa: F401 (the two type sets are re-exported)
    F_DIVERGENCE_LOSS_TYPES,
    LOSS_TYPES,
    check_known_loss_types,
    check_loss_types,
    check_loss_weights,
    check_needs,
    check_pair_shapes,
    check_pair_weights,
)
from dpo_core.loss_functions import LOSS_REGISTRY, LossInputs

Tensor = torch.Tensor


TRL_LABEL_SMOOTHING_LOSS_TYPES: frozenset[str] = frozenset(
    {"robust", "exo_pair", "aot", "aot_unpaired"}
)
"""Loss types whose trl 1.16 formula reads ``label_smoothing``; ours adds ``sigmoid`` (cDPO)."""

EXTRA_DEFAULTS: dict[str, Any] = {
    "f_divergence_type": "reverse_kl",
    "f_alpha_divergence_coef": 0.5,
    "chosen_lengths": None,
    "rejected_lengths": None,
    "chosen_token_logps": None,
    "chosen_token_mask": None,
    "discopop_tau": 0.05,
    "reference_free": False,
}
"""Every keyword ``dpo_loss`` accepts in ``**extra``, with its default (trl's where trl has one)."""


@dataclass
class LossOutput:
    """The weighted combination of several loss types over B pairs.

    Attributes:
        loss: scalar, ``sum_k w_k * mean_i(l_k,i * pair_weight_i)``; the tensor to backpropagate.
        per_type: loss type -> scalar ``mean_i(l_k,i * pair_weight_i)``, before its weight ``w_k``.
        chosen_rewards: (B,) ``beta * (pi_c - ref_c)``, detached.
        rejected_rewards: (B,) ``beta * (pi_r - ref_r)``, detached.
    """

    loss: Tensor
    per_type: dict[str, Tensor]
    chosen_rewards: Tensor
    rejected_rewards: Tensor


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    **extra: Any,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair loss of one ``loss_type`` and the detached implicit rewards.

    Args:
        policy_chosen_logps: (B,) summed completion log-probs of the chosen answers, policy.
        policy_rejected_logps: (B,) the same for the rejected answers.
        ref_chosen_logps: (B,) the same under the reference; ignored (may be None) if reference-free.
        ref_rejected_logps: (B,) likewise.
        beta: KL strength, > 0.
        loss_type: one of ``LOSS_TYPES``.
        label_smoothing: eps; see the module docstring for ``sigmoid``.
        **extra: keys of ``EXTRA_DEFAULTS``: ``f_divergence_type``, ``f_alpha_divergence_coef``,
            ``chosen_lengths``/``rejected_lengths`` ((B,) unshifted completion token counts; ``ipo``
            and ``sigmoid_norm``), ``chosen_token_logps``/``chosen_token_mask`` ((B, T) per-token
            policy log-probs of the chosen rows and their shifted completion mask; ``sft``),
            ``discopop_tau``, ``reference_free``.

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each (B,); the rewards are
        ``beta * log-ratio``, detached. ``aot``/``aot_unpaired`` losses are in sorted order.
    """
    inputs = make_loss_inputs(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        beta=beta,
        loss_types=(loss_type,),
        label_smoothing=label_smoothing,
        **extra,
    )
    chosen_rewards, rejected_rewards = implicit_rewards(inputs)
    return LOSS_REGISTRY[loss_type].fn(inputs), chosen_rewards, rejected_rewards


def combined_dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    *,
    beta: float = 0.1,
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    pair_weights: Tensor | None = None,
    **extra: Any,
) -> LossOutput:
    """trl's total loss ``sum_k w_k * mean_i(l_k,i * pair_weight_i)`` (dpo_trainer.py:1385-1528).

    Args: as ``dpo_loss``, plus
        loss_type: one name or a list of names (MPO, for example, is
            ``["sigmoid", "bco_pair", "sft"]`` with weights ``[0.8, 0.2, 1.0]``).
        loss_weights: one weight per loss type; default 1.0 each. A type listed twice counts
            twice in ``loss`` (as in trl) and once in ``per_type``.
        pair_weights: (B,) WPO weights ``w_chosen * w_rejected`` (see ``wpo_weights``), multiplied
            into every loss type's per-pair loss, ``sft`` included, before the mean.

    Raises:
        ValueError: lengths of ``loss_type`` and ``loss_weights`` differ (trl dpo_config.py:360-364).
        NotImplementedError: ``pair_weights`` with ``aot``/``aot_unpaired``, which sort the pairs.
    """
    loss_types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    weights = check_loss_weights(loss_types, loss_weights)
    if pair_weights is not None:
        check_pair_weights(pair_weights, loss_types, policy_chosen_logps.shape)
    inputs = make_loss_inputs(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        beta=beta,
        loss_types=loss_types,
        label_smoothing=label_smoothing,
        **extra,
    )
    loss: Tensor | float = 0.0
    per_type: dict[str, Tensor] = {}
    for name, weight in zip(loss_types, weights, strict=True):
        per_pair = LOSS_REGISTRY[name].fn(inputs)
        if pair_weights is not None:
            per_pair = per_pair * pair_weights
        per_type[name] = per_pair.mean()
        loss = loss + per_type[name] * weight  # trl: loss += mean * weight, from 0.0
    chosen_rewards, rejected_rewards = implicit_rewards(inputs)
    return LossOutput(loss, per_type, chosen_rewards, rejected_rewards)


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
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    *,
    beta: float,
    loss_types: Sequence[str],
    label_smoothing: float = 0.0,
    **extra: Any,
) -> LossInputs:
    """Check everything the ``loss_types`` need and derive log-ratios and f-DPO scores once.

    Raises ``ValueError`` naming the argument for: unknown loss types or extra keys, beta <= 0,
    shape mismatches, a loss missing an input it needs, ``exo_pair`` with eps = 0, and a
    non-default ``f_divergence_type`` with a loss outside ``F_DIVERGENCE_LOSS_TYPES``.
    Warns when ``robust`` gets eps outside [0, 0.5).
    """
    opts = _resolve_extra(extra)
    check_loss_types(loss_types, label_smoothing, opts["f_divergence_type"])
    if not beta > 0:
        raise ValueError(f"dpo_loss: beta must be > 0, got {beta}")
    if not opts["discopop_tau"] > 0:
        raise ValueError(f"dpo_loss: discopop_tau must be > 0, got {opts['discopop_tau']}")
    if opts["reference_free"]:
        ref_chosen_logps = torch.zeros_like(policy_chosen_logps)
        ref_rejected_logps = torch.zeros_like(policy_rejected_logps)
    pairs = {
        "policy_chosen_logps": policy_chosen_logps,
        "policy_rejected_logps": policy_rejected_logps,
        "ref_chosen_logps": ref_chosen_logps,
        "ref_rejected_logps": ref_rejected_logps,
    }
    check_pair_shapes(pairs)
    check_needs(loss_types, opts, batch_size=policy_chosen_logps.shape[0])
    for key in ("chosen_lengths", "rejected_lengths"):
        if opts[key] is not None:
            # Float, as trl's completion_mask.sum(dim=1).clamp(min=1.0).
            opts[key] = opts[key].clamp(min=1.0)
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    f_type, alpha = opts.pop("f_divergence_type"), opts.pop("f_alpha_divergence_coef")
    del opts["reference_free"]
    return LossInputs(
        **pairs,
        chosen_logratios=chosen_logratios,
        rejected_logratios=rejected_logratios,
        chosen_scores=f_divergence_scores(chosen_logratios, f_type, alpha),
        rejected_scores=f_divergence_scores(rejected_logratios, f_type, alpha),
        beta=beta,
        label_smoothing=label_smoothing,
        **opts,
    )


def _resolve_extra(extra: dict[str, Any]) -> dict[str, Any]:
    """``EXTRA_DEFAULTS`` updated by ``extra``; an unknown key (a typo) raises."""
    unknown = sorted(set(extra) - set(EXTRA_DEFAULTS))
    if unknown:
        raise ValueError(
            f"dpo_loss: unknown keyword(s) {unknown}; accepted: {sorted(EXTRA_DEFAULTS)}"
        )
    return {**EXTRA_DEFAULTS, **extra}
