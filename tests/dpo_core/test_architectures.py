"""Every decoder family of the zoo (parity/sides/zoo.py), against the model's own logits.

For each family: completion log-probs from our path, plain and fast (prompt sharing,
padding-free), equal a float64 log-softmax of the model's own ``forward().logits`` (an oracle
independent of trl and of our head), gradients equal those of the own-logits computation, and the
fast path is taken (RecurrentGemma excepted: its recurrent blocks carry state across segments,
and the probe says so). The LM head is scaled so the logits spread (a skipped soft-cap or scale
shows far above rounding).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from dpo_core.logp_types import LogpOptions
from dpo_core.logps import token_logps
from dpo_core.model_checks import own_logps
from dpo_core.packing import batch_blocker
from dpo_core.probe import logp_bound
from parity.sides.zoo import ZOO, tiny_zoo_model
from tests.dpo_core.test_packing import pair_batch

torch.set_num_threads(1)

# Families whose layers carry state along the row: packed segments would see each other.
PLAIN_ONLY = {"recurrent_gemma": "differ from the plain forward"}
# Gradients of Σ w·logp through two float32 computations that round differently (the head
# product per chunk vs all at once, attention over a differently shaped masked matrix): a weight's
# gradient sums ~T·layers ≈ 80 contributions (T ≈ 40 scored tokens), each rounded differently,
# so its error is at most ~80 eps ≈ 1e-5 of the tensor's largest entry (measured over the zoo:
# 1.2e-6). Held against the largest entry: an elementwise relative test fails on entries that
# cancel to ~0.
GRAD_REL = 1e-5


def spread_model(model_type: str):
    model = tiny_zoo_model(model_type)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)  # logits ~ +-4: transforms show
    return model


def weighted(logps: torch.Tensor, params) -> tuple[torch.Tensor, ...]:
    w = torch.rand(logps.shape, generator=torch.Generator().manual_seed(3), dtype=logps.dtype)
    return torch.autograd.grad((logps * w).sum(), params, allow_unused=True)


@pytest.mark.parametrize("model_type", list(ZOO))
def test_log_probs_and_gradients_equal_the_models_own(model_type):
    model = spread_model(model_type)
    batch = pair_batch()
    params = [p for p in model.parameters() if p.requires_grad]
    own, logits = own_logps(model, batch)
    bound = logp_bound(logits, torch.float32)
    own_grads = weighted(own.float(), params)
    for sharing in (False, True):
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            ours = token_logps(model, batch, LogpOptions(prompt_sharing=sharing))
        got = ours.logps[ours.mask]
        assert float((got.double() - own).abs().max()) <= bound, (model_type, sharing)
        for g, want in zip(weighted(got, params), own_grads, strict=True):
            if want is not None:
                difference = float((g - want).abs().max())
                assert difference <= GRAD_REL * float(want.abs().max()), (model_type, sharing)


@pytest.mark.parametrize("model_type", list(ZOO))
def test_fast_path_is_taken(model_type):
    reason = batch_blocker(spread_model(model_type), pair_batch())
    if model_type in PLAIN_ONLY:
        assert reason is not None and PLAIN_ONLY[model_type] in reason
    else:
        assert reason is None
