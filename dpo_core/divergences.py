"""f-DPO: the map from a log-ratio to the "score" that DPO-style losses compare.

f-DPO (Wang et al. 2023, "Beyond Reverse KL: Generalizing Direct Preference Optimization with
Diverse Divergence Constraints", Theorem 1 / eq. 9) replaces the reverse-KL regulariser of DPO by
any f-divergence. The implicit reward becomes ``beta * f'(pi / pi_ref)``, so where DPO compares the
log-ratios ``lr = log pi(y|x) - log pi_ref(y|x)``, f-DPO compares ``f'(exp(lr))``. We call that
value the *score*; with the default ``reverse_kl`` the score is the log-ratio itself.

| f_divergence_type  | f'(t)                  | score s(lr)                                  |
|--------------------|------------------------|----------------------------------------------|
| ``reverse_kl``     | log t + 1              | lr                                           |
| ``forward_kl``     | 1 - 1/t                | 1 - exp(-lr)                                 |
| ``js_divergence``  | log(2t / (1 + t))      | log 2 + logsigmoid(lr)                       |
| ``alpha_divergence`` | (t^(a-1) - 1)/(a-1)  | (exp(min((a-1) lr, c)) - 1) / (a-1)          |

(The constant term of f' cancels in the chosen-minus-rejected difference, so it is dropped.)
The alpha clamp ``c`` is 80 (11 for float16, computed in float32 and cast back) so that the
exponential stays finite; ``|a - 1| < 1e-6`` falls back to ``lr`` (the limit a -> 1 is reverse
KL). This is exactly trl 1.16 (``trl/trainer/dpo_trainer.py`` lines 1353-1381), operation for
operation, so the numbers agree bit for bit.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

F_DIVERGENCE_TYPES: tuple[str, ...] = (
    "reverse_kl",
    "forward_kl",
    "js_divergence",
    "alpha_divergence",
)
"""The f-divergences trl 1.16 accepts as ``f_divergence_type``."""

ALPHA_CLAMP_MAX: dict[torch.dtype, float] = {torch.float16: 11.0}
"""Upper clamp of ``(alpha - 1) * lr`` before ``exp``: 11 for float16 (exp(11) < 65504), else 80."""

ALPHA_EXACT_KL_TOLERANCE = 1e-6
"""``|alpha - 1|`` below this falls back to reverse KL, as trl does."""


def f_divergence_scores(
    logratios: torch.Tensor,
    f_divergence_type: str,
    alpha: float | None = None,
) -> torch.Tensor:
    """Map log-ratios ``lr = log pi - log pi_ref`` to f-DPO scores ``f'(exp(lr))`` (table above).

    Source: f-DPO, Wang et al. 2023, Theorem 1 and Table 1; trl 1.16 dpo_trainer.py:1353-1381.

    Args:
        logratios: (B,) summed completion log-ratios, policy minus reference.
        f_divergence_type: one of ``F_DIVERGENCE_TYPES``.
        alpha: the alpha of ``alpha_divergence`` (trl's ``f_alpha_divergence_coef``; its default
            is ``dpo_core.settings.LossSettings``'); unused by the other divergences.

    Returns:
        (B,) scores, same dtype as ``logratios``.
    """
    if f_divergence_type == "reverse_kl":
        return logratios
    if f_divergence_type == "forward_kl":
        return 1 - torch.exp(-logratios)
    if f_divergence_type == "js_divergence":
        return math.log(2) + F.logsigmoid(logratios)
    if f_divergence_type == "alpha_divergence":
        if alpha is None:
            raise ValueError("f_divergence_type 'alpha_divergence' needs alpha")
        return _alpha_divergence_scores(logratios, alpha)
    raise ValueError(
        f"f_divergence_type: unknown value {f_divergence_type!r}; expected one of {F_DIVERGENCE_TYPES}"
    )


def _alpha_divergence_scores(logratios: torch.Tensor, alpha: float) -> torch.Tensor:
    """``(exp(min((alpha-1) lr, c)) - 1) / (alpha-1)``, the exp taken in float32; ``lr`` if alpha ~ 1."""
    if abs(alpha - 1.0) < ALPHA_EXACT_KL_TOLERANCE:
        return logratios
    t = (alpha - 1.0) * logratios
    clamp_max = ALPHA_CLAMP_MAX.get(t.dtype, 80.0)
    t_float = torch.clamp(t.float(), max=clamp_max)
    # trl casts back before multiplying by 1/(alpha-1); keep that order so the rounding matches.
    return (torch.exp(t_float) - 1.0).to(t.dtype) * (1.0 / (alpha - 1.0))
