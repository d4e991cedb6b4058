"""Log-probabilities of completion tokens, projected to the vocabulary only where they are needed.

DPO compares ``log π(y | x) = Σ_t log π(y_t | x, y_<t)``, summed over the completion tokens y
(Rafailov et al. 2023, "Direct Preference Optimization", Eq. 7). A causal LM's hidden state at
position t predicts token t+1, so with ``mask = completion_mask[:, 1:]`` the per-token grid is

    logps[n, t] = log softmax(head(hidden[n, t]))[input_ids[n, t + 1]]   where mask[n, t], else 0

on the (N, L-1) "shifted" grid, exactly as trl's fused LM head returns it (trl/trainer/utils.py:
1598-1696, zero where the label is -100). Unlike trl on CPU, which projects every position to the
vocabulary (kern:48-49), we project only the completion positions, in chunks of ``chunk_size``
tokens, so the float32 ``[chunk, V]`` logits block stays bounded; backward recomputes a chunk's
logits instead of keeping them alive.

Reading order: ``TokenLogps`` -> ``completion_token_logps`` -> ``model_token_logps`` ->
``sequence_logps`` / ``ld_sequence_logps``. ``token_logps_from_logits`` is the plain full-logits
computation the chunked one must equal.

Line references are to trl 1.16.0: ``kern`` = trl/kernels/chunked_logprob.py, ``dpo`` =
trl/trainer/dpo_trainer.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from dpo_core.batch import PreferenceBatch
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


class _Stats(NamedTuple):
    """No-grad statistics of the selected tokens, each (T,) or None when not requested."""

    entropy: torch.Tensor | None
    mean_logits: torch.Tensor | None
    is_top1: torch.Tensor | None
    log_sum_sq_probs: torch.Tensor | None


def _target_logps(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(z[target] - log Z, log Z)`` with ``log Z = logsumexp(z)``; logits (n, V) float32 -> (n,), (n,).

    ``torch.logsumexp`` is ``max + log Σ exp(z - max)``, the same expression trl's kernel folds
    (kern:378-379), so the two agree to the last bit or so.
    """
    log_z = torch.logsumexp(logits, dim=-1)
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - log_z, log_z


@torch.no_grad()
def _logit_stats(logits: torch.Tensor, targets: torch.Tensor, wpo: bool) -> _Stats:
    """Entropy, mean logit, top-1 and (if ``wpo``) ``log Σ p²`` of logits (n, V) float32, as trl's kernel.

    With ``e = exp(z - max z)`` and ``s = Σ e`` (kern:211-254 folds these, kern:378-383):
    ``H = log Z - Σ e·z / s``, ``mean = Σ z / V``, ``log Σ p² = log Σ e² - 2 log s``.
    ``is_top1`` is ``argmax == target``: torch's argmax returns the first maximum, which is
    trl's rule ``z_t >= max and z_t > max_{v < t} z_v`` (kern:383).
    """
    z_max = logits.amax(dim=-1, keepdim=True)
    e = torch.exp(logits - z_max)
    s = e.sum(dim=-1)
    log_z = z_max.squeeze(-1) + torch.log(s)
    entropy = log_z - (e * logits).sum(dim=-1) / s
    log_sum_sq = torch.log((e * e).sum(dim=-1)) - 2 * torch.log(s) if wpo else None
    mean_logits = logits.sum(dim=-1) / logits.shape[-1]
    return _Stats(entropy, mean_logits, logits.argmax(dim=-1) == targets, log_sum_sq)


def _project(
    head: nn.Module, hidden: torch.Tensor, transform: LogitTransform | None
) -> torch.Tensor:
    """``head(hidden)`` as float32 logits (n, V), then the model's own logit transform if any."""
    logits = head(hidden).float()
    return logits if transform is None else transform(logits)


def _concat_stats(chunks: list[_Stats]) -> _Stats:
    """Join per-chunk statistics along the token dimension."""
    return _Stats(*(None if parts[0] is None else torch.cat(parts) for parts in zip(*chunks)))


