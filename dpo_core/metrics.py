"""The numbers trl's DPOTrainer logs, with trl's names and meanings (trl dpo:1535-1601).

Every metric is a ratio ``sum / count`` over this micro-batch's pairs or completion tokens, so we
return the sums and counts (``metric_sums``) and divide last (``metrics_from_sums``). That is how
trl reduces them across processes: the token-weighted ones gather Σ and count and divide
(``entropy``, ``logits/*``, ``mean_token_accuracy``); the per-pair ones gather every pair and take
the mean, which is the same Σ / B. The value logged for an interval is then the plain mean of
the per-micro-batch values (trl ``log``, dpo:1699-1708) — the caller's job.

| key                   | sum                                             | count                     |
|-----------------------|-------------------------------------------------|---------------------------|
| rewards/chosen        | Σ_pairs β(π_c - ρ_c)                            | B                         |
| rewards/rejected      | Σ_pairs β(π_r - ρ_r)                            | B                         |
| rewards/accuracies    | #pairs with reward_c > reward_r (strict)        | B                         |
| rewards/margins       | Σ_pairs (reward_c - reward_r)                   | B                         |
| logps/chosen          | Σ_pairs π_c (policy, summed or LD-weighted)     | B                         |
| logps/rejected        | Σ_pairs π_r                                     | B                         |
| logits/chosen         | Σ over chosen completion tokens of mean_v z_v   | # chosen completion tokens|
| logits/rejected       | same over rejected completion tokens            | # rejected ...            |
| entropy               | Σ over all completion tokens of H(p)            | # completion tokens       |
| mean_token_accuracy   | # chosen completion tokens whose target is top-1| # chosen completion tokens|
| aux_loss (MoE only)   | the router's load-balancing loss (router_aux)   | 1                         |

Completion tokens are counted on the shifted mask (``TokenLogps.mask``), as trl does. A ratio
with count 0 is 0.0, as in trl. ``num_tokens`` (Σ attention_mask, prompt + completion, both
halves) is a running total in trl (dpo:1549-1552): we report the micro-batch's own count.

``dpo:N`` are lines of trl 1.16.0's trl/trainer/dpo_trainer.py.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from dpo_core.logp_types import SequenceLogps, TokenLogps, split_pairs
from dpo_core.losses import LossOutput

PAIR_METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)
TOKEN_METRICS = ("logits/chosen", "logits/rejected", "entropy", "mean_token_accuracy")


class MetricSums(NamedTuple):
    """Per metric name: the micro-batch's sum (float32 scalar) and count (int64 scalar).

    Reduce both over processes (sum) before ``metrics_from_sums``.
    """

    sums: dict[str, torch.Tensor]
    counts: dict[str, torch.Tensor]


def _token_stat(token: TokenLogps | None, field: str) -> torch.Tensor:
    value = None if token is None or token.stats is None else getattr(token.stats, field)
    if value is None:
        raise ValueError(
            f"metrics: the policy's TokenStats.{field} is None; compute its log-probs with "
            "LogpOptions(stats=True)"
        )
    return value.detach()


def _pair_sums(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Sums over the B pairs (dpo:1582-1601); ``accuracies`` uses a strict ``>``."""
    c, r = chosen_rewards.detach().float(), rejected_rewards.detach().float()
    return {
        "rewards/chosen": c.sum(),
        "rewards/rejected": r.sum(),
        "rewards/accuracies": (c > r).float().sum(),
        "rewards/margins": (c - r).sum(),
        "logps/chosen": policy_chosen_logps.detach().float().sum(),
        "logps/rejected": policy_rejected_logps.detach().float().sum(),
    }


def _token_sums(token: TokenLogps | None) -> MetricSums:
    """Sums and counts over completion tokens, with trl's expressions (dpo:1537-1579)."""
    mean_logits = _token_stat(token, "mean_logits")  # raises when there are no statistics
    mask = token.mask
    chosen_mask, rejected_mask = split_pairs(mask)
    chosen_mean_logits, rejected_mean_logits = split_pairs(mean_logits)
    chosen_is_top1, _ = split_pairs(_token_stat(token, "is_top1"))
    sums = {
        "logits/chosen": chosen_mean_logits[chosen_mask].sum(),
        "logits/rejected": rejected_mean_logits[rejected_mask].sum(),
        "entropy": (_token_stat(token, "entropy") * mask).sum(),
        "mean_token_accuracy": (chosen_is_top1 & chosen_mask).sum().float(),
    }
    counts = {
        "logits/chosen": chosen_mask.sum(),
        "logits/rejected": rejected_mask.sum(),
        "entropy": mask.sum(),
        "mean_token_accuracy": chosen_mask.sum(),
    }
    return MetricSums(sums, counts)


def metric_sums(policy: SequenceLogps, out: LossOutput) -> MetricSums:
    """Sums and counts behind every metric of one micro-batch (see the module table).

    Args:
        policy: the policy's log-probs: (B,) sums (LD-weighted when ld_alpha is set, as trl logs
            them) and the per-token values with statistics (``LogpOptions(stats=True)``).
        out: the loss's output; its (B,) rewards ``β (π - ρ)`` are log-ratios, not the
            f-divergence scores.
    """
    num_pairs = out.chosen_rewards.shape[0]
    for name, t in (
        ("rejected_rewards", out.rejected_rewards),
        ("policy.chosen", policy.chosen),
        ("policy.rejected", policy.rejected),
    ):
        if tuple(t.shape) != (num_pairs,):
            raise ValueError(f"metrics: {name} has shape {tuple(t.shape)}, need ({num_pairs},)")
    tokens = _token_sums(policy.token)
    pairs = _pair_sums(out.chosen_rewards, out.rejected_rewards, policy.chosen, policy.rejected)
    sums = pairs | tokens.sums
    # one tensor per key: a caller may all-reduce each count in place
    device = out.chosen_rewards.device
    counts = {name: torch.tensor(num_pairs, device=device) for name in PAIR_METRICS}
    counts.update(tokens.counts)
    aux = policy.token.aux_loss if policy.token is not None else None
    if aux is not None:  # trl's aux_loss: the MoE router's load-balancing loss (dpo:1533)
        sums["aux_loss"] = aux.detach().float()
        counts["aux_loss"] = torch.tensor(1, device=device)
    return MetricSums(sums, counts)


def metrics_from_sums(
    sums: dict[str, torch.Tensor], counts: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``sum / count`` per metric; 0.0 where the count is 0 (trl's rule for token metrics)."""
    return {
        name: torch.where(counts[name] > 0, sums[name] / counts[name].clamp(min=1), 0.0)
        for name in sums
    }


def dpo_metrics(
    policy: SequenceLogps, out: LossOutput, attention_mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """trl's metrics of one micro-batch on one process, plus ``num_tokens`` (Σ attention_mask).

    For several processes, reduce ``metric_sums`` first and call ``metrics_from_sums``.
    """
    metrics = metrics_from_sums(*metric_sums(policy, out))
    metrics["num_tokens"] = attention_mask.sum()
    return metrics
