"""dpo_core.metrics: trl's logged metrics, by hand and against trl's own expressions."""

from __future__ import annotations

import pytest
import torch

from dpo_core.logp_types import SequenceLogps, TokenLogps, TokenStats
from dpo_core.losses import LossOutput
from dpo_core.metrics import (
    PAIR_METRICS,
    TOKEN_METRICS,
    dpo_metrics,
    metric_sums,
    metrics_from_sums,
)


def example_of(chosen_rewards, rejected_rewards, policy_chosen_logps, policy_rejected_logps,
               token, attention_mask) -> dict:  # fmt: skip
    """The keyword arguments of ``dpo_metrics``: the policy's log-probs (with its per-token values
    and statistics), a loss output carrying the rewards, and the attention mask."""
    out = LossOutput(
        loss=torch.zeros(()),
        per_type={},
        per_pair={},
        chosen_rewards=chosen_rewards,
        rejected_rewards=rejected_rewards,
    )
    policy = SequenceLogps(policy_chosen_logps, policy_rejected_logps, token=token)
    return dict(policy=policy, out=out, attention_mask=attention_mask)


def hand_example() -> dict:
    """B = 2 pairs on a (4, 3) shifted grid; every number is a dyadic fraction, so exact in float32.

    mask        chosen_0 [1,1,0]  chosen_1 [0,1,1]  rejected_0 [1,0,0]  rejected_1 [1,1,1]
    mean_logits          [1,3,·]           [·,2,4]             [-1,·,·]            [0,3,6]
    entropy              [.5,1,·]          [·,1.5,2]           [.25,·,·]           [.25,.5,1]
    is_top1              [T,F,T*]          [F,T,T]             [T,·,·]             [T,T,T]
    (T* lies off the mask and must not count.)
    rewards chosen [0.75, -0.25], rejected [0.25, -0.25]; policy logps chosen [-10, -20],
    rejected [-12, -30]; attention_mask has 13 ones.
    """
    mask = torch.tensor([[1, 1, 0], [0, 1, 1], [1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    mean_logits = torch.tensor([[1.0, 3, 0], [0, 2, 4], [-1, 0, 0], [0, 3, 6]])
    entropy = torch.tensor([[0.5, 1, 0], [0, 1.5, 2], [0.25, 0, 0], [0.25, 0.5, 1]])
    is_top1 = torch.tensor([[1, 0, 1], [0, 1, 1], [1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    stats = TokenStats(
        entropy=entropy, mean_logits=mean_logits, is_top1=is_top1, log_sum_sq_probs=None
    )
    token = TokenLogps(logps=torch.zeros(4, 3), mask=mask, stats=stats)
    attention_mask = torch.ones(4, 4, dtype=torch.long)
    attention_mask[0, 3] = attention_mask[2, 2:] = 0
    return example_of(
        chosen_rewards=torch.tensor([0.75, -0.25]),
        rejected_rewards=torch.tensor([0.25, -0.25]),
        policy_chosen_logps=torch.tensor([-10.0, -20.0]),
        policy_rejected_logps=torch.tensor([-12.0, -30.0]),
        token=token,
        attention_mask=attention_mask,
    )


def test_hand_worked_values():
    """rewards/chosen (0.75 - 0.25)/2 = 0.25; rewards/rejected 0; accuracies: 0.75 > 0.25 yes,
    -0.25 > -0.25 no (strict) -> 0.5; margins (0.5 + 0)/2 = 0.25; logps/chosen -15,
    logps/rejected -21; logits/chosen (1+3+2+4)/4 = 2.5; logits/rejected (-1+0+3+6)/4 = 2;
    entropy (0.5+1+1.5+2+0.25+0.25+0.5+1)/8 = 0.875; mean_token_accuracy: chosen top-1 on the
    mask T,F,T,T -> 3/4; num_tokens 16 - 3 = 13."""
    got = {k: v.item() for k, v in dpo_metrics(**hand_example()).items()}
    assert got == {
        "rewards/chosen": 0.25,
        "rewards/rejected": 0.0,
        "rewards/accuracies": 0.5,
        "rewards/margins": 0.25,
        "logps/chosen": -15.0,
        "logps/rejected": -21.0,
        "logits/chosen": 2.5,
        "logits/rejected": 2.0,
        "entropy": 0.875,
        "mean_token_accuracy": 0.75,
        "num_tokens": 13,
    }


def test_accuracy_is_strict_at_ties():
    """Equal rewards (as at step 1 with reference == policy) give accuracy 0, not 0.5 or 1."""
    example = hand_example()
    example["out"].rejected_rewards = example["out"].chosen_rewards.clone()
    assert dpo_metrics(**example)["rewards/accuracies"].item() == 0.0


def test_no_completion_tokens_gives_zero_like_trl():
    example = hand_example()
    token = example["policy"].token
    token.mask = torch.zeros_like(token.mask)
    metrics = dpo_metrics(**example)
    for name in TOKEN_METRICS:
        assert metrics[name].item() == 0.0


def random_example(seed: int, num_pairs: int = 3, length: int = 7) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(2 * num_pairs, length, generator=g) < 0.6
    stats = TokenStats(
        entropy=torch.rand(2 * num_pairs, length, generator=g) * mask,
        mean_logits=torch.randn(2 * num_pairs, length, generator=g) * mask,
        is_top1=(torch.rand(2 * num_pairs, length, generator=g) < 0.5) & mask,
        log_sum_sq_probs=None,
    )
    token = TokenLogps(logps=torch.zeros(2 * num_pairs, length), mask=mask, stats=stats)
    rewards = torch.randn(4, num_pairs, generator=g)
    return example_of(
        chosen_rewards=rewards[0],
        rejected_rewards=rewards[1],
        policy_chosen_logps=rewards[2] * 30,
        policy_rejected_logps=rewards[3] * 30,
        token=token,
        attention_mask=torch.ones(2 * num_pairs, length + 2, dtype=torch.long),
    )


def trl_metrics(policy, out, attention_mask):
    """trl 1.16's metric code (dpo:1535-1601) on one process: gather is the identity."""
    chosen_rewards, rejected_rewards = out.chosen_rewards, out.rejected_rewards
    policy_chosen_logps, policy_rejected_logps = policy.chosen, policy.rejected
    token = policy.token
    shift_completion_mask = token.mask
    per_token_entropy = token.stats.entropy
    mask = shift_completion_mask
    entropy_sum = (per_token_entropy * mask).sum()
    total_tokens = mask.sum()
    out = {"entropy": (entropy_sum / total_tokens).item() if total_tokens > 0 else 0.0}
    out["num_tokens"] = attention_mask.sum().item()
    chosen_mean_logits, rejected_mean_logits = token.stats.mean_logits.chunk(2, dim=0)
    chosen_mask, rejected_mask = shift_completion_mask.chunk(2, dim=0)
    out["logits/chosen"] = (
        chosen_mean_logits[chosen_mask.bool()].sum().item() / chosen_mask.sum().item()
    )
    out["logits/rejected"] = (
        rejected_mean_logits[rejected_mask.bool()].sum().item() / rejected_mask.sum().item()
    )
    chosen_is_top1, _ = token.stats.is_top1.chunk(2, dim=0)
    correct = (chosen_is_top1 & chosen_mask.bool()).sum()
    out["mean_token_accuracy"] = (correct / chosen_mask.sum()).item()
    out["rewards/chosen"] = chosen_rewards.mean().item()
    out["rewards/rejected"] = rejected_rewards.mean().item()
    out["rewards/accuracies"] = (chosen_rewards > rejected_rewards).float().mean().item()
    out["rewards/margins"] = (chosen_rewards - rejected_rewards).mean().item()
    out["logps/chosen"] = policy_chosen_logps.mean().item()
    out["logps/rejected"] = policy_rejected_logps.mean().item()
    return out


@pytest.mark.parametrize("seed", range(5))
def test_equals_trl_expressions(seed):
    """Our sum / count equals trl's expressions. trl divides some Python floats in float64 and
    takes float32 means; we divide float32 sums: both round once or twice in float32, so the
    values agree to a few float32 ulp of their magnitude (|logps| <= ~100: ulp 7.6e-6)."""
    example = random_example(seed)
    ours = {k: v.item() for k, v in dpo_metrics(**example).items()}
    theirs = trl_metrics(**example)
    assert ours.keys() == theirs.keys()
    for name in theirs:
        assert ours[name] == pytest.approx(theirs[name], rel=4 * 2**-23, abs=1e-7), name


REWARDS = ("chosen_rewards", "rejected_rewards")  # LossOutput fields
LOGPS = ("chosen", "rejected")  # SequenceLogps fields


def concat_pairs(a: dict, b: dict) -> dict:
    """The two micro-batches as one batch: rows [chosen_a, chosen_b, rejected_a, rejected_b]."""

    def rows(t_a, t_b):
        (ca, ra), (cb, rb) = t_a.chunk(2), t_b.chunk(2)
        return torch.cat([ca, cb, ra, rb])

    token_a, token_b = a["policy"].token, b["policy"].token
    stats = TokenStats(
        *(
            None if x is None else rows(x, y)
            for x, y in zip(token_a.stats, token_b.stats, strict=True)
        )
    )
    token = TokenLogps(rows(token_a.logps, token_b.logps), rows(token_a.mask, token_b.mask), stats)
    return example_of(
        *(torch.cat([getattr(a["out"], k), getattr(b["out"], k)]) for k in REWARDS),
        *(torch.cat([getattr(a["policy"], k), getattr(b["policy"], k)]) for k in LOGPS),
        token=token,
        attention_mask=torch.cat([a["attention_mask"], b["attention_mask"]]),
    )


def test_reduced_sums_equal_one_big_batch():
    """Summing two processes' sums and counts, then dividing, is the metric of their union
    (what trl's gather + Σ / count computes). Float32 sums in another order: a few ulp."""
    a, b = random_example(1, num_pairs=2), random_example(2, num_pairs=3)
    parts = [metric_sums(**{k: v for k, v in x.items() if k != "attention_mask"}) for x in (a, b)]
    sums = {k: parts[0].sums[k] + parts[1].sums[k] for k in parts[0].sums}
    counts = {k: parts[0].counts[k] + parts[1].counts[k] for k in parts[0].counts}
    reduced = metrics_from_sums(sums, counts)
    whole = dpo_metrics(**concat_pairs(a, b))
    for name in (*PAIR_METRICS, *TOKEN_METRICS):
        torch.testing.assert_close(reduced[name], whole[name], rtol=4 * 2**-23, atol=1e-6)
    assert counts["rewards/chosen"].item() == 5


def test_counts_are_separate_tensors():
    """Each count is its own tensor, so reducing them in place one by one is safe."""
    example = hand_example()
    del example["attention_mask"]
    _, counts = metric_sums(**example)
    ids = [id(t) for t in counts.values()]
    assert len(set(ids)) == len(ids)


def test_bad_input_is_refused():
    example = hand_example()
    token = example["policy"].token
    token.stats = token.stats._replace(mean_logits=None)
    with pytest.raises(ValueError, match="mean_logits is None"):
        dpo_metrics(**example)
    example = hand_example()
    example["policy"].rejected = torch.zeros(3)
    with pytest.raises(ValueError, match=r"policy.rejected has shape \(3,\), need \(2,\)"):
        dpo_metrics(**example)
