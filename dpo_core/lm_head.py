"""The LM head on T selected hidden states: ``log softmax(head(h))[target]`` in float32, chunked.

``dpo_core.logps`` gathers the hidden states of the scored (completion) positions, T of them, and
calls ``selected_logps``; this module does the projection to the vocabulary and its backward.

For a plain float32 ``nn.Linear`` head (the common case) a custom autograd Function does the
minimum work. With ``z = h Wᵀ + b`` (n, V), ``p = softmax(z)`` and ``g = ∂L/∂ log p_target``:

    ∂L/∂z = g · (onehot(target) - p)                         (closed form of the log-softmax)
    grad_h = (∂L/∂z) W,   grad_W = (∂L/∂z)ᵀ h,   grad_b = Σ_rows ∂L/∂z

Forward needs ``exp(z - max z)`` anyway (for log Z and for the statistics); when the (T, V)
float32 probabilities fit in ``keep_probs_bytes``, forward keeps them and backward is two matmuls
(3 in all: the forward projection, grad_h, grad_W). Otherwise forward keeps only ``log Z`` (T,)
and backward recomputes each chunk's logits (4 matmuls), so one [chunk, V] block is alive at a
time. Any other head (LoRA, 4-bit, a logit softcap) runs through plain autograd, each chunk
under activation checkpointing.

Under autocast (``bf16-mixed``) the Function rounds where trl's kernel does: the product
``h Wᵀ`` is taken in bf16 and rounded once, everything after it (log Z, the statistics, ∂L/∂z) is
float32, ∂L/∂z is rounded to bf16, and the two gradient products are float32 sums of those
rounded operands. Plain autograd would round each gradient product to bf16 as well (2^-9
relative in grad_h), which trl avoids because it biases training (kern:52-58).

The metric-only statistics (entropy, mean logit, top-1, WPO's ``log Σ p²``) are computed from the
same block, without gradient, and only for the selected tokens.

``kern:N`` are lines of trl 1.16.0's trl/kernels/chunked_logprob.py.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from dpo_core.logit_transforms import LogitTransform
from dpo_core.logp_types import NO_STATS, LogpOptions, TokenStats


class _KernelPlan(NamedTuple):
    """The non-tensor arguments of ``_LinearHeadLogps``: chunking, statistics, whether to keep
    the (T, V) softmax for backward, and the autocast dtype (None: float32 throughout)."""

    chunk_size: int
    stats: bool
    wpo: bool
    keep_probs: bool
    compute: torch.dtype | None


def _softmax_parts(logits: torch.Tensor, out: torch.Tensor | None = None):
    """``(e, s, log_z)`` of logits (n, V): ``e = exp(z - max z)`` (n, V) written into ``out`` when
    given, ``s = Σ e`` (n,), ``log Z = max z + log s`` (n,).

    This is the expression ``torch.logsumexp`` evaluates (max, subtract, exp, sum, log, add) and
    the one trl's kernel folds (kern:378-379), so log Z agrees to the last bit or so.
    """
    z_max = logits.amax(dim=-1, keepdim=True)
    e = torch.sub(logits, z_max, out=out).exp_()
    s = e.sum(dim=-1)
    return e, s, z_max.squeeze(-1) + torch.log(s)


@torch.no_grad()
def _stats_from_parts(logits, e, s, log_z, targets, wpo: bool) -> TokenStats:
    """Entropy, mean logit, top-1 and (if ``wpo``) ``log Σ p²`` from ``_softmax_parts``.

    ``H = log Z - Σ e·z / s``, ``mean = Σ z / V``, ``log Σ p² = log Σ e² - 2 log s``.
    ``is_top1`` is ``argmax == target``: torch's argmax returns the first maximum, which is
    trl's rule ``z_t >= max and z_t > max_{v < t} z_v`` (kern:383).
    """
    entropy = log_z - (e * logits).sum(dim=-1) / s
    log_sum_sq = torch.log((e * e).sum(dim=-1)) - 2 * torch.log(s) if wpo else None
    mean_logits = logits.sum(dim=-1) / logits.shape[-1]
    return TokenStats(entropy, mean_logits, logits.argmax(dim=-1) == targets, log_sum_sq)


def _target_logp(logits: torch.Tensor, targets: torch.Tensor, log_z: torch.Tensor) -> torch.Tensor:
    """``z[target] - log Z`` (n,)."""
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - log_z


def logit_stats(logits: torch.Tensor, targets: torch.Tensor, wpo: bool) -> TokenStats:
    """The no-grad statistics of logits (n, V) float32 with targets (n,), as trl's kernel."""
    with torch.no_grad():
        e, s, log_z = _softmax_parts(logits)
        return _stats_from_parts(logits, e, s, log_z, targets, wpo)


