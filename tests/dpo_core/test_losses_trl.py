"""``dpo_core.losses`` against trl 1.16's own ``DPOTrainer._compute_loss``, number for number.

trl's loss code cannot be called without a trainer, so we call the unbound method on a stub
``self`` (the attributes ``_compute_loss`` reads) and a stub model whose "fused LM head" output
returns prepared per-token log-probs. With ``precompute_ref_logps`` the reference log-probs come
from the batch, so no model runs at all. This exercises trl's exact loss arithmetic (f-divergence
map, the 15 loss branches, WPO weighting, the weighted sum) and its gradient. The full path
(tokenisation, a real model, the optimizer) is the parity suite's business.

Per-token log-probs are zeroed outside the shifted completion mask, as trl's head does, and our
sequence log-probs are the same ``sum(dim=1)``. Every comparison is exact (``torch.equal``):
we perform trl's float32 operations in trl's order, so any difference is a real discrepancy.
"""

from __future__ import annotations

import ast
import collections
import inspect
import re
import types

import pytest
import torch

trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")

from dpo_core.logp_types import SequenceLogps, TokenLogps, TokenStats  # noqa: E402
from dpo_core.losses import (  # noqa: E402
    F_DIVERGENCE_LOSS_TYPES,
    LOSS_TYPES,
    combined_dpo_loss,
    trl_defines,
)
from dpo_core.settings import LossSettings  # noqa: E402

B, L = 3, 7
# Completion spans [start, end) for rows chosen_0..2, rejected_0..2. Row 2 starts at position 0,
# so its unshifted length (4, used by ipo/sigmoid_norm) exceeds its scored tokens (3).
SPANS = [(2, 7), (3, 6), (0, 4), (2, 4), (4, 7), (1, 7)]
F_DIVERGENCES = [
    ("forward_kl", 0.5),
    ("js_divergence", 0.5),
    ("alpha_divergence", 0.5),
    ("alpha_divergence", 1.5),
]


class _Accelerator:
    device = torch.device("cpu")

    def gather_for_metrics(self, x):
        return x

    def gather(self, x):
        return x


def make_batch(seed: int = 0, pairs: int = B) -> dict[str, torch.Tensor]:
    """Per-token policy logps (2B, L-1), completion mask (2B, L), reference logps, log sum p^2."""
    g = torch.Generator().manual_seed(seed)
    spans = SPANS[:pairs] + SPANS[B : B + pairs]
    mask = torch.zeros(2 * pairs, L, dtype=torch.long)
    for row, (start, end) in enumerate(spans):
        mask[row, start:end] = 1
    token_logps = -3 * torch.rand(2 * pairs, L - 1, generator=g) * mask[:, 1:]
    return {
        "token_logps": token_logps,
        "completion_mask": mask,
        "ref_logps": -10 * torch.rand(2 * pairs, generator=g),
        "log_sum_sq_probs": -torch.rand(2 * pairs, L - 1, generator=g),
    }


