"""Held-out pairs, scored once per model: the evaluation's pair metrics and trl's ``eval_*``
metrics come from the same pass.

Each model view runs over the held-out batches once, through the training step's own log-prob
entry (``dpo_core.logps.sequence_logps`` with ``DPOSettings.policy_options()``: the statistics trl
logs). One pass gives both

- the summed completion log-probs that ``dpo_core.evaluation.preference_summary`` reads, and
- trl's ``eval_*`` metrics of that model as the policy against the training's reference
  (``dpo_core.step.step_from_logps``: the same arithmetic as a validation step).

The reference is scored once as well. Before training the policy is the reference
(``ModelView.same_as``: the LoRA model with its adapters off, or the frozen copy of the starting
model), so one pass serves both; a reference precomputed for training (``--precompute-ref-log-probs``)
is read from the rows and not scored again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from dpo_core.batch import PreferenceBatch
from dpo_core.collate import PreferenceCollator
from dpo_core.logp_types import SequenceLogps, split_pairs
from dpo_core.logps import sequence_logps
from dpo_core.reference import NoReference, PrecomputedReference
from dpo_core.step import DPOSettings, StepOutput, step_from_logps
from training.eval.scoring import ModelView, progress

LogpPair = tuple[torch.Tensor, torch.Tensor]  # (chosen (B,), rejected (B,))


@dataclass
class HeldOutScores:
    """One model on the held-out pairs.

    Attributes:
        chosen, rejected: (N,) summed completion log-probs, float32 on CPU.
        loss_logps: per batch, (chosen (B,), rejected (B,)) as the loss reads them (LD-weighted
            with ``ld_alpha``, else the sums).
        steps: per batch, this model as the policy against the training's reference (trl's
            metric sums); empty for a reference that was not scored as a policy.
        sizes: pairs per batch.
    """

    chosen: torch.Tensor
    rejected: torch.Tensor
    loss_logps: list[LogpPair]
    steps: list[StepOutput] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)

    def trl_metrics(self) -> dict[str, float]:
        """trl's metrics over the held-out pairs (``eval_*``), as the training loop's validation
        logs them: per batch, each metric's sum / count (nan for a count of 0) and the loss; then
        the mean over batches weighted by their pairs (Lightning's epoch mean)."""
        totals: dict[str, float] = {}
        for out, size in zip(self.steps, self.sizes, strict=True):
            values = {"loss": out.loss.item()}
            for key in out.sums:
                total, count = out.sums[key].item(), out.counts[key].item()
                values[key] = total / count if count > 0 else math.nan
            for key, value in values.items():
                totals[key] = totals.get(key, 0.0) + size * value
        pairs = sum(self.sizes)
        return {f"eval_{k}": v / pairs for k, v in totals.items()}


class HeldOutPairs:
    """The held-out batches, and the scores of the before, after and reference models on them."""

    def __init__(
        self,
        features: list[dict],
        collator: PreferenceCollator,
        batch_size: int,
        settings: DPOSettings,
    ) -> None:
        self.batches = [
            collator(features[i : i + batch_size]) for i in range(0, len(features), batch_size)
        ]
        self.settings = settings

    def score(
        self, reference: ModelView, before: ModelView, after: ModelView
    ) -> tuple[HeldOutScores, HeldOutScores, HeldOutScores]:
        """(reference, before, after) scores, each model scored once (module docstring)."""
        if before.same_as(reference):
            before_scores = self._pass(before, "held-out pairs (before = reference)")
            ref_scores = before_scores
        else:
            ref_scores = self._precomputed() or self._pass(reference, "held-out pairs (reference)")
            before_scores = self._pass(before, "held-out pairs (before)", ref_scores)
        if after.same_as(before):
            return ref_scores, before_scores, before_scores
        return ref_scores, before_scores, self._pass(after, "held-out pairs (after)", ref_scores)

    def _precomputed(self) -> HeldOutScores | None:
        """The reference's sums as training precomputed them (the rows carry them), when those are
        the plain sums the evaluation reads (LD-DPO's are weighted: then it is scored again)."""
        have = all(b.ref_chosen_logps is not None for b in self.batches)
        if not have or self.settings.loss.ld_alpha is not None:
            return None
        pairs = [
            (b.ref_chosen_logps.float().cpu(), b.ref_rejected_logps.float().cpu())
            for b in self.batches
        ]
        return HeldOutScores(
            chosen=torch.cat([c for c, _ in pairs]),
            rejected=torch.cat([r for _, r in pairs]),
            loss_logps=pairs,
        )

    def _training_reference(self, batch: PreferenceBatch, live: LogpPair) -> SequenceLogps:
        """The reference log-probs training used for ``batch``, from the same sources: none
        (reference-free), precomputed (carried by the batch), or the live reference's (``live``,
        scored once by this evaluation)."""
        if self.settings.loss.reference_free:
            return NoReference()(batch, self.settings.reference_options())
        if batch.ref_chosen_logps is not None:
            return PrecomputedReference()(batch, self.settings.reference_options())
        return SequenceLogps(*live)

    def _pass(
        self, view: ModelView, desc: str, reference: HeldOutScores | None = None
    ) -> HeldOutScores:
        """Score ``view`` as the policy on every batch, against ``reference`` (None: itself)."""
        s = self.settings
        sums: list[LogpPair] = []
        scores = HeldOutScores(chosen=torch.empty(0), rejected=torch.empty(0), loss_logps=[])
        bar = progress(None, desc, total=sum(b.num_pairs for b in self.batches), unit="pair")
        with view.active() as model, torch.no_grad(), bar:
            for i, batch in enumerate(self.batches):
                batch = batch.to(view.device)
                policy = sequence_logps(model, batch, s.policy_options())
                sums.append(_cpu(split_pairs(policy.token.row_sums())))
                own = policy.detached()
                scores.loss_logps.append(own)
                live = own if reference is None else reference.loss_logps[i]
                ref = self._training_reference(batch, live)
                scores.steps.append(step_from_logps(policy, ref, batch, s).detached())
                scores.sizes.append(batch.num_pairs)
                bar.update(batch.num_pairs)
        scores.chosen = torch.cat([c for c, _ in sums])
        scores.rejected = torch.cat([r for _, r in sums])
        return scores


def _cpu(pair: LogpPair) -> LogpPair:
    chosen, rejected = pair
    return chosen.detach().float().cpu(), rejected.detach().float().cpu()
