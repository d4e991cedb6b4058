"""The log-prob entry: per-token and per-sequence log-probs of completions under a model.

DPO compares ``log π(y | x) = Σ_t log π(y_t | x, y_<t)``, summed over the completion tokens y
(Rafailov et al. 2023, "Direct Preference Optimization", Eq. 7). A causal LM's hidden state at
position t predicts token t+1, so with ``mask = completion_mask[:, 1:]`` the per-token grid is

    logps[n, t] = log softmax(head(hidden[n, t]))[input_ids[n, t + 1]]   where mask[n, t], else 0

on the (N, L-1) "shifted" grid, exactly as trl's fused LM head returns it (trl/trainer/utils.py:
1598-1696, zero where the label is -100). Unlike trl on CPU, which projects every position to the
vocabulary (kern:48-49), we project only the completion positions, in chunks, so the float32
``[chunk, V]`` logits block stays bounded (``dpo_core.lm_head``).

Training, the reference and evaluation all run this one path, read in this order::

    sequence_logps(model, batch, options)          # B pairs -> SequenceLogps (what the loss reads)
      token_logps(model, batch, options)           # N rows  -> TokenLogps (N, L-1)
        scored_states(...)                         # the hidden states that predict completions:
          plain_states: one padded forward         #   dpo_core.logps (here)
          packing.packed_states: prompt once       #   dpo_core.packing (a speed option)
        score_states(...)                          # head -> log-softmax -> the grid (lm_head)
      pair_logps(token, batch, ld_alpha)           # sums (LD-weighted), lengths

``options`` (``dpo_core.logp_types.LogpOptions``) is built once from the settings and carries
every choice: LD weighting, statistics, WPO, chunking, memory budget, prompt sharing.

Line references are to trl 1.16.0: ``kern`` = trl/kernels/chunked_logprob.py, ``dpo`` =
trl/trainer/dpo_trainer.py.
"""

from __future__ import annotations

import torch
from torch import nn

from dpo_core.batch import PreferenceBatch
from dpo_core.lm_head import selected_logps
from dpo_core.logp_types import (
    LogpOptions,
    ScoredStates,
    SequenceLogps,
    TokenLogps,
    TokenStats,
    split_pairs,
)
from dpo_core.model_parts import ModelParts, model_parts
from dpo_core.packing import packed_states
from dpo_core.router_aux import RouterSpec, load_balancing_loss, router_logits_of, router_spec

DEFAULT_OPTIONS = LogpOptions()  # frozen: safe to share as a default


def sequence_logps(
    model: nn.Module, batch: PreferenceBatch, options: LogpOptions = DEFAULT_OPTIONS
) -> SequenceLogps:
    """The B pairs' completion log-probs under ``model``: (chosen (B,), rejected (B,)) summed (or
    LD-weighted) from one forward, with the completion lengths and the per-token values.

    ``model`` is a transformers causal LM, or a peft ``PeftModel`` around one (the adapters run,
    unless the caller is inside ``model.disable_adapter()``)."""
    return pair_logps(token_logps(model, batch, options), batch, options.ld_alpha)


def token_logps(
    model: nn.Module, batch: PreferenceBatch, options: LogpOptions = DEFAULT_OPTIONS
) -> TokenLogps:
    """Per-token completion log-probs (N, L-1) of the N rows of ``batch`` (pairs or not; prompt
    sharing applies to pairs only), with the statistics ``options`` asks for."""
    parts = model_parts(model)
    return score_states(scored_states(model, parts, batch, options), parts, options)


def scored_states(
    model: nn.Module, parts: ModelParts, batch: PreferenceBatch, options: LogpOptions
) -> ScoredStates:
    """The hidden states of the completion positions: from packed rows when ``prompt_sharing``
    and packing can run and saves work (``dpo_core.packing``), else from the plain forward."""
    router = router_spec(model) if options.router_aux else None
    packed = (
        packed_states(model, parts, batch, options.padding_free, router)
        if options.prompt_sharing
        else None
    )
    return packed if packed is not None else plain_states(parts, batch, router)


def plain_states(
    parts: ModelParts, batch: PreferenceBatch, router: RouterSpec | None = None
) -> ScoredStates:
    """One forward of the padded rows, as trl's (dpo:1285-1300): ``attention_mask`` and
    ``use_cache=False``, no ``position_ids`` (0..L-1 for every row, right padding). With a
    ``router``, also its load-balancing loss over the real tokens (``dpo_core.router_aux``)."""
    extra = {"output_router_logits": True} if router else {}
    out = parts.backbone(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False, **extra
    )
    states = gather_completion_states(out.last_hidden_state, batch.input_ids, batch.completion_mask)
    if router:
        weights = batch.attention_mask.reshape(-1)
        states.aux_loss = load_balancing_loss(router_logits_of(out), weights, router)
    return states


def gather_completion_states(
    hidden_states: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor
) -> ScoredStates:
    """``hidden_states[:, :-1]`` (N, L-1, H) predicts ``input_ids[:, 1:]``; keep the T positions
    where ``completion_mask[:, 1:]`` is 1. ``completion_mask`` is unshifted (N, L)."""
    _check_grid(hidden_states, input_ids, completion_mask)
    device = hidden_states.device  # a model split over devices returns them on its last one
    mask = completion_mask[:, 1:].to(device).bool()
    return ScoredStates(
        hidden=hidden_states[:, :-1][mask],  # (T, H)
        targets=input_ids[:, 1:].to(device)[mask],  # (T,)
        mask=mask,
    )


def score_states(states: ScoredStates, parts: ModelParts, options: LogpOptions) -> TokenLogps:
    """Project the T states with the LM head (after any module the model runs between backbone
    and head, with the model's own logit transform), ``log_softmax`` in float32, and lay
    log-probs and statistics out on the (N, L-1) grid."""
    weight = next(parts.head.parameters(), None)  # a model split over devices: the head's own
    states = states if weight is None else states.to(weight.device)
    logps, stats = selected_logps(
        parts.project(states.hidden), states.targets, parts.head, parts.logit_transform, options
    )
    if stats is not None:
        stats = TokenStats(*(None if v is None else _scatter(states.mask, v) for v in stats))
    return TokenLogps(_scatter(states.mask, logps), states.mask, stats, states.aux_loss)


def pair_logps(token: TokenLogps, batch: PreferenceBatch, ld_alpha: float | None) -> SequenceLogps:
    """(2B, L-1) per-token values -> the pairs' sums (LD-weighted when ``ld_alpha``), lengths."""
    chosen, rejected = (
        split_pairs(token.row_sums()) if ld_alpha is None else ld_sums(token, ld_alpha)
    )
    n_c, n_r = completion_lengths(batch.completion_mask.to(token.mask.device))
    return SequenceLogps(chosen, rejected, n_c, n_r, token)


def ld_sums(token: TokenLogps, ld_alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
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


def _check_grid(hidden_states: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor):
    """Raise ValueError unless hidden states are (N, L, H) and ids / completion mask (N, L)."""
    if hidden_states.dim() != 3:
        raise ValueError(f"hidden_states must be (N, L, H), got shape {tuple(hidden_states.shape)}")
    expected = tuple(hidden_states.shape[:2])
    for field, t in (("input_ids", input_ids), ("completion_mask", mask)):
        if tuple(t.shape) != expected:
            raise ValueError(
                f"{field} has shape {tuple(t.shape)}; hidden_states need (N, L) = {expected}"
            )


def _scatter(mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Put the (T,) ``values`` at the True positions of ``mask`` (N, L-1), zeros elsewhere."""
    return values.new_zeros(mask.shape).masked_scatter(mask, values)