def _concat_stats(chunks: list[TokenStats]) -> TokenStats:
    """Join per-chunk statistics along the token dimension."""
    return TokenStats(*(None if parts[0] is None else torch.cat(parts) for parts in zip(*chunks)))


def _chunks(num_rows: int, chunk_size: int) -> list[slice]:
    """Row slices of ``chunk_size``; one (empty) slice when there are no rows."""
    return [slice(i, i + chunk_size) for i in range(0, max(num_rows, 1), chunk_size)]


class _LinearHeadLogps(torch.autograd.Function):
    """``log softmax(h Wᵀ + b)[target]`` (T,) for an nn.Linear head, chunked over tokens.

    See the module docstring for the gradient. ``probs`` (T, V) is kept from forward when
    ``keep_probs``; otherwise backward recomputes each chunk's softmax from ``log Z``.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, plan: _KernelPlan):
        chunk_size, stats, wpo, keep_probs, compute = plan
        probs = hidden.new_empty(hidden.shape[0], weight.shape[0]) if keep_probs else None
        logps, log_zs, chunk_stats = [], [], []
        w, b = _rounded(weight, compute), _rounded(bias, compute)
        for rows in _chunks(hidden.shape[0], chunk_size):
            logits = _logits(hidden[rows], w, b, compute)  # (n, V) float32
            e, s, log_z = _softmax_parts(logits, out=None if probs is None else probs[rows])
            logps.append(_target_logp(logits, targets[rows], log_z))
            log_zs.append(log_z)
            if stats:
                chunk_stats.append(_stats_from_parts(logits, e, s, log_z, targets[rows], wpo))
            if probs is not None:
                e.div_(s.unsqueeze(-1))  # now softmax(z), in place inside ``probs``
        ctx.save_for_backward(hidden, weight, bias, targets, torch.cat(log_zs), probs)
        ctx.chunk_size, ctx.compute = chunk_size, compute
        ctx.set_materialize_grads(False)
        out_stats = _concat_stats(chunk_stats) if stats else NO_STATS
        ctx.mark_non_differentiable(*(s for s in out_stats if s is not None))
        return torch.cat(logps), *out_stats

    @staticmethod
    def backward(ctx, grad_logps, *_unused_stat_grads):
        hidden, weight, bias, targets, log_z, probs = ctx.saved_tensors
        needs_h, needs_w, needs_b = ctx.needs_input_grad[:3]
        if grad_logps is None:
            return (None,) * 5
        compute = ctx.compute
        w, b = _rounded(weight, compute), _rounded(bias, compute)
        w32 = w if compute is None else w.float()  # the rounded weight, products in float32
        grad_h = torch.empty_like(hidden) if needs_h else None
        grad_w = torch.zeros_like(weight) if needs_w else None
        grad_b = torch.zeros_like(bias) if needs_b and bias is not None else None
        for rows in _chunks(hidden.shape[0], ctx.chunk_size):
            h, g = hidden[rows], grad_logps[rows].unsqueeze(-1)
            if probs is not None:
                grad_logits = probs[rows].mul(-g)  # -g * p
            else:  # recompute p = exp(z - log Z) from the chunk's logits
                logits = _logits(h, w, b, compute)
                grad_logits = logits.sub_(log_z[rows].unsqueeze(-1)).exp_().mul_(-g)
            grad_logits.scatter_add_(1, targets[rows].unsqueeze(-1), g)  # + g * onehot
            if compute is not None:  # trl stores ∂L/∂z in the compute dtype (kern:297)
                grad_logits = grad_logits.to(compute).float()
                h = h.to(compute).float()
            if grad_h is not None:
                grad_h[rows] = grad_logits @ w32
            if grad_w is not None:
                grad_w.addmm_(grad_logits.t(), h)
            if grad_b is not None:
                grad_b.add_(grad_logits.sum(dim=0))
        return grad_h, grad_w, grad_b, None, None


def _rounded(t: torch.Tensor | None, compute: torch.dtype | None) -> torch.Tensor | None:
    """``t`` rounded to the autocast dtype ``compute`` (None: unchanged)."""
    return t if t is None or compute is None else t.to(compute)


def _logits(h: torch.Tensor, w: torch.Tensor, b, compute: torch.dtype | None) -> torch.Tensor:
    """``h Wᵀ + b`` (n, V) float32. Under autocast (``compute`` = bf16/fp16, ``w``/``b`` already
    rounded to it) the product is taken in ``compute``, rounded once, the bias added in
    ``compute``, then widened: exactly trl's tile (kern:352-358), so both see the same logits."""
    if compute is None:
        return F.linear(h, w, b)
    with torch.autocast(h.device.type, enabled=False):
        z = h.to(compute) @ w.t()
        return (z if b is None else z.add_(b)).float()


