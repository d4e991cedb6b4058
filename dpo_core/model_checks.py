"""The load-time guard: our log-probs equal a log-softmax of the model's own logits, on a probe.

Everything dpo_core computes starts from ``log π(y_t | ...)``; a wrong one (a logit transform
skipped, a module between backbone and head left out, a backbone that is not the model's own)
gives a DPO run that trains, logs and saves without a word. trl is no oracle here: it shares any
such reading with us (it reads the same config names), so the independent reference is the model
itself: its own ``forward().logits``, log-softmaxed in float64.

``check_own_logits(model, options)`` runs our path (``logps.token_logps``, the plain forward: the
packed one is proven equal to it separately, ``packing.probe_blocker``) on the probe
(``dpo_core.probe``) and compares every completion log-prob with the model's own. Training runs
it on the policy and on the reference model when it loads them; ``python -m parity`` reports the
same comparison for trl's side.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from dpo_core.logp_types import LogpOptions
from dpo_core.logps import token_logps
from dpo_core.model_parts import model_parts, unwrap_peft
from dpo_core.probe import compute_dtype, logp_bound, model_probe_batch, probe_mode


class OwnLogitsMismatch(ValueError):
    """Our log-probs are not the model's own: training on them would optimise something else."""


@dataclass(frozen=True)
class OwnLogitsCheck:
    """The guard's finding: the largest |difference| of a completion log-prob, its float bound,
    and the logit transform the model was found to apply."""

    model_type: str
    difference: float
    bound: float
    transform: str

    @property
    def passed(self) -> bool:
        return self.difference <= self.bound

    def line(self, role: str) -> str:
        """One line for the run's log."""
        verdict = "equal" if self.passed else "NOT equal"
        return (
            f"own-logits check ({role}, {self.model_type}, logit transform: {self.transform}): "
            f"log-probs {verdict} to the model's own, max |diff| {self.difference:.1e} "
            f"(float bound {self.bound:.1e})"
        )


def own_logps(model: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 ``log_softmax(model(...).logits)`` at the completion tokens (T,), and the logits
    of those positions (T, V), from the model's own forward (the oracle)."""
    logits = model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
    ).logits[:, :-1]
    mask = batch.completion_mask[:, 1:].bool().to(logits.device)
    targets = batch.input_ids[:, 1:].to(logits.device)[mask]
    scored = logits[mask]  # (T, V)
    logps = scored.double().log_softmax(dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return logps, scored


def own_logits_check(model: nn.Module, options: LogpOptions | None = None) -> OwnLogitsCheck:
    """Compare our completion log-probs of the probe with the model's own (see the module
    docstring); ``options`` are the run's (chunking, memory budget), packing and statistics off.
    Raises ``logit_transforms.UnknownLogitTransform`` when no transform reproduces the logits."""
    plain = dict(prompt_sharing=False, padding_free=False)
    options = replace((options or LogpOptions()).without_stats(), **plain)
    parts = model_parts(model)
    base = unwrap_peft(model)
    batch = model_probe_batch(model)
    with probe_mode(model):
        ours = token_logps(model, batch, options)
        want, logits = own_logps(model, batch)
    got = ours.logps[ours.mask].to(want.device).double()
    difference = float((got - want).abs().max()) if want.numel() else 0.0
    model_type = getattr(getattr(base, "config", None), "model_type", type(base).__name__)
    bound = logp_bound(logits, compute_dtype(parts.head))
    return OwnLogitsCheck(model_type, difference, bound, parts.transform_name)


def check_own_logits(model: nn.Module, options: LogpOptions | None = None, role: str = "policy"):
    """``own_logits_check``, raising ``OwnLogitsMismatch`` (one line) when it does not pass."""
    check = own_logits_check(model, options)
    if not check.passed:
        raise OwnLogitsMismatch(
            f"{check.line(role)}; dpo_core would train on wrong log-probs for this model, so "
            "the run stops here"
        )
    return check
