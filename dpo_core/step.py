"""One DPO step on one micro-batch: policy log-probs -> reference -> loss -> metric sums.

This is the path of one batch (``../shared/ARCHITECTURE.md``) as a single function, so the
Lightning module, evaluation, the parity suite and the benchmark all run the same arithmetic::

    policy    = sequence_logps(model, batch, settings.policy_options())   # SequenceLogps, (B,) each
    reference = reference(batch, settings.reference_options())            # the same type, no grad
    out       = combined_dpo_loss(policy, reference, settings.loss)       # loss, rewards
    sums, counts = metric_sums(policy, out)                               # trl's metric names
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dpo_core.batch import PreferenceBatch
from dpo_core.logp_types import CHUNK_SIZE, KEEP_PROBS_BYTES, LogpOptions, SequenceLogps
from dpo_core.logps import sequence_logps
from dpo_core.losses import combined_dpo_loss
from dpo_core.metrics import metric_sums
from dpo_core.reference import NoReference, ReferenceSource
from dpo_core.router_aux import router_spec
from dpo_core.settings import LossSettings


@dataclass
class DPOSettings:
    """What ``dpo_step`` needs: the objective, and how log-probs are computed.

    Attributes:
        loss: the objective (``dpo_core.settings``), trl's names and defaults.
        chunk_size, keep_probs_bytes, prompt_sharing, padding_free: speed and memory only; the
            numbers agree up to float32 rounding (``dpo_core.lm_head``, ``dpo_core.packing``).
            ``padding_free`` packs several pairs per row, and needs ``prompt_sharing``.
    """

    loss: LossSettings = field(default_factory=LossSettings)
    chunk_size: int = CHUNK_SIZE
    keep_probs_bytes: int = KEEP_PROBS_BYTES
    prompt_sharing: bool = True
    padding_free: bool = True

    def policy_options(self) -> LogpOptions:
        """The policy's log-probs: LD-weighted sums when ``ld_alpha``, trl's token statistics,
        WPO's ``log Σ p²`` when ``use_weighting``, and a MoE router's load-balancing loss unless
        its coefficient is set to 0."""
        return LogpOptions(
            ld_alpha=self.loss.ld_alpha,
            stats=True,
            wpo=self.loss.use_weighting,
            router_aux=self.loss.router_aux_loss_coef != 0,
            chunk_size=self.chunk_size,
            keep_probs_bytes=self.keep_probs_bytes,
            prompt_sharing=self.prompt_sharing,
            padding_free=self.padding_free,
        )

    def reference_options(self) -> LogpOptions:
        """The reference's: the policy's computation, log-probs only."""
        return self.policy_options().without_stats()


@dataclass
class StepOutput:
    """What one micro-batch yields.

    Attributes:
        loss: scalar, the weighted loss to back-propagate.
        sums, counts: per metric name (trl's), the micro-batch's sum and count; the metric is
            sum / count once both are reduced over processes.
        num_tokens: real (non-pad) tokens in the micro-batch, both halves (trl's ``num_tokens``).
    """

    loss: torch.Tensor
    sums: dict[str, torch.Tensor]
    counts: dict[str, torch.Tensor]
    num_tokens: int

    def detached(self) -> StepOutput:
        return StepOutput(
            self.loss.detach(),
            {k: v.detach() for k, v in self.sums.items()},
            {k: v.detach() for k, v in self.counts.items()},
            self.num_tokens,
        )


def check_reference(reference: ReferenceSource | None, settings: DPOSettings) -> None:
    """Raise ValueError unless ``reference`` is a source, ``NoReference`` exactly when the
    settings say reference-free (a mismatch would train another objective than the one asked)."""
    if reference is None:
        raise ValueError("dpo_step: no reference source; use NoReference() for reference-free")
    if settings.loss.reference_free != isinstance(reference, NoReference):
        raise ValueError(
            f"dpo_step: reference_free={settings.loss.reference_free} but the reference source "
            f"is {type(reference).__name__}; reference-free training uses NoReference()"
        )


def dpo_step(
    model: torch.nn.Module,
    batch: PreferenceBatch,
    reference: ReferenceSource,
    settings: DPOSettings,
) -> StepOutput:
    """Loss and metric sums of ``model`` on ``batch`` (see the module docstring)."""
    check_reference(reference, settings)
    policy = sequence_logps(model, batch, settings.policy_options())
    ref = reference(batch, settings.reference_options())  # every source: no grad
    return step_from_logps(policy, ref, batch, settings, router_coef(model, settings))


def router_coef(model: torch.nn.Module, settings: DPOSettings) -> float:
    """The weight of ``model``'s router load-balancing loss in the step's loss: trl's rule
    (``dpo_core.router_aux.router_spec``), 0 for a model without a router."""
    spec = router_spec(model, settings.loss.router_aux_loss_coef)
    return spec.coef if spec else 0.0


def step_from_logps(
    policy: SequenceLogps,
    reference: SequenceLogps,
    batch: PreferenceBatch,
    settings: DPOSettings,
    router_aux_loss_coef: float = 0.0,
) -> StepOutput:
    """The rest of ``dpo_step`` once both models' log-probs are known (the policy's with
    ``policy_options()``): what an evaluation that scores each model once calls. A MoE policy's
    router loss (``policy.token.aux_loss``) is added with weight ``router_aux_loss_coef``, as
    trl adds it (dpo:1530-1533)."""
    out = combined_dpo_loss(policy, reference.to(policy.chosen), settings.loss)
    sums, counts = metric_sums(policy, out)
    loss = out.loss
    aux = policy.token.aux_loss if policy.token is not None else None
    if aux is not None and router_aux_loss_coef:
        loss = loss + router_aux_loss_coef * aux.to(loss)
    return StepOutput(loss, sums, counts, int(batch.attention_mask.sum().item()))
