"""Log-probabilities of completion tokens, projected to the vocabulary only where they are needed.

DPO compares ``log π(y | x) = Σ_t log π(y_t | x, y_<t)``, summed over the completion tokens y
(Rafailov et al. 2023, "Direct Preference Optimization", Eq. 7). A causal LM's hidden state at
position t predicts token t+1, so with ``mask = completion_mask[:, 1:]`` the per-token grid is

    logps[n, t] = log softmax(head(hidden[n, t]))[input_ids[n, t + 1]]   where mask[n, t], else 0

on the (N, L-1) "shifted" grid, exactly as trl's fused LM head returns it (trl/trainer/utils.py:
1598-1696, zero where the label is -100). Unlike trl on CPU, which projects every position to the
vocabulary (kern:48-49), we project only the completion positions, in chunks of ``chunk_size``
tokens, so the float32 ``[chunk, V]`` logits block stays bounded (``dpo_core.lm_head`` does the
projection, its closed-form backward and the no-grad statistics).

Reading order: ``TokenLogps`` -> ``score_selected`` -> ``completion_token_logps`` -> ``model_token_logps`` ->
``sequence_logps`` / ``ld_sequence_logps``. ``token_logps_from_logits`` is the plain full-logits
computation the chunked one must equal.

Line references are to trl 1.16.0: ``kern`` = trl/kernels/chunked_logprob.py, ``dpo`` =
trl/trainer/dpo_trainer.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dpo_core.batch import PreferenceBatch
from dpo_core.lm_head import CHUNK_SIZE, KEEP_PROBS_BYTES, selected_logps
from dpo_core.model_parts import LogitTransform, model_parts


@dataclass
class TokenLogps:
    """Per-token log-probabilities of the completion tokens on the shifted (N, L-1) grid.

    Attributes:
        logps: (N, L-1) float32, ``log p(input_ids[:, t+1] | input_ids[:, :t+1])``; 0 where ``mask``
            is False. Differentiable.
        mask: (N, L-1) bool, ``completion_mask[:, 1:]``: the tokens that are scored.
        entropy: (N, L-1) float32 entropy of the next-token distribution, or None. No grad.
        mean_logits: (N, L-1) float32 mean over the vocabulary of the next-token logits (what trl's
            ``logits/chosen`` averages), or None. No grad.
        is_top1: (N, L-1) bool, the target is the first argmax of the logits (trl's tie rule,
            kern:383: target >= max and > every earlier-index logit), or None.
        log_sum_sq_probs: (N, L-1) float32 ``log Σ_v p_v²`` (WPO's weight, Zhou et al. 2024, Eq. 2),
            or None. No grad.
    All optional statistics are 0 (False) where ``mask`` is False.
    """

    logps: torch.Tensor
    mask: torch.Tensor
    entropy: torch.Tensor | None = None
    mean_logits: torch.Tensor | None = None
    is_top1: torch.Tensor | None = None
    log_sum_sq_probs: torch.Tensor | None = None


def _check_grid(
    hidden_or_logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor, name: str
):
    """Raise ValueError unless ``name`` is (N, L, ·) and ids / completion mask are (N, L)."""
    if hidden_or_logits.dim() != 3:
        raise ValueError(f"{name} must be (N, L, ·), got shape {tuple(hidden_or_logits.shape)}")
    expected = tuple(hidden_or_logits.shape[:2])
    for field, t in (("input_ids", input_ids), ("completion_mask", mask)):
        if tuple(t.shape) != expected:
            raise ValueError(
                f"{field} has shape {tuple(t.shape)}; {name} needs (N, L) = {expected}"
            )


def _scatter(mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Put the (T,) ``values`` at the True positions of ``mask`` (N, L-1), zeros elsewhere."""
    return values.new_zeros(mask.shape).masked_scatter(mask, values)


def score_selected(
    selected: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    head: nn.Module,
    *,
    chunk_size: int = CHUNK_SIZE,
    with_stats: bool = False,
    with_wpo: bool = False,
    logit_transform: LogitTransform | None = None,
    keep_probs_bytes: int = KEEP_PROBS_BYTES,
) -> TokenLogps:
    """Score T gathered hidden states and lay the results out on the (N, L-1) grid of ``mask``.

    ``selected`` (T, H) are the hidden states that predict ``targets`` (T,), listed in the
    row-major order of the True entries of ``mask`` (N, L-1) bool. The plain path
    (``completion_token_logps``) and the prompt-sharing path (``dpo_core.packing``) differ only
    in where they gather ``selected`` from.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    logps, stats = selected_logps(
        selected,
        targets,
        head,
        transform=logit_transform,
        chunk_size=chunk_size,
        stats=with_stats or with_wpo,
        wpo=with_wpo,
        keep_probs_bytes=keep_probs_bytes,
    )
    on_grid = (
        {}
        if stats is None
        else {k: _scatter(mask, v) for k, v in stats._asdict().items() if v is not None}
    )
    return TokenLogps(logps=_scatter(mask, logps), mask=mask, **on_grid)


def completion_token_logps(
    hidden_states: torch.Tensor,
    head: nn.Module,
    input_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    chunk_size: int = CHUNK_SIZE,
    with_stats: bool = False,
    with_wpo: bool = False,
    logit_transform: LogitTransform | None = None,
    keep_probs_bytes: int = KEEP_PROBS_BYTES,
) -> TokenLogps:
    """Per-token completion log-probs from last hidden states, projecting completion tokens only.

    ``hidden_states[:, :-1]`` predicts ``input_ids[:, 1:]``; the positions where
    ``completion_mask[:, 1:]`` is 1 are gathered (T of them), projected with ``head`` in chunks of
    ``chunk_size`` tokens, ``log_softmax``-ed in float32 and scattered back to the (N, L-1) grid.

    Args:
        hidden_states: (N, L, H) last hidden states of the backbone.
        head: the LM head, any module (n, H) -> (n, V): nn.Linear, a peft LoRA Linear, a
            bitsandbytes Linear4bit...
        input_ids: (N, L) long token ids.
        completion_mask: (N, L), 1 on completion tokens (unshifted, as ``PreferenceBatch``).
        chunk_size: tokens projected at a time; bounds the float32 [chunk, V] logits block.
        with_stats: also return entropy, mean_logits and is_top1 (no grad).
        with_wpo: also return log_sum_sq_probs (no grad); implies computing the statistics.
        logit_transform: the model's logit scaling / softcap (``model_parts.logit_transform_from_config``).
        keep_probs_bytes: keep the (T, V) softmax from forward to backward up to this size
            (``dpo_core.lm_head``: 3 matmuls instead of 4); 0 recomputes it chunk by chunk.
    """
    _check_grid(hidden_states, input_ids, completion_mask, "hidden_states")
    mask = completion_mask[:, 1:].bool()
    return score_selected(
        hidden_states[:, :-1][mask],  # (T, H)
        input_ids[:, 1:][mask],  # (T,)
        mask,
        head,
        chunk_size=chunk_size,
        with_stats=with_stats,
        with_wpo=with_wpo,
        logit_transform=logit_transform,
        keep_probs_bytes=keep_probs_bytes,
    )


def token_logps_from_logits(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    with_stats: bool = False,
    with_wpo: bool = False,
) -> TokenLogps:
    """The plain computation from full logits (N, L, V): ``log_softmax`` in float32, then gather.

    This is the textbook definition the chunked path must reproduce; it materialises (N, L-1, V).
    Statistics use the textbook formulas: ``H = -Σ p log p``, ``mean = Σ z / V``,
    ``log Σ p² = logsumexp(2 log p)``, and trl's top-1 rule written out
    (``z_t >= max z`` and ``z_t > z_v`` for every ``v < t``, kern:383).
    """
    _check_grid(logits, input_ids, completion_mask, "logits")
    mask = completion_mask[:, 1:].bool()
    z = logits[:, :-1].float()  # (N, L-1, V)
    log_p = z.log_softmax(dim=-1)
    targets = input_ids[:, 1:].unsqueeze(-1)
    result = TokenLogps(log_p.gather(-1, targets).squeeze(-1).masked_fill(~mask, 0.0), mask)
    if with_stats or with_wpo:
        with torch.no_grad():
            z_target = z.gather(-1, targets)
            earlier = torch.arange(z.shape[-1], device=z.device) < targets
            max_earlier = z.masked_fill(~earlier, float("-inf")).amax(dim=-1, keepdim=True)
            is_top1 = (z_target >= z.amax(dim=-1, keepdim=True)) & (z_target > max_earlier)
            result.entropy = -(log_p.exp() * log_p).sum(dim=-1).masked_fill(~mask, 0.0)
            result.mean_logits = z.mean(dim=-1).masked_fill(~mask, 0.0)
            result.is_top1 = is_top1.squeeze(-1) & mask
            if with_wpo:
                log_sum_sq = torch.logsumexp(2 * log_p, dim=-1)
                result.log_sum_sq_probs = log_sum_sq.masked_fill(~mask, 0.0)
    return result


def model_token_logps(
    model: nn.Module,
    batch: PreferenceBatch,
    *,
    chunk_size: int = CHUNK_SIZE,
    with_stats: bool = False,
    with_wpo: bool = False,
    keep_probs_bytes: int = KEEP_PROBS_BYTES,
) -> TokenLogps:
    """Run the backbone on the batch and score its completion tokens with the model's LM head.

    ``model`` is a transformers causal LM, or a peft ``PeftModel`` around one (the adapters inside
    run, unless the caller is inside ``model.disable_adapter()``). Like trl (dpo:1285-1300), the
    call passes ``attention_mask`` and ``use_cache=False`` and no ``position_ids`` (0..L-1 for
    every row, consistent with right padding).
    """
    parts = model_parts(model)
    out = parts.backbone(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
    )
    head_device = next(parts.head.parameters()).device
    return completion_token_logps(
        out.last_hidden_state.to(head_device),
        parts.head,
        batch.input_ids.to(head_device),
        batch.completion_mask.to(head_device),
        chunk_size=chunk_size,
        with_stats=with_stats,
        with_wpo=with_wpo,
        logit_transform=parts.logit_transform,
        keep_probs_bytes=keep_probs_bytes,
    )


def sequence_logps(token: TokenLogps) -> torch.Tensor:
    """``Σ_t logps[n, t]``: each row's completion log-prob, (N, L-1) -> (N,). trl dpo:1302."""
    return token.logps.sum(dim=1)


def split_pairs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(2B, ...) rows ``[chosen_0..B-1, rejected_0..B-1]`` -> (chosen (B, ...), rejected (B, ...))."""
    if x.dim() == 0 or x.shape[0] % 2:
        raise ValueError(
            f"split_pairs needs an even first dimension (2B), got shape {tuple(x.shape)}"
        )
    chosen, rejected = x.chunk(2, dim=0)
    return chosen, rejected


def ld_sequence_logps(token: TokenLogps, ld_alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """LD-DPO's length-desensitised sums (Liu et al. 2024, Eq. 9), exactly as trl dpo:1303-1315.

    For pair i, ``shared_i = min(#chosen_i, #rejected_i)`` completion tokens counted on the
    shifted mask. Counting each row's completion tokens k = 1, 2, ... in order,
    ``logps = Σ_{k <= shared} logp_k + ld_alpha · Σ_{k > shared} logp_k``. Both rows of a pair
    share ``shared_i``, so the shorter one is a plain sum. Returns (chosen (B,), rejected (B,)).
    """
    position = token.mask.cumsum(dim=1)  # (2B, L-1): k of the k-th completion token
    chosen_len, rejected_len = split_pairs(token.mask.sum(dim=1))
    shared = torch.minimum(chosen_len, rejected_len).repeat(2).unsqueeze(1)  # (2B, 1)
    # trl's masks are ``0 < position <= shared`` and ``position > shared``; the latter also covers
    # pads after the completion, where logps are 0. ``& mask`` keeps the same values, scored tokens only.
    shared_part = (token.logps * ((position <= shared) & token.mask)).sum(dim=1)
    tail_part = (token.logps * ((position > shared) & token.mask)).sum(dim=1)
    return split_pairs(shared_part + ld_alpha * tail_part)


def completion_lengths(completion_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Completion token counts ``n`` of the unshifted mask, clamped to >= 1 (trl dpo:1399-1401).

    These are trl's ``n_c``, ``n_r`` for ``ipo`` and ``sigmoid_norm``: unlike the shifted mask they
    count a completion token at position 0, which has no predecessor and is not scored.
    (2B, L) -> (chosen (B,), rejected (B,)) long.
    """
    return split_pairs(completion_mask.sum(dim=1).clamp(min=1))
