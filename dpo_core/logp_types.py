"""The typed values that travel from a model's forward to the loss, and the options that make them.

One batch of B preference pairs is 2B rows ``[chosen_0..B-1, rejected_0..B-1]`` (``PreferenceBatch``).
The log-prob entry (``dpo_core.logps.sequence_logps``) turns it into

    TokenLogps      (2B, L-1) per-token completion log-probs on the shifted grid (+ statistics)
    SequenceLogps   (B,) chosen and (B,) rejected summed log-probs: what the loss reads

for the policy and, through a reference source (``dpo_core.reference``), for the reference: the
same type from the same forward. ``LogpOptions`` says how they are computed; it is built once
from the settings (``dpo_core.step.DPOSettings.policy_options``) and passed down unchanged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import torch

# Keep the (T, V) float32 softmax from forward to backward up to this size (then 3 matmuls
# instead of 4). 512 MiB holds e.g. 4,096 tokens x a 32,000-token vocabulary.
KEEP_PROBS_BYTES = 512 * 2**20
# Completion tokens projected to the vocabulary at a time: one (CHUNK_SIZE, V) block of logits.
CHUNK_SIZE = 1024


@dataclass(frozen=True)
class LogpOptions:
    """How completion log-probs are computed: what comes back beside them, and speed knobs.

    What comes back (changes the numbers returned):
        ld_alpha: LD-DPO's weight of the tokens past the pair's shared length (None: plain sums).
        stats: also trl's token statistics (entropy, mean logit, top-1): ``TokenStats``.
        wpo: also ``log Σ p²`` per token (WPO's weight); implies ``stats``.
        router_aux: also the router's load-balancing loss of a mixture-of-experts model
            (``dpo_core.router_aux``; nothing for a model without a router).
    Speed and memory only (the numbers agree up to float32 rounding):
        chunk_size: completion tokens projected to the vocabulary at a time.
        keep_probs_bytes: keep the (T, V) softmax for backward up to this size (0: recompute).
        prompt_sharing: each prompt forwarded once per pair (``dpo_core.packing``).
        padding_free: several pairs per row (all rows in one call); needs ``prompt_sharing``.
    The model's own logit transform (soft-cap, scaling) is not an option: it is read from the
    model (``dpo_core.model_parts``), so it cannot disagree with it.
    """

    ld_alpha: float | None = None
    stats: bool = False
    wpo: bool = False
    router_aux: bool = False
    chunk_size: int = CHUNK_SIZE
    keep_probs_bytes: int = KEEP_PROBS_BYTES
    prompt_sharing: bool = True
    padding_free: bool = True

    def __post_init__(self) -> None:
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")

    @property
    def any_stats(self) -> bool:
        """Whether the head computes statistics at all (WPO's needs the same softmax pass)."""
        return self.stats or self.wpo

    def without_stats(self) -> LogpOptions:
        """The same computation returning log-probs only: what a reference needs."""
        return dataclasses.replace(self, stats=False, wpo=False, router_aux=False)


class TokenStats(NamedTuple):
    """No-grad statistics of the scored tokens: each (T,) as the head returns them, or on the
    (N, L-1) grid of ``TokenLogps`` (0 / False off the mask); None when not requested.

    Attributes:
        entropy: ``H(p) = -Σ_v p_v log p_v`` of the next-token distribution.
        mean_logits: ``Σ_v z_v / V`` (what trl's ``logits/chosen`` averages).
        is_top1: the target is the first argmax of the logits (trl's tie rule).
        log_sum_sq_probs: ``log Σ_v p_v²`` (WPO's weight, Zhou et al. 2024, Eq. 2).
    """

    entropy: torch.Tensor | None
    mean_logits: torch.Tensor | None
    is_top1: torch.Tensor | None
    log_sum_sq_probs: torch.Tensor | None


NO_STATS = TokenStats(None, None, None, None)


def split_pairs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(2B, ...) rows ``[chosen_0..B-1, rejected_0..B-1]`` -> (chosen (B, ...), rejected (B, ...))."""
    if x.dim() == 0 or x.shape[0] % 2:
        raise ValueError(
            f"split_pairs needs an even first dimension (2B), got shape {tuple(x.shape)}"
        )
    chosen, rejected = x.chunk(2, dim=0)
    return chosen, rejected


@dataclass
class TokenLogps:
    """Per-token log-probabilities of the completion tokens on the shifted (N, L-1) grid.

    Attributes:
        logps: (N, L-1) float32, ``log p(input_ids[:, t+1] | input_ids[:, :t+1])``; 0 where
            ``mask`` is False. Differentiable.
        mask: (N, L-1) bool, ``completion_mask[:, 1:]``: the tokens that are scored.
        stats: ``TokenStats`` on the same grid, or None (``LogpOptions.stats``).
        aux_loss: the forward's router load-balancing loss (scalar, differentiable), or None
            (``LogpOptions.router_aux``; a model without a router).
    """

    logps: torch.Tensor
    mask: torch.Tensor
    stats: TokenStats | None = None
    aux_loss: torch.Tensor | None = None

    def row_sums(self) -> torch.Tensor:
        """``Σ_t logps[n, t]``: each row's completion log-prob, (N,). trl dpo:1302."""
        return self.logps.sum(dim=1)


@dataclass
class SequenceLogps:
    """Completion log-probs of B preference pairs, as the loss reads them.

    Attributes:
        chosen: (B,) ``log π(y_w | x) = Σ_t log π(y_w,t | x, y_w,<t)`` (LD-weighted with
            ``LogpOptions.ld_alpha``), float32.
        rejected: (B,) the same for the rejected completions.
        chosen_lengths, rejected_lengths: (B,) completion token counts of the unshifted mask,
            clamped to >= 1 (trl's ``n_c``, ``n_r``; ``ipo`` and ``sigmoid_norm`` read them), or
            None.
        token: the (2B, L-1) per-token values they were summed from (``sft`` reads the chosen
            half, WPO and the metrics the statistics), or None for a source that has none
            (precomputed, no reference).
    """

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_lengths: torch.Tensor | None = None
    rejected_lengths: torch.Tensor | None = None
    token: TokenLogps | None = None

    @classmethod
    def zeros(cls, num_pairs: int, device: torch.device | str = "cpu") -> SequenceLogps:
        """log π = 0 for every completion: the reference of reference-free training."""
        zeros = torch.zeros(num_pairs, device=device)
        return cls(zeros, zeros)

    def to(self, like: torch.Tensor) -> SequenceLogps:
        """``chosen`` and ``rejected`` in ``like``'s dtype and device (the rest unchanged)."""
        return dataclasses.replace(
            self, chosen=self.chosen.to(like), rejected=self.rejected.to(like)
        )

    def detached(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) detached, float32, on the CPU."""
        return self.chosen.detach().float().cpu(), self.rejected.detach().float().cpu()


@dataclass
class ScoredStates:
    """The hidden states that predict the completion tokens, gathered from a forward.

    Attributes:
        hidden: (T, H) last hidden states, one per scored token, in the row-major order of the
            True entries of ``mask``.
        targets: (T,) long, the token each state predicts.
        mask: (N, L-1) bool, the shifted completion mask of the (plain) batch grid.
        aux_loss: the forward's router load-balancing loss, or None (``dpo_core.router_aux``).
    The plain forward (``dpo_core.logps.plain_states``) and packed rows
    (``dpo_core.packing.packed_states``) differ only in where ``hidden`` comes from.
    """

    hidden: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor
    aux_loss: torch.Tensor | None = None

    def to(self, device: torch.device) -> ScoredStates:
        moved = (self.hidden.to(device), self.targets.to(device), self.mask.to(device))
        return ScoredStates(*moved, self.aux_loss)