def trl_loss(batch, *, loss_type, loss_weights=None, beta=0.1, label_smoothing=0.0,
             f_divergence_type="reverse_kl", alpha=0.5, tau=0.05, wpo=False):  # fmt: skip
    """trl's ``_compute_loss`` on the batch; returns (loss, metrics, grad of the token logps)."""
    token_logps = batch["token_logps"].clone().requires_grad_(True)
    mask = batch["completion_mask"]
    n = mask.shape[0]
    stub = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True),
        accelerator=_Accelerator(),
        aux_loss_enabled=False,
        precompute_ref_logps=True,
        ld_alpha=None,
        f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=alpha,
        beta=beta,
        loss_types=list(loss_type),
        loss_weights=loss_weights or [1.0] * len(loss_type),
        label_smoothing=label_smoothing,
        use_weighting=wpo,
        args=types.SimpleNamespace(discopop_tau=tau),
        _metrics={"train": collections.defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    outputs = types.SimpleNamespace(
        log_probs=token_logps,
        log_sum_sq_probs=batch["log_sum_sq_probs"] if wpo else None,
        entropy=torch.zeros(n, L - 1),
        mean_logits=torch.zeros(n, L - 1),
        is_top1=torch.zeros(n, L - 1, dtype=torch.bool),
    )
    inputs = {
        "input_ids": torch.zeros(n, L, dtype=torch.long),
        "attention_mask": torch.ones(n, L, dtype=torch.long),
        "completion_mask": mask,
        "ref_chosen_logps": batch["ref_logps"][: n // 2],
        "ref_rejected_logps": batch["ref_logps"][n // 2 :],
    }
    loss = trl_dpo.DPOTrainer._compute_loss(stub, lambda **_: outputs, inputs, False)
    loss.backward()
    return loss.detach(), stub._metrics["train"], token_logps.grad


def our_loss(batch, *, loss_type, loss_weights=None, beta=0.1, label_smoothing=0.0,
             f_divergence_type="reverse_kl", alpha=0.5, tau=0.05, wpo=False):  # fmt: skip
    """``combined_dpo_loss`` on the same batch; returns (LossOutput, grad of the token logps).
    With ``wpo`` the pair weights are the default ones, from the policy's ``log_sum_sq_probs``."""
    token_logps = batch["token_logps"].clone().requires_grad_(True)
    mask = batch["completion_mask"]
    stats = TokenStats(None, None, None, batch["log_sum_sq_probs"]) if wpo else None
    token = TokenLogps(logps=token_logps, mask=mask[:, 1:].bool(), stats=stats)
    pi_c, pi_r = token.row_sums().chunk(2)
    ref_c, ref_r = batch["ref_logps"].chunk(2)
    n_c, n_r = mask.sum(dim=1).chunk(2)
    policy = SequenceLogps(pi_c, pi_r, chosen_lengths=n_c, rejected_lengths=n_r, token=token)
    settings = LossSettings(
        beta=beta, loss_type=list(loss_type), loss_weights=loss_weights,
        label_smoothing=label_smoothing, f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=alpha, use_weighting=wpo, discopop_tau=tau,
    )  # fmt: skip
    out = combined_dpo_loss(policy, SequenceLogps(ref_c, ref_r), settings)
    out.loss.backward()
    return out, token_logps.grad


def assert_same(batch, **kwargs) -> None:
    trl_value, metrics, trl_grad = trl_loss(batch, **kwargs)
    ours, our_grad = our_loss(batch, **kwargs)
    assert torch.equal(ours.loss.detach(), trl_value), (ours.loss.item(), trl_value.item())
    assert torch.equal(our_grad, trl_grad), (our_grad - trl_grad).abs().max()
    assert ours.chosen_rewards.mean().item() == metrics["rewards/chosen"][0]
    assert ours.rejected_rewards.mean().item() == metrics["rewards/rejected"][0]


CASES = [
    (name, eps) for name in LOSS_TYPES for eps in (0.0, 0.1) if trl_defines(name, eps)
]  # fmt: skip


@pytest.mark.parametrize(("loss_type", "label_smoothing"), CASES)
def test_every_loss_type_matches_trl(loss_type, label_smoothing):
    for seed in range(3):
        batch = make_batch(seed)
        assert_same(batch, loss_type=[loss_type], label_smoothing=label_smoothing, beta=0.3)


@pytest.mark.parametrize("loss_type", sorted(F_DIVERGENCE_LOSS_TYPES))
@pytest.mark.parametrize(("f_divergence_type", "alpha"), F_DIVERGENCES)
def test_f_divergences_match_trl(loss_type, f_divergence_type, alpha):
    eps = 0.1 if loss_type in {"exo_pair", "robust"} else 0.0
    assert_same(make_batch(1), loss_type=[loss_type], label_smoothing=eps,
                f_divergence_type=f_divergence_type, alpha=alpha)  # fmt: skip


@pytest.mark.parametrize(
    "loss_type", [n for n in LOSS_TYPES if trl_defines(n, 0.1, pair_weighted=True)]
)
def test_wpo_weighting_matches_trl(loss_type):
    assert_same(make_batch(2), loss_type=[loss_type], label_smoothing=0.1, wpo=True)


def test_sft_wpo_matches_trl_for_one_pair():
    """trl's in-place weighting works on sft's expanded scalar only when B == 1."""
    assert_same(make_batch(3, pairs=1), loss_type=["sft"], wpo=True)


def test_mpo_combination_matches_trl():
    """MPO, trl's documented example: sigmoid + bco_pair + sft with weights [0.8, 0.2, 1.0]."""
    assert_same(
        make_batch(4), loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]
    )


def test_trl_in_place_wpo_fails_for_sft_and_hinge():
    """Why ``trl_defines(..., pair_weighted=True)`` is False for sft and hinge."""
    with pytest.raises(RuntimeError, match="more than one element of the written-to tensor"):
        trl_loss(make_batch(5), loss_type=["sft"], wpo=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        trl_loss(make_batch(5), loss_type=["hinge"], wpo=True)


def test_loss_type_names_and_f_divergence_set_are_trls():
    """trl's unknown-loss error lists its 15 names; its __init__ holds the f-divergence set."""
    with pytest.raises(ValueError, match="Unknown loss type") as info:
        trl_loss(make_batch(0), loss_type=["nope"])
    listed = ast.literal_eval(re.search(r"\[.*\]", str(info.value)).group(0))
    assert tuple(listed) == LOSS_TYPES
    source = inspect.getsource(trl_dpo.DPOTrainer.__init__)
    trl_set = ast.literal_eval(re.search(r"f_divergence_loss_types = (\{.*?\})", source).group(1))
    assert trl_set == F_DIVERGENCE_LOSS_TYPES
