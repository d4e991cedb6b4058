"""Properties of dpo_core.logps over random shapes, masks, chunk sizes and paddings (hypothesis)."""

from __future__ import annotations

import dataclasses
import functools

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dpo_core.logp_types import split_pairs
from dpo_core.logps import ld_sums
from tests.dpo_core.oracle import plain_token_logps, score_hidden, token_logps_from_logits
from tests.dpo_core.tiny import GRAD_TOL, VALUE_TOL, make_batch, softcap, tiny_llama

torch.set_num_threads(1)
FAST = settings(max_examples=30, deadline=None)


@st.composite
def problems(draw):
    """A random (hidden, head, ids, completion mask, chunk size): 2B rows, any spans."""
    num_pairs = draw(st.integers(1, 3))
    length = draw(st.integers(2, 9))
    vocab = draw(st.integers(2, 40))
    width = draw(st.integers(1, 8))
    spans = []
    for _ in range(2 * num_pairs):
        prompt = draw(st.integers(0, length))
        spans.append((prompt, draw(st.integers(0, length - prompt))))
    seed = draw(st.integers(0, 2**16))
    batch = make_batch(spans, length, vocab, seed=seed)
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * num_pairs, length, width, generator=g) * 2
    torch.manual_seed(seed)
    head = nn.Linear(width, vocab, bias=draw(st.booleans()))
    chunk_size = draw(st.integers(1, 2 * num_pairs * length))
    transform = draw(st.sampled_from([None, softcap]))
    return batch, hidden, head, chunk_size, transform


@FAST
@given(problems())
def test_chunked_equals_full_for_any_shape_and_mask(problem):
    batch, hidden, head, chunk_size, transform = problem
    hidden.requires_grad_(True)
    ours = score_hidden(
        hidden, head, batch.input_ids, batch.completion_mask,
        chunk_size=chunk_size, stats=True, logit_transform=transform,
    )  # fmt: skip
    logits = head(hidden)
    logits = logits if transform is None else transform(logits)
    full = token_logps_from_logits(logits, batch.input_ids, batch.completion_mask, stats=True)
    torch.testing.assert_close(ours.logps, full.logps, **VALUE_TOL)
    torch.testing.assert_close(ours.stats.entropy, full.stats.entropy, **VALUE_TOL)
    assert torch.equal(ours.stats.is_top1, full.stats.is_top1)
    assert (ours.logps <= 0).all() and not ours.logps[~ours.mask].any()
    w = torch.linspace(0.5, 1.5, ours.logps.numel()).view_as(ours.logps)
    (g_ours,) = torch.autograd.grad((ours.logps * w).sum(), hidden)
    (g_full,) = torch.autograd.grad((full.logps * w).sum(), hidden)
    torch.testing.assert_close(g_ours, g_full, **GRAD_TOL)


@FAST
@given(problems(), st.data())
def test_row_permutation_permutes_logps(problem, data):
    batch, hidden, head, chunk_size, transform = problem
    perm = torch.tensor(data.draw(st.permutations(range(hidden.shape[0]))))
    kwargs = dict(chunk_size=chunk_size, logit_transform=transform)
    with torch.no_grad():
        ours = score_hidden(hidden, head, batch.input_ids, batch.completion_mask, **kwargs)
        permuted = score_hidden(
            hidden[perm], head, batch.input_ids[perm], batch.completion_mask[perm], **kwargs
        )
    torch.testing.assert_close(permuted.logps, ours.logps[perm], **VALUE_TOL)


@FAST
@given(problems(), st.floats(0.0, 1.0))
def test_ld_sums_are_linear_in_alpha(problem, alpha):
    """``ld(α) = ld(0) + α (ld(1) - ld(0))`` and ``ld(1)`` is the plain sum."""
    batch, hidden, head, chunk_size, _ = problem
    with torch.no_grad():
        token = score_hidden(hidden, head, batch.input_ids, batch.completion_mask)
    plain = split_pairs(token.row_sums())
    at0, at1, at_alpha = (ld_sums(token, a) for a in (0.0, 1.0, alpha))
    for k in range(2):
        torch.testing.assert_close(at1[k], plain[k], **VALUE_TOL)
        torch.testing.assert_close(at_alpha[k], at0[k] + alpha * (at1[k] - at0[k]), **VALUE_TOL)


@functools.cache
def _model():
    return tiny_llama()


@settings(max_examples=12, deadline=None)
@given(
    spans=st.lists(st.tuples(st.integers(1, 5), st.integers(1, 5)), min_size=2, max_size=4).filter(
        lambda s: len(s) % 2 == 0
    ),
    extra=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_logps_do_not_depend_on_right_padding(spans, extra, seed):
    """Adding ``extra`` pad columns changes nothing on the original (N, L-1) grid: right padding
    is masked in attention and never scored (no position_ids, as trl)."""
    length = max(p + c for p, c in spans)
    batch = make_batch(spans, length, vocab=128, seed=seed)
    pad = torch.zeros(len(spans), extra, dtype=torch.long)
    padded = dataclasses.replace(
        batch,
        input_ids=torch.cat([batch.input_ids, pad], 1),
        attention_mask=torch.cat([batch.attention_mask, pad], 1),
        completion_mask=torch.cat([batch.completion_mask, pad], 1),
    )
    with torch.no_grad():
        tight = plain_token_logps(_model(), batch, chunk_size=3)
        loose = plain_token_logps(_model(), padded, chunk_size=3)
    # the backbone runs other matrix shapes, so attention sums round differently: a few ulp
    torch.testing.assert_close(loose.logps[:, : length - 1], tight.logps, **VALUE_TOL)
    assert not loose.logps[:, length - 1 :].any()
