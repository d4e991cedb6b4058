"""Independent computations the log-prob path is checked against, and short ways to call it.

``token_logps_from_logits`` is the textbook definition on full logits (N, L, V): it materialises
every vocabulary entry, so it lives here as the oracle, not in ``dpo_core``.
"""

from __future__ import annotations

import torch
from torch import nn

from dpo_core.batch import PreferenceBatch
from dpo_core.logp_types import LogpOptions, TokenLogps, TokenStats
from dpo_core.logps import gather_completion_states, score_states, token_logps
from dpo_core.model_parts import ModelParts


def token_logps_from_logits(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    stats: bool = False,
    wpo: bool = False,
) -> TokenLogps:
    """The plain computation from full logits (N, L, V): ``log_softmax`` in float32, then gather.

    Statistics use the textbook formulas: ``H = -Σ p log p``, ``mean = Σ z / V``,
    ``log Σ p² = logsumexp(2 log p)``, and trl's top-1 rule written out
    (``z_t >= max z`` and ``z_t > z_v`` for every ``v < t``, kern:383).
    """
    mask = completion_mask[:, 1:].bool()
    z = logits[:, :-1].float()  # (N, L-1, V)
    log_p = z.log_softmax(dim=-1)
    targets = input_ids[:, 1:].unsqueeze(-1)
    result = TokenLogps(log_p.gather(-1, targets).squeeze(-1).masked_fill(~mask, 0.0), mask)
    if stats or wpo:
        with torch.no_grad():
            z_target = z.gather(-1, targets)
            earlier = torch.arange(z.shape[-1], device=z.device) < targets
            max_earlier = z.masked_fill(~earlier, float("-inf")).amax(dim=-1, keepdim=True)
            is_top1 = (z_target >= z.amax(dim=-1, keepdim=True)) & (z_target > max_earlier)
            log_sum_sq = torch.logsumexp(2 * log_p, dim=-1).masked_fill(~mask, 0.0) if wpo else None
            result.stats = TokenStats(
                entropy=-(log_p.exp() * log_p).sum(dim=-1).masked_fill(~mask, 0.0),
                mean_logits=z.mean(dim=-1).masked_fill(~mask, 0.0),
                is_top1=is_top1.squeeze(-1) & mask,
                log_sum_sq_probs=log_sum_sq,
            )
    return result


def score_hidden(
    hidden: torch.Tensor,
    head: nn.Module,
    input_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    logit_transform=None,
    **options,
) -> TokenLogps:
    """The scoring half of ``dpo_core.logps.token_logps`` on given hidden states (N, L, H)."""
    states = gather_completion_states(hidden, input_ids, completion_mask)
    parts = ModelParts(backbone=None, head=head, logit_transform=logit_transform)
    return score_states(states, parts, LogpOptions(**options))


def plain_token_logps(model: nn.Module, batch: PreferenceBatch, **options) -> TokenLogps:
    """``token_logps`` through the plain padded forward (no prompt sharing)."""
    return token_logps(model, batch, LogpOptions(prompt_sharing=False, **options))


def shared_token_logps(model: nn.Module, batch: PreferenceBatch, **options) -> TokenLogps:
    """``token_logps`` with prompt sharing (padding-free unless ``padding_free=False``)."""
    return token_logps(model, batch, LogpOptions(prompt_sharing=True, **options))