class _LinearHeadLogps(torch.autograd.Function):
    """``log softmax(h Wᵀ + b)[target]`` for an nn.Linear head, chunked over tokens.

    Forward keeps only ``log Z`` (T,) per token. Backward recomputes each chunk's logits and uses
    the closed-form gradient ``∂ log p_t / ∂z = onehot(t) - softmax(z)``: with ``G = g·(onehot - p)``
    (n, V), ``grad_h = G W``, ``grad_W = Σ_chunks Gᵀ h``, ``grad_b = Σ_rows G``. One [n, V] block
    is alive at a time, in both directions.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size: int, stats: bool, wpo: bool):
        logps, log_z, chunk_stats = [], [], []
        for h, t in zip(hidden.split(chunk_size), targets.split(chunk_size)):
            logits = F.linear(h, weight, bias)
            lp, lz = _target_logps(logits, t)
            logps.append(lp)
            log_z.append(lz)
            if stats:
                chunk_stats.append(_logit_stats(logits, t, wpo))
        ctx.save_for_backward(hidden, weight, bias, targets, torch.cat(log_z))
        ctx.chunk_size = chunk_size
        ctx.set_materialize_grads(False)
        out_stats = _concat_stats(chunk_stats) if stats else _Stats(None, None, None, None)
        ctx.mark_non_differentiable(*(s for s in out_stats if s is not None))
        return torch.cat(logps), *out_stats

    @staticmethod
    def backward(ctx, grad_logps, *_unused_stat_grads):
        hidden, weight, bias, targets, log_z = ctx.saved_tensors
        needs_h, needs_w, needs_b = ctx.needs_input_grad[:3]
        if grad_logps is None:
            return None, None, None, None, None, None, None
        grad_h = torch.empty_like(hidden) if needs_h else None
        grad_w = torch.zeros_like(weight) if needs_w else None
        grad_b = torch.zeros_like(bias) if needs_b and bias is not None else None
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            h, g = hidden[rows], grad_logps[rows].unsqueeze(-1)
            logits = F.linear(h, weight, bias)  # (n, V), recomputed
            grad_logits = logits.sub_(log_z[rows].unsqueeze(-1)).exp_().mul_(-g)  # -g * p
            grad_logits.scatter_add_(1, targets[rows].unsqueeze(-1), g)  # + g * onehot
            if grad_h is not None:
                torch.mm(grad_logits, weight, out=grad_h[rows])
            if grad_w is not None:
                grad_w.addmm_(grad_logits.t(), h)
            if grad_b is not None:
                grad_b.add_(grad_logits.sum(dim=0))
        return grad_h, grad_w, grad_b, None, None, None, None


def _checkpointed_chunk(
    head: nn.Module,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    transform: LogitTransform | None,
    stats: bool,
    wpo: bool,
) -> tuple[torch.Tensor, _Stats | None]:
    """One chunk through any head under activation checkpointing: backward reruns the head."""
    computed: list[_Stats] = []

    def run(h: torch.Tensor) -> torch.Tensor:
        logits = _project(head, h, transform)
        if stats and not computed:  # the rerun in backward skips the statistics
            computed.append(_logit_stats(logits.detach(), targets, wpo))
        return _target_logps(logits, targets)[0]

    logps = checkpoint(run, hidden, use_reentrant=False)
    return logps, (computed[0] if computed else None)


def _uses_linear_kernel(head: nn.Module, hidden: torch.Tensor, transform) -> bool:
    """The custom Function covers a plain float32 nn.Linear with no logit transform or autocast."""
    return (
        type(head) is nn.Linear
        and transform is None
        and hidden.dtype == head.weight.dtype == torch.float32
        and not torch.is_autocast_enabled(hidden.device.type)
    )


def _selected_logps(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    head: nn.Module,
    transform: LogitTransform | None,
    chunk_size: int,
    stats: bool,
    wpo: bool,
) -> tuple[torch.Tensor, _Stats | None]:
    """Log-probs (T,) and statistics of T selected hidden states (T, H) with targets (T,)."""
    grad = torch.is_grad_enabled()
    # The custom Function keeps no [T, V] block for backward, so it serves even one chunk
    if grad and _uses_linear_kernel(head, hidden, transform):
        logps, *rest = _LinearHeadLogps.apply(
            hidden, head.weight, head.bias, targets, chunk_size, stats, wpo
        )
        return logps, (_Stats(*rest) if stats else None)
    logps, chunk_stats = [], []
    for h, t in zip(hidden.split(chunk_size), targets.split(chunk_size)):
        if grad and hidden.shape[0] > chunk_size:
            lp, st = _checkpointed_chunk(head, h, t, transform, stats, wpo)
        else:  # one chunk, or no graph to keep: compute plainly
            logits = _project(head, h, transform)
            lp = _target_logps(logits, t)[0]
            st = _logit_stats(logits.detach(), t, wpo) if stats else None
        logps.append(lp)
        chunk_stats.append(st)
    return torch.cat(logps), (_concat_stats(chunk_stats) if stats else None)


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


def completion_token_logps(
    hidden_states: torch.Tensor,
    head: nn.Module,
    input_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    chunk_size: int = 1024,
    with_stats: bool = False,
    with_wpo: bool = False,
    logit_transform: LogitTransform | None = None,
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
    """
    _check_grid(hidden_states, input_ids, completion_mask, "hidden_states")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    mask = completion_mask[:, 1:].bool()
    selected = hidden_states[:, :-1][mask]  # (T, H)
    targets = input_ids[:, 1:][mask]  # (T,)
    stats_wanted = with_stats or with_wpo
    logps, stats = _selected_logps(
        selected, targets, head, logit_transform, chunk_size, stats_wanted, with_wpo
    )
    on_grid = (
        {}
        if stats is None
        else {k: _scatter(mask, v) for k, v in stats._asdict().items() if v is not None}
    )
    return TokenLogps(logps=_scatter(mask, logps), mask=mask, **on_grid)


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
    chunk_size: int = 1024,
    with_stats: bool = False,
    with_wpo: bool = False,
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
