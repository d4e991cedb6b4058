"""The float32 summation slack of the pair metrics: what one rounding of each summed log-prob
moves them by, the least the noise floor allows after step 1.

The noise floor (``parity.check.noise_floor``) is how far trl lands from itself when its weights
start one ulp away. On some cases those runs are bit-identical to trl's in a metric for every
step, the floor is 0, and the bound left is one rounding of the metric itself (``eps * |m|``).
But ours sums each sequence's completion log-probs in its own order, so its summed log-prob may
be one float32 rounding away from trl's, at the sum's magnitude, which is far larger than the
metric's own rounding: Cohere2 failed ``rewards/rejected`` by 7.63e-7 = beta x one ulp at
|logp| in [128, 256) / 2 pairs, and ``--loss-type robust --max-steps 4 --batch-size 2`` failed
``rewards/chosen`` by one such rounding.

Derivation. Let ``π_i`` and ``ρ_i`` be pair i's summed completion log-probs under the policy and
the reference (chosen or rejected), P pairs. Two correct float32 computations of ``π_i`` may
differ by one ulp of it, and ``ulp(x) <= eps * |x|`` (``eps`` = float32's 2^-23). Log-probs are
<= 0, so ``mean_i |π_i| = |mean_i π_i|``: the logged ``logps/*`` *is* the mean magnitude, and the
reference's is ``|logps - rewards / beta|``. With ``Π = max over steps |logps/h|`` and
``R = max over steps |logps/h - rewards/h / beta|`` for a half h (chosen, rejected):

- ``logps/h = mean_i π_i``: moves by at most ``mean_i eps |π_i| = eps * Π``.
- ``rewards/h = mean_i beta (π_i - ρ_i)``: at most ``beta * eps * (Π + R)``.
- ``rewards/margins``: the sum of the two halves' reward slacks.
- ``loss = Σ_k w_k mean_i ℓ_k(pair i)``: at most ``Σ_k w_k * slope_k * eps * (Π_c + R_c + Π_r +
  R_r)``, ``slope_k`` the most ``ℓ_k`` moves per nat of one summed log-prob (``loss_slope``).

A relative check (``|d| / max(1, |trl|)``) divides the slack by ``max(1, smallest |trl|)``.
``rewards/accuracies`` (a strict comparison) and the token means (``summation_slack`` of the
floor) are not covered here. A real difference stays far above: one tensor stepped at lr x
1.001 moves the weights and ``grad_norm`` by 18x-25x their bound (``parity/README.md``), and a
difference of a few times these slacks fails (``tests/parity/check/test_pair_slack.py``).
"""

from __future__ import annotations

import math

import torch

from dpo_core.settings import LossSettings
from parity.sides.result import RunResult

EPS32 = torch.finfo(torch.float32).eps
HALVES = ("chosen", "rejected")
PAIR_SLACKED = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    *(f"logps/{h}" for h in HALVES),
)
# Per nat of one summed log-prob, in units of beta: the logistic losses' sigmoid factors are <= 1
# (nca_pair: 1 + 1/2), apo's sigmoid derivatives <= 1/4 each, sigmoid_norm divides by n >= 1.
BETA_SLOPES = {
    "sigmoid": 1.0,
    "sigmoid_norm": 1.0,
    "hinge": 1.0,
    "bco_pair": 1.0,
    "apo_zero": 1.0,
    "apo_down": 1.0,
    "nca_pair": 1.5,
}
SQUARED = ("ipo", "sppo_hard")  # d ℓ / d x = 2 (x - c) = 2 sqrt(ℓ), x in nats (ipo: over n >= 1)


def loss_slope(loss: LossSettings, largest_loss: float) -> float:
    """``Σ_k w_k * slope_k``: the most the loss moves per nat of one summed log-prob.

    robust, aot, aot_unpaired: ``beta / (1 - 2 eps_ls)`` (their two sigmoid terms, divided by
    ``1 - 2 eps_ls`` for robust). exo_pair: ``beta * (|log(eps_ls / (1 - eps_ls))| + 1) / 4``
    (``σ(z)σ(-z) |z + log(eps_ls / (1 - eps_ls))|``). discopop: ``beta * (2 + 1 / (4 tau))`` (two
    terms <= 1, the mixing sigmoid's slope <= 1/(4 tau) times a difference <= 1 where it is not
    negligible). ipo, sppo_hard: ``2 sqrt(ℓ)`` at the run's largest loss over the weight (by
    Jensen the pairs' slopes average to at most that). sft: 1 (a mean over tokens moves less
    than a sum).
    """
    weights = loss.loss_weights or [1.0] * len(loss.loss_type)
    eps_ls, total = loss.label_smoothing, 0.0
    for kind, w in zip(loss.loss_type, weights, strict=True):
        if kind in BETA_SLOPES:
            slope = loss.beta * BETA_SLOPES[kind]
        elif kind in ("robust", "aot", "aot_unpaired"):
            slope = loss.beta / max(1.0 - 2.0 * eps_ls, 1e-3)
        elif kind == "exo_pair":
            slope = loss.beta * (abs(math.log(eps_ls / (1.0 - eps_ls))) + 1.0) / 4.0
        elif kind == "discopop":
            slope = loss.beta * (2.0 + 1.0 / (4.0 * loss.discopop_tau))
        elif kind in SQUARED:
            slope = 2.0 * math.sqrt(max(largest_loss, 0.0) / max(abs(w), 1e-12))
        else:  # sft, and any loss not listed: one nat per nat
            slope = 1.0
        total += abs(w) * slope
    return total


def sum_magnitudes(trl: RunResult, beta: float) -> dict[str, float]:
    """``Π`` and ``R`` of each half (module docstring): ``"logps/chosen"``, ``"ref/chosen"``, ...,
    the largest over trl's steps (0 where a metric is missing)."""
    out = {}
    for h in HALVES:
        logged = [s for s in trl.steps if f"logps/{h}" in s and f"rewards/{h}" in s]
        out[f"logps/{h}"] = max((abs(s[f"logps/{h}"]) for s in logged), default=0.0)
        ref = [abs(s[f"logps/{h}"] - s[f"rewards/{h}"] / beta) for s in logged]
        out[f"ref/{h}"] = max(ref, default=0.0)
    return {k: v if math.isfinite(v) else 0.0 for k, v in out.items()}


def pair_slack(trl: RunResult, metric: str, loss: LossSettings | None, relative: bool) -> float:
    """What one float32 rounding of every summed log-prob may move ``metric`` by (module
    docstring), in the check's units; 0 for other metrics or without the objective."""
    if loss is None or metric not in PAIR_SLACKED or not trl.steps:
        return 0.0
    m = sum_magnitudes(trl, loss.beta)
    half_nats = {h: m[f"logps/{h}"] + m[f"ref/{h}"] for h in HALVES}
    if metric.startswith("logps/"):
        slack = EPS32 * m[metric]
    elif metric in ("rewards/chosen", "rewards/rejected"):
        slack = loss.beta * EPS32 * half_nats[metric.split("/")[1]]
    elif metric == "rewards/margins":
        slack = loss.beta * EPS32 * sum(half_nats.values())
    else:
        largest = max((s["loss"] for s in trl.steps if "loss" in s), default=0.0)
        slack = loss_slope(loss, largest) * EPS32 * sum(half_nats.values())
    if relative:
        values = [abs(s[metric]) for s in trl.steps if metric in s]
        slack /= max(1.0, min(values, default=1.0))
    return slack
