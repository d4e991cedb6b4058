"""dpo_core.lm_head: the custom head Function, with kept or recomputed probabilities."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dpo_core.lm_head as lm_head
from dpo_core.lm_head import selected_logps

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


@pytest.mark.parametrize("keep_probs_bytes", [0, lm_head.KEEP_PROBS_BYTES])
@pytest.mark.parametrize("chunk_size", [1, 5, 64])
def test_kept_and_recomputed_probabilities_equal_the_textbook(keep_probs_bytes, chunk_size):
    h, targets, head = problem()
    tensors = [h, *head.parameters()]
    got = selected_logps(
        h, targets, head, chunk_size=chunk_size, stats=True, keep_probs_bytes=keep_probs_bytes
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
    logps, _ = selected_logps(h, targets, head, chunk_size=10, keep_probs_bytes=keep_probs_bytes)
    forward = len(calls)
    logps.sum().backward()
    assert forward == 3
    assert len(calls) - forward == backward_projections


def test_probabilities_kept_up_to_the_budget(monkeypatch):
    """T·V·4 bytes = 23·50·4 = 4,600: kept with a budget of 4,600, recomputed with 4,599."""
    h, targets, head = problem()
    for budget, recomputed in ((4600, 0), (4599, 3)):
        calls = count_projections(monkeypatch)
        selected_logps(h, targets, head, chunk_size=10, keep_probs_bytes=budget)[0].sum().backward()
        assert len(calls) - 3 == recomputed
        monkeypatch.undo()


def test_statistics_carry_no_gradient_and_need_no_graph():
    h, targets, head = problem()
    _, stats = selected_logps(h, targets, head, chunk_size=7, stats=True, wpo=True)
    for value in stats:
        assert value is not None and not value.requires_grad
    with torch.no_grad():  # the plain path (no graph): same statistics
        _, plain = selected_logps(h, targets, head, chunk_size=7, stats=True, wpo=True)
    for a, b in zip(stats, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=0.0, atol=4e-6)


def test_no_tokens():
    h, targets, head = problem(tokens=0)
    logps, stats = selected_logps(h, targets, head, stats=True)
    assert logps.shape == (0,) and stats.entropy.shape == (0,)
    logps.sum().backward()
    assert torch.equal(head.weight.grad, torch.zeros_like(head.weight))
