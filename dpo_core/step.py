"""One DPO step on one micro-batch: policy log-probs -> reference -> loss -> metric sums.

This is the path of one batch (``../shared/ARCHITECTURE.md``) as a single function, so the
Lightning module, the parity suite and the benchmark all run exactly the same arithmetic::

    token  = token_logps(policy, batch)                    # (2B, L-1) per-token, chunked head
    pi_c, pi_r = sums of token logps (LD-weighted with ld_alpha)
    ref_c, ref_r = reference(batch)                        # frozen copy | adapters off | cache
    loss, rewards = combined_dpo_loss(pi_c, pi_r, ref_c, ref_r, settings.loss, ...)
    sums, counts = metric_sums(...)                        # trl's metric names
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dpo_core.batch import PreferenceBatch
from dpo_core.lm_head import CHUNK_SIZE, KEEP_PROBS_BYTES
from dpo_core.logps import (
    TokenLogps,
    completion_lengths,
    ld_sequence_logps,
    sequence_logps,
    split_pairs,
)
from dpo_core.losses import combined_dpo_loss, wpo_weights
from dpo_core.metrics import metric_sums
from dpo_core.packing import token_logps
from dpo_core.settings import LossSettings


@dataclass
class DPOSettings:
    """What ``dpo_step`` needs: the objective, and how the policy's log-probs are computed.

    Attributes:
        loss: the objective (``dpo_core.settings``), trl's names and defaults.
        chunk_size, keep_probs_bytes, prompt_sharing, padding_free: speed and memory only; the
            numbers agree up to float32 rounding (``dpo_core.lm_head``, ``dpo_core.packing``).
            ``padding_free`` packs several pairs per row, and needs ``prompt_sharing``.
    """

    loss: LossSettings = field(default_factory=LossSettings)
    chunk_size: int = CHUNK_SIZE
    keep_probs_bytes: int = KEEP_PROBS_BYTES
    prompt_sharing: bool = True
    padding_free: bool = True


@dataclass
class StepOutput:
    """What one micro-batch yields.

    Attributes:
        loss: scalar, the weighted loss to back-propagate.
        sums, counts: per metric name (trl's), the micro-batch's sum and count; the metric is
            sum / count once both are reduced over processes.
        num_tokens: real (non-pad) tokens in the micro-batch, both halves (trl's ``num_tokens``).
    """

    loss: torch.Tensor
    sums: dict[str, torch.Tensor]
    counts: dict[str, torch.Tensor]
    num_tokens: int

    def detached(self) -> StepOutput:
        return StepOutput(
            self.loss.detach(),
            {k: v.detach() for k, v in self.sums.items()},
            {k: v.detach() for k, v in self.counts.items()},
            self.num_tokens,
        )


def policy_sequence_logps(
    token: TokenLogps, ld_alpha: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen (B,), rejected (B,)) summed completion log-probs, LD-weighted when asked."""
    if ld_alpha is not None:
        return ld_sequence_logps(token, ld_alpha)
    return split_pairs(sequence_logps(token))


def reference_logps(
    reference, batch: PreferenceBatch, settings: DPOSettings, like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ref_chosen (B,), ref_rejected (B,)): zeros when reference-free, else from ``reference``."""
    if settings.loss.reference_free:
        zeros = torch.zeros_like(like)
        return zeros, zeros
    if reference is None:
        raise ValueError("no reference source given and reference_free is False")
    with torch.no_grad():
        ref_c, ref_r = reference(batch)
    return ref_c.to(like.dtype), ref_r.to(like.dtype)


def pair_weights(token: TokenLogps) -> torch.Tensor:
    """WPO weight of each pair, ``w_chosen * w_rejected`` (B,), without gradient."""
    w = wpo_weights(token.logps, token.log_sum_sq_probs, token.mask)
    w_c, w_r = split_pairs(w)
    return w_c * w_r


def step_token_logps(
    model: torch.nn.Module, batch: PreferenceBatch, settings: DPOSettings
) -> TokenLogps:
    """The policy's per-token completion log-probs with every statistic a step needs, under the
    settings' speed options: (2B, L-1) on the batch's grid."""
    return token_logps(
        model,
        batch,
        prompt_sharing=settings.prompt_sharing,
        padding_free=settings.padding_free,
        chunk_size=settings.chunk_size,
        with_stats=True,
        with_wpo=settings.loss.use_weighting,
        keep_probs_bytes=settings.keep_probs_bytes,
    )


def dpo_step(
    model: torch.nn.Module, batch: PreferenceBatch, reference, settings: DPOSettings
) -> StepOutput:
    """Loss and metric sums of ``model`` on ``batch`` (see the module docstring)."""
    token = step_token_logps(model, batch, settings)
    pi_c, _ = policy_sequence_logps(token, settings.loss.ld_alpha)
    ref_c, ref_r = reference_logps(reference, batch, settings, pi_c)
    return step_from_token_logps(token, batch, ref_c, ref_r, settings)


def step_from_token_logps(
    token: TokenLogps,
    batch: PreferenceBatch,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    settings: DPOSettings,
) -> StepOutput:
    """The rest of ``dpo_step`` once the policy's token log-probs (with statistics, and WPO's
    ``log_sum_sq_probs`` when ``use_weighting``) and the reference log-probs ((B,) each) are known:
    what an evaluation that scores each model once needs."""
    pi_c, pi_r = policy_sequence_logps(token, settings.loss.ld_alpha)
    n_c, n_r = completion_lengths(batch.completion_mask)
    chosen_token_logps, _ = split_pairs(token.logps)
    chosen_token_mask, _ = split_pairs(token.mask)
    out = combined_dpo_loss(
        pi_c,
        pi_r,
        ref_chosen_logps,
        ref_rejected_logps,
        settings.loss,
        pair_weights=pair_weights(token) if settings.loss.use_weighting else None,
        chosen_lengths=n_c,
        rejected_lengths=n_r,
        chosen_token_logps=chosen_token_logps,
        chosen_token_mask=chosen_token_mask,
    )
    sums, counts = metric_sums(
        chosen_rewards=out.chosen_rewards,
        rejected_rewards=out.rejected_rewards,
        policy_chosen_logps=pi_c.detach(),
        policy_rejected_logps=pi_r.detach(),
        token=token,
    )
    return StepOutput(out.loss, sums, counts, int(batch.attention_mask.sum().item()))
