"""The numbers an evaluation reports, as pure functions of summed log-probs.

Held-out preference pairs (Rafailov et al. 2023, Eq. 5: the implicit reward
``r(x, y) = β log π(y|x)/π_ref(y|x)``):

| name                  | value over B pairs                                            |
|-----------------------|---------------------------------------------------------------|
| preference_accuracy   | mean of ``win(r_c, r_r)``: 1 if r_c > r_r, 1/2 on a tie, else 0 |
| reward_margin         | mean of ``r_c - r_r``                                         |
| reward_chosen         | mean of ``r_c``                                               |
| reward_rejected       | mean of ``r_r``                                               |
| logp_accuracy         | mean of ``win(π_c, π_r)``: the policy alone prefers chosen    |
| logps_chosen          | mean of ``π_c`` (summed completion log-prob)                   |
| logps_rejected        | mean of ``π_r``                                               |

**Ties count 1/2.** Before training the policy *is* the reference, so every implicit reward is 0
and every pair is a tie: trl's strict ``rewards/accuracies`` reads 0 there, which looks like a
model that prefers every rejected answer. Counting a tie as half a win reads 0.5, chance, which
is what an untrained policy knows. ``logp_accuracy`` (does the policy itself give the chosen
completion the higher likelihood?) is informative before training too.

Samples ``y ~ π(·|x)`` (one per prompt) give the sequence-level KL estimate

    KL(π ‖ π_ref) ≈ mean_i [log π(y_i|x_i) - log π_ref(y_i|x_i)]

unbiased when ``y`` is drawn from π itself (temperature 1, no top-p / top-k cut), and exactly 0
when π and π_ref are the same model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import Tensor


def implicit_reward(policy_logps: Tensor, ref_logps: Tensor, beta: float) -> Tensor:
    """``β (log π(y|x) - log π_ref(y|x))`` (Eq. 5 without ``β log Z(x)``); (N,), (N,) -> (N,)."""
    if policy_logps.shape != ref_logps.shape:
        raise ValueError(
            f"implicit_reward: shapes {tuple(policy_logps.shape)} and {tuple(ref_logps.shape)} differ"
        )
    return beta * (policy_logps - ref_logps)


def win_scores(scores: Tensor, other_scores: Tensor) -> Tensor:
    """Per element: 1.0 where ``scores > other_scores``, 0.5 on a tie, 0.0 where less. (N,)."""
    if scores.shape != other_scores.shape:
        raise ValueError(
            f"win_scores: shapes {tuple(scores.shape)} and {tuple(other_scores.shape)} differ"
        )
    return (scores > other_scores).double() + 0.5 * (scores == other_scores).double()


@dataclass(frozen=True)
class PreferenceSummary:
    """Held-out pair metrics of one policy (see the module table); plain floats."""

    preference_accuracy: float
    reward_margin: float
    reward_chosen: float
    reward_rejected: float
    logp_accuracy: float
    logps_chosen: float
    logps_rejected: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def preference_summary(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
) -> PreferenceSummary:
    """Held-out metrics from the summed completion log-probs of B pairs, each (B,)."""
    n = policy_chosen_logps.shape[0]
    if n == 0:
        raise ValueError("preference_summary: no pairs")
    for name, t in (
        ("policy_rejected_logps", policy_rejected_logps),
        ("ref_chosen_logps", ref_chosen_logps),
        ("ref_rejected_logps", ref_rejected_logps),
    ):
        if tuple(t.shape) != (n,):
            raise ValueError(f"preference_summary: {name} has shape {tuple(t.shape)}, need ({n},)")
    pi_c, pi_r = policy_chosen_logps.double(), policy_rejected_logps.double()
    r_c = implicit_reward(pi_c, ref_chosen_logps.double(), beta)
    r_r = implicit_reward(pi_r, ref_rejected_logps.double(), beta)
    return PreferenceSummary(
        preference_accuracy=win_scores(r_c, r_r).mean().item(),
        reward_margin=(r_c - r_r).mean().item(),
        reward_chosen=r_c.mean().item(),
        reward_rejected=r_r.mean().item(),
        logp_accuracy=win_scores(pi_c, pi_r).mean().item(),
        logps_chosen=pi_c.mean().item(),
        logps_rejected=pi_r.mean().item(),
    )


def sequence_kl(policy_logps: Tensor, ref_logps: Tensor) -> float:
    """Monte-Carlo ``KL(π ‖ π_ref)`` from samples ``y ~ π``: ``mean(log π(y|x) - log π_ref(y|x))``.

    Args:
        policy_logps: (N,) summed log-probs of the sampled completions under the policy.
        ref_logps: (N,) the same completions under the reference.
    """
    if policy_logps.numel() == 0:
        raise ValueError("sequence_kl: no samples")
    return implicit_reward(policy_logps.double(), ref_logps.double(), 1.0).mean().item()


def sequence_kl_stderr(policy_logps: Tensor, ref_logps: Tensor) -> float | None:
    """The standard error of ``sequence_kl``: the sample standard deviation (N - 1 in the
    denominator) of the per-sample log-ratios, over ``sqrt(N)``; None for fewer than 2 samples.

    Example: log-ratios 1 and 2 -> standard deviation sqrt(0.5), standard error 0.5.

    Args:
        policy_logps: (N,) summed log-probs of the sampled completions under the policy.
        ref_logps: (N,) the same completions under the reference.
    """
    if policy_logps.numel() < 2:
        return None
    ratios = implicit_reward(policy_logps.double(), ref_logps.double(), 1.0)
    return (ratios.std(correction=1) / ratios.numel() ** 0.5).item()


def likelihood_displacement(before: PreferenceSummary, after: PreferenceSummary) -> bool:
    """True when training lowered the mean log-prob of both chosen and rejected completions:
    DPO widened the margin by pushing both down ("likelihood displacement")."""
    return after.logps_chosen < before.logps_chosen and after.logps_rejected < before.logps_rejected
