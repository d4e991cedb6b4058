"""Where the reference log-probs ``log π_ref(y | x)`` come from: interchangeable sources.

DPO's implicit reward is ``β (log π_θ(y|x) - log π_ref(y|x))`` (Rafailov et al. 2023, Eq. 5);
π_ref must stay fixed while π_θ trains. Every source is ``source(batch, options) ->
SequenceLogps``, the same type the policy's forward gives, computed as trl does (dpo:1318-1347).
A source has no options of its own: ``options`` (``LogpOptions``, from the run's settings) says how
the log-probs are computed, so the reference is scored exactly as the policy is.

- ``FrozenCopyReference``: a separate copy of the model, eval mode, no gradients.
- ``AdapterDisabledReference``: the policy's own ``PeftModel`` inside ``disable_adapter()``; the
  base weights under a LoRA never change, so switching the adapters off gives the reference
  (trl dpo:1328-1336 via ``use_adapter(model, None)``).
- ``PrecomputedReference``: values computed once before training (``precompute_reference_logps``),
  read from the batch or looked up by row index; a batch without them is an error, never a
  silent fallback (in trl #1962 ignored precomputed values left the loss stuck at log 2).
- ``NoReference``: ``log π_ref = 0`` for every completion: reference-free training.

``precompute_reference_logps`` runs a source over every row once; ``dpo_core.reference_cache``
keeps the values on disk under a key of everything that determines them.

``dpo:N`` are lines of trl 1.16.0's trl/trainer/dpo_trainer.py.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterable

import torch
from torch import nn

from dpo_core.batch import PreferenceBatch
from dpo_core.logp_types import LogpOptions, SequenceLogps
from dpo_core.logps import sequence_logps
from dpo_core.model_checks import OwnLogitsCheck, own_logits_check


class ReferenceSource(ABC):
    """``source(batch, options) -> SequenceLogps`` of the reference, float32, no grad."""

    name: str

    @abstractmethod
    def __call__(self, batch: PreferenceBatch, options: LogpOptions) -> SequenceLogps: ...


class _ModelReference(ReferenceSource):
    """A reference that is a model: its log-probs through the policy's own path, without grad,
    inside ``_view()`` (the adapters switched off, for ``AdapterDisabledReference``)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def _view(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def __call__(self, batch: PreferenceBatch, options: LogpOptions) -> SequenceLogps:
        with torch.no_grad(), self._view():
            return sequence_logps(self.model, batch, options)

    def own_logits_check(self, options: LogpOptions | None = None) -> OwnLogitsCheck:
        """``model_checks.own_logits_check`` of the reference as it runs (inside ``_view()``)."""
        with self._view():
            return own_logits_check(self.model, options)


class FrozenCopyReference(_ModelReference):
    """A separate reference model: put in eval mode with ``requires_grad=False`` on construction.

    Pass ``policy`` to have ``check_reference_is_not_policy`` refuse a reference that is, or
    shares weights with, the policy.
    """

    name = "frozen_copy"

    def __init__(self, ref_model: nn.Module, *, policy: nn.Module | None = None) -> None:
        if policy is not None:
            check_reference_is_not_policy(policy, ref_model)
        super().__init__(ref_model.eval().requires_grad_(False))


class AdapterDisabledReference(_ModelReference):
    """The policy ``PeftModel`` itself with every adapter switched off (``disable_adapter()``).

    The model keeps its train/eval mode, as in trl, so the base layers take the same code path as
    in the policy forward (dropout is disabled in both, trl's ``disable_dropout=True``).
    """

    name = "adapters_disabled"

    def __init__(self, peft_model: nn.Module) -> None:
        if not callable(getattr(peft_model, "disable_adapter", None)):
            raise TypeError(
                f"AdapterDisabledReference needs a peft PeftModel (with disable_adapter()), "
                f"got {type(peft_model).__name__}; use FrozenCopyReference for a full model."
            )
        super().__init__(peft_model)

    def _view(self) -> contextlib.AbstractContextManager:
        return self.model.disable_adapter()


class NoReference(ReferenceSource):
    """Reference-free training: ``log π_ref = 0``, so the reward is ``β log π_θ``."""

    name = "none"

    def __call__(self, batch: PreferenceBatch, options: LogpOptions) -> SequenceLogps:
        return SequenceLogps.zeros(batch.num_pairs, batch.input_ids.device)


class PrecomputedReference(ReferenceSource):
    """Reference log-probs computed before training.

    Without tables, reads ``batch.ref_chosen_logps`` / ``batch.ref_rejected_logps``. With
    ``chosen`` / ``rejected`` tables (N,) (from ``load_reference_cache``), looks rows up by
    ``batch.index``. A batch without them is an error: a silent fallback (0, or the policy
    itself) would train against the wrong reference (trl #1962). ``options`` were fixed when the
    values were computed (the cache key holds ``ld_alpha``).
    """

    name = "precomputed"

    def __init__(self, chosen: torch.Tensor | None = None, rejected: torch.Tensor | None = None):
        if (chosen is None) != (rejected is None):
            raise ValueError(
                "PrecomputedReference: give both chosen and rejected tables, or neither"
            )
        if chosen is not None and (chosen.dim() != 1 or chosen.shape != rejected.shape):
            raise ValueError(
                f"PrecomputedReference: tables must both be (N,), got {tuple(chosen.shape)} "
                f"and {tuple(rejected.shape)}"
            )
        self.chosen, self.rejected = chosen, rejected

    def __call__(self, batch: PreferenceBatch, options: LogpOptions) -> SequenceLogps:
        if self.chosen is not None:
            return SequenceLogps(*self._lookup(batch))
        missing = [
            f for f in ("ref_chosen_logps", "ref_rejected_logps") if getattr(batch, f) is None
        ]
        if missing:
            raise ValueError(
                f"PrecomputedReference: the batch has no {' / '.join(missing)}; precompute them "
                "(precompute_reference_logps + save/load_reference_cache) or use a live reference. "
                "A silent fallback (0, or the policy itself) trains against the wrong reference "
                "(trl #1962: loss stuck at log 2)."
            )
        expected = (batch.num_pairs,)
        for f in ("ref_chosen_logps", "ref_rejected_logps"):
            if tuple(getattr(batch, f).shape) != expected:
                shape = tuple(getattr(batch, f).shape)
                raise ValueError(
                    f"PrecomputedReference: batch.{f} has shape {shape}, need {expected}"
                )
        return SequenceLogps(batch.ref_chosen_logps, batch.ref_rejected_logps)

    def _lookup(self, batch: PreferenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
        if batch.index is None:
            raise ValueError("PrecomputedReference: the batch has no index to look its rows up by")
        index = batch.index.to(self.chosen.device)
        bad = index[(index < 0) | (index >= self.chosen.shape[0])]
        if bad.numel():
            raise ValueError(
                f"PrecomputedReference: batch.index holds rows {bad.tolist()} outside the "
                f"{self.chosen.shape[0]} precomputed rows"
            )
        device = batch.input_ids.device
        return self.chosen[index].to(device), self.rejected[index].to(device)


def check_reference_is_not_policy(policy: nn.Module, reference_model: nn.Module) -> None:
    """Raise ValueError if ``reference_model`` is ``policy`` or shares parameter storage with it.

    A reference that moves with the policy gives ``log π_θ - log π_ref = 0`` for both halves of
    every pair: the loss reads log 2 and the rewards 0 at every step while the gradient pushes
    ``log π_θ(chosen) - log π_θ(rejected)`` apart with no KL anchor (trl #1148, #1962).
    """
    consequence = (
        "A reference that moves with the policy keeps the DPO loss at log 2 ≈ 0.6931 and the "
        "rewards at 0 at every step, with no KL anchor (trl #1148, #1962). Pass a copy made "
        "before training (copy.deepcopy), AdapterDisabledReference for a peft model, or "
        "precomputed reference log-probs."
    )
    if reference_model is policy:
        raise ValueError(f"the reference model is the policy object itself. {consequence}")

    def storage(p: torch.Tensor) -> tuple[torch.device, int]:
        return p.device, p.untyped_storage().data_ptr()

    policy_storage = {storage(p): name for name, p in policy.named_parameters()}
    for name, p in reference_model.named_parameters():
        shared_with = policy_storage.get(storage(p))
        if shared_with is not None and storage(p)[1] != 0:  # 0: meta / empty, nothing shared
            raise ValueError(
                f"the reference parameter {name!r} shares its storage with the policy "
                f"parameter {shared_with!r}. {consequence}"
            )


# ------------------------------------------------------------------ precomputation


def check_rows_once(index: torch.Tensor, num_rows: int, source: str) -> None:
    """Raise ValueError unless ``index`` holds every row 0..num_rows-1 exactly once."""
    outside = index[(index < 0) | (index >= num_rows)]
    if outside.numel():
        raise ValueError(f"{source}: rows {outside[:10].tolist()} lie outside 0..{num_rows - 1}")
    counts = torch.bincount(index, minlength=num_rows)
    repeated = (counts > 1).nonzero().flatten()
    missing = (counts == 0).nonzero().flatten()
    if repeated.numel() or missing.numel():
        raise ValueError(
            f"{source}: expected rows 0..{num_rows - 1} once each; repeated rows "
            f"{repeated[:10].tolist()}, missing rows {missing[:10].tolist()} "
            f"({missing.numel()} missing)"
        )


def precompute_reference_logps(
    reference: ReferenceSource,
    batches: Iterable[PreferenceBatch],
    options: LogpOptions,
    *,
    num_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``reference`` over every batch once: (chosen (N,), rejected (N,)) float32 on CPU,
    position i holding data-set row i (from ``batch.index``). Every row must appear exactly once;
    ``num_rows`` defaults to ``max(index) + 1``. trl does this at init (dpo:1168-1283).
    ``options``: as training scores the reference (``DPOSettings.reference_options``).
    """
    chosen, rejected, index = [], [], []
    for i, batch in enumerate(batches):
        if batch.index is None:
            raise ValueError(f"precompute_reference_logps: batch {i} has no index (row numbers)")
        c, r = reference(batch, options).detached()
        chosen.append(c)
        rejected.append(r)
        index.append(batch.index.cpu().long())
    if not index:
        raise ValueError("precompute_reference_logps: no batches")
    index = torch.cat(index)
    num_rows = int(index.max()) + 1 if num_rows is None else num_rows
    check_rows_once(index, num_rows, "precompute_reference_logps")
    order = torch.argsort(index)
    return torch.cat(chosen)[order], torch.cat(rejected)[order]