def _project(
    head: nn.Module, hidden: torch.Tensor, transform: LogitTransform | None
) -> torch.Tensor:
    """``head(hidden)`` as float32 logits (n, V), then the model's own logit transform if any."""
    logits = head(hidden).float()
    return logits if transform is None else transform(logits)


def _plain_chunk(head, hidden, targets, transform, stats: bool, wpo: bool):
    """One chunk through any head with plain autograd: (logps (n,), statistics or None)."""
    logits = _project(head, hidden, transform)
    log_z = torch.logsumexp(logits, dim=-1)
    return _target_logp(logits, targets, log_z), (
        logit_stats(logits.detach(), targets, wpo) if stats else None
    )


def _checkpointed_chunk(head, hidden, targets, transform, stats: bool, wpo: bool):
    """One chunk through any head under activation checkpointing: backward reruns the head."""
    computed: list[TokenStats] = []

    def run(h: torch.Tensor) -> torch.Tensor:
        logps, chunk_stats = _plain_chunk(head, h, targets, transform, stats and not computed, wpo)
        if chunk_stats is not None:  # the rerun in backward skips the statistics
            computed.append(chunk_stats)
        return logps

    logps = checkpoint(run, hidden, use_reentrant=False)
    return logps, (computed[0] if computed else None)


def uses_linear_kernel(head: nn.Module, hidden_dtype: torch.dtype, transform) -> bool:
    """Whether the custom Function runs: a plain float32 nn.Linear head on float32 hidden
    states, with no logit transform (else plain autograd, chunk by chunk)."""
    return (
        type(head) is nn.Linear
        and transform is None
        and hidden_dtype == head.weight.dtype == torch.float32
    )


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast computes matrix products in on ``device``, or None when it is off."""
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None


def selected_logps(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    head: nn.Module,
    transform: LogitTransform | None,
    options: LogpOptions,
) -> tuple[torch.Tensor, TokenStats | None]:
    """Log-probs (T,) and statistics of T selected hidden states (T, H) with targets (T,).

    Args:
        hidden: (T, H) hidden states, each predicting the token in ``targets``.
        targets: (T,) long.
        head: any module (n, H) -> (n, V).
        transform: the model's logit scaling / softcap, or None.
        options: ``chunk_size`` (bounds each float32 [chunk, V] block), ``stats`` / ``wpo`` (the
            no-grad ``TokenStats``; ``wpo`` adds ``log Σ p²``), ``keep_probs_bytes`` (keep the
            (T, V) softmax for backward up to this size; plain float32 Linear head only).
    """
    chunk_size, stats, wpo = options.chunk_size, options.any_stats, options.wpo
    if torch.is_grad_enabled() and uses_linear_kernel(head, hidden.dtype, transform):
        keep = hidden.shape[0] * head.weight.shape[0] * 4 <= options.keep_probs_bytes
        plan = _KernelPlan(chunk_size, stats, wpo, keep, _autocast_dtype(hidden.device))
        logps, *rest = _LinearHeadLogps.apply(hidden, head.weight, head.bias, targets, plan)
        return logps, (TokenStats(*rest) if stats else None)
    chunked = torch.is_grad_enabled() and hidden.shape[0] > chunk_size
    run = _checkpointed_chunk if chunked else _plain_chunk  # one chunk, or no graph to keep
    logps, chunk_stats = [], []
    for h, t in zip(hidden.split(chunk_size), targets.split(chunk_size)):
        lp, st = run(head, h, t, transform, stats, wpo)
        logps.append(lp)
        chunk_stats.append(st)
    return torch.cat(logps), (_concat_stats(chunk_stats) if stats else None)
