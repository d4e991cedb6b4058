"""dpo_core.lm_head: the custom head Function, with kept or recomputed probabilities."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dpo_core.lm_head as lm_head
from dpo_core.lm_head import selected_logps
from dpo_core.logp_types import KEEP_PROBS_BYTES, LogpOptions

torch.set_num_threads(1)

# Same bounds as tests/dpo_core/test_logps.py: log-probs O(log V) agree to a few float32 ulp;
# gradients sum per-chunk contributions in another order (relative error ~ T·eps).
VALUE_TOL = dict(rtol=0.0, atol=4e-6)
GRAD_TOL = dict(rtol=2e-5, atol=2e-6)


def problem(tokens: int = 23, hidden: int = 12, vocab: int = 50, bias: bool = True):
    torch.manual_seed(0)
    head = nn.Linear(hidden, vocab, bias=bias)
    h = (torch.randn(tokens, hidden) * 3).requires_grad_(True)
    return h, torch.randint(0, vocab, (tokens,)), head


def textbook(h, targets, head):
    """``log_softmax(h Wᵀ + b)[target]`` on the whole (T, V) matrix."""
    return head(h).log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def value_and_grads(logps, tensors):
    w = torch.rand(logps.shape, generator=torch.Generator().manual_seed(3))
    return logps.detach(), torch.autograd.grad((logps * w).sum(), tensors)


@pytest.mark.parametrize("keep_probs_bytes", [0, KEEP_PROBS_BYTES])
@pytest.mark.parametrize("chunk_size", [1, 5, 64])
def test_kept_and_recomputed_probabilities_equal_the_textbook(keep_probs_bytes, chunk_size):
    h, targets, head = problem()
    tensors = [h, *head.parameters()]
    got = selected_logps(
        h,
        targets,
        head,
        None,
        LogpOptions(chunk_size=chunk_size, stats=True, keep_probs_bytes=keep_probs_bytes),
    )[0]
    (got_value, got_grads), (want_value, want_grads) = (
        value_and_grads(got, tensors),
        value_and_grads(textbook(h, targets, head), tensors),
    )
    torch.testing.assert_close(got_value, want_value, **VALUE_TOL)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, **GRAD_TOL)


def count_projections(monkeypatch) -> list[int]:
    """A list that grows by one at every F.linear (vocabulary projection) the head makes."""
    calls: list[int] = []
    real = lm_head.F.linear

    def counting(x, w, b=None):
        calls.append(x.shape[0])
        return real(x, w, b)

    monkeypatch.setattr(lm_head.F, "linear", counting)
    return calls


@pytest.mark.parametrize(("keep_probs_bytes", "backward_projections"), [(2**30, 0), (0, 3)])
def test_backward_recomputes_logits_only_when_probabilities_are_not_kept(
    monkeypatch, keep_probs_bytes, backward_projections
):
    """23 tokens in chunks of 10: 3 forward projections; backward reprojects 3 chunks only when
    the (T, V) probabilities were not kept (3 matmuls in all per chunk instead of 4)."""
    h, targets, head = problem()
    calls = count_projections(monkeypatch)
    logps, _ = selected_logps(
        h, targets, head, None, LogpOptions(chunk_size=10, keep_probs_bytes=keep_probs_bytes)
    )
    forward = len(calls)
    logps.sum().backward()
    assert forward == 3
    assert len(calls) - forward == backward_projections


def test_probabilities_kept_up_to_the_budget(monkeypatch):
    """T·V·4 bytes = 23·50·4 = 4,600: kept with a budget of 4,600, recomputed with 4,599."""
    h, targets, head = problem()
    for budget, recomputed in ((4600, 0), (4599, 3)):
        calls = count_projections(monkeypatch)
        selected_logps(h, targets, head, None, LogpOptions(chunk_size=10, keep_probs_bytes=budget))[
            0
        ].sum().backward()
        assert len(calls) - 3 == recomputed
        monkeypatch.undo()


def test_statistics_carry_no_gradient_and_need_no_graph():
    h, targets, head = problem()
    _, stats = selected_logps(
        h, targets, head, None, LogpOptions(chunk_size=7, stats=True, wpo=True)
    )
    for value in stats:
        assert value is not None and not value.requires_grad
    with torch.no_grad():  # the plain path (no graph): same statistics
        _, plain = selected_logps(
            h, targets, head, None, LogpOptions(chunk_size=7, stats=True, wpo=True)
        )
    for a, b in zip(stats, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=0.0, atol=4e-6)


def test_no_tokens():
    h, targets, head = problem(tokens=0)
    logps, stats = selected_logps(h, targets, head, None, LogpOptions(stats=True))
    assert logps.shape == (0,) and stats.entropy.shape == (0,)
    logps.sum().backward()
    assert torch.equal(head.weight.grad, torch.zeros_like(head.weight))


def float64_head(h, targets, head, weights, bf16: bool):
    """Log-probs, the gradients of ``Σ weights · logps`` in float64 on the CPU (closed form,
    module docstring of ``dpo_core.lm_head``). ``bf16``: the roundings trl's kernel makes under
    autocast: operands and the product ``h Wᵀ`` to bf16, the bias added in bf16, ∂L/∂z to bf16.
    Also returns the largest |logit|."""

    def r(x):  # round to bf16 where autocast does
        return x.to(torch.bfloat16).double() if bf16 else x.double()

    h64, w64, b64 = r(h), r(head.weight.detach()), r(head.bias.detach())
    z = r(r(h64 @ w64.T) + b64)  # (T, V)
    log_p = z.log_softmax(-1)
    logps = log_p.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    onehot = torch.nn.functional.one_hot(targets, z.shape[1]).double()
    dz = r(weights.double().unsqueeze(-1) * (onehot - log_p.exp()))
    return logps, (dz @ w64, dz.T @ h64, dz.sum(0)), z.abs().max().item()


@pytest.mark.parametrize("keep_probs_bytes", [0, KEEP_PROBS_BYTES])
def test_under_bf16_autocast_the_head_rounds_where_trl_does(keep_probs_bytes):
    """Under bf16 autocast the head takes the bf16 product, widens it, and keeps every gradient
    product in float32 from bf16-rounded operands (rounding each product to bf16, as plain
    autograd does, moves grad_h by ~2^-9 relative: trl's step-1 grad_norm then differs 1e-4).
    Against a float64 twin of those roundings: values within float32 log-softmax rounding;
    gradients within float32 sums of T or V terms (relative T·eps at worst)."""
    h, targets, head = problem()
    g = torch.rand(h.shape[0], generator=torch.Generator().manual_seed(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logps, _ = selected_logps(
            h, targets, head, None, LogpOptions(chunk_size=5, keep_probs_bytes=keep_probs_bytes)
        )
    grads = torch.autograd.grad((logps * g).sum(), [h, head.weight, head.bias])
    want_logps, want_grads, _ = float64_head(h.detach(), targets, head, g, bf16=True)
    assert logps.dtype == torch.float32 and all(x.dtype == torch.float32 for x in grads)
    torch.testing.assert_close(logps.double(), want_logps, **VALUE_TOL)
    for got, want in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(got.double(), want, **GRAD_TOL)


def test_under_bf16_autocast_the_head_equals_trls_kernel():
    """The same logits and per-token log-probs as trl 1.16's chunked kernel under autocast, and
    the same gradients: both round the product to bf16 once and sum the gradient products in
    float32 (in another order: float32 sums of V or T terms)."""
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    h, targets, head = problem(bias=False)
    g = torch.rand(h.shape[0], generator=torch.Generator().manual_seed(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, _ = selected_logps(h, targets, head, None, LogpOptions(chunk_size=5))
        theirs = ChunkedLogProbFunction.apply(h, head.weight, None, targets, 1.0, 16)[0]
    got = torch.autograd.grad((ours * g).sum(), [h, head.weight])
    want = torch.autograd.grad((theirs * g).sum(), [h, head.weight])
    torch.testing.assert_close(ours, theirs, **VALUE_TOL)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, **GRAD_TOL)
