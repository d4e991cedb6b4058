"""dpo_core: Direct Preference Optimization as pure functions on tensors.

Modules, in the order one batch meets them (``README.md`` beside this file walks one step):

- ``data``, ``collate``  rows (explicit / conversational / implicit prompt) -> token ids -> ``PreferenceBatch``
- ``logps``      the one log-prob entry: ``sequence_logps(model, batch, options)`` -> ``SequenceLogps``
  (``logp_types`` holds the types; ``packing`` and ``lm_head`` are how it gathers and scores)
- ``reference``  interchangeable reference sources: frozen copy, adapters off, precomputed, none
- ``settings``   ``LossSettings``: the objective's knobs, trl's names and defaults, declared once
- ``losses``     every DPO loss variant (``loss_functions``): ``dpo_loss``, ``combined_dpo_loss``
- ``metrics``    the numbers trl logs, with trl's names
- ``step``       one training step: the four above in order (``dpo_step``)
- ``evaluation`` before vs after: preference accuracy (ties 1/2), margins, sequence-level KL

``dpo_core`` imports torch (and transformers' tokenizers for chat templates) and nothing of ours
above it: read it alone to learn the math.

Example::

    from dpo_core import LossSettings, SequenceLogps, dpo_loss
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        SequenceLogps(policy_chosen, policy_rejected),
        SequenceLogps(ref_chosen, ref_rejected),
        LossSettings(beta=0.1),
    )
"""

from dpo_core.batch import PreferenceBatch
from dpo_core.collate import PreferenceCollator
from dpo_core.logp_types import LogpOptions, SequenceLogps, TokenLogps, TokenStats
from dpo_core.logps import sequence_logps, token_logps
from dpo_core.losses import LOSS_TYPES, LossOutput, combined_dpo_loss, dpo_loss
from dpo_core.metrics import dpo_metrics, metric_sums
from dpo_core.reference import (
    AdapterDisabledReference,
    FrozenCopyReference,
    NoReference,
    PrecomputedReference,
    ReferenceSource,
)
from dpo_core.settings import LossSettings
from dpo_core.step import DPOSettings, StepOutput, dpo_step

__all__ = [
    "LOSS_TYPES",
    "AdapterDisabledReference",
    "DPOSettings",
    "FrozenCopyReference",
    "LogpOptions",
    "LossOutput",
    "LossSettings",
    "NoReference",
    "PrecomputedReference",
    "PreferenceBatch",
    "PreferenceCollator",
    "ReferenceSource",
    "SequenceLogps",
    "StepOutput",
    "TokenLogps",
    "TokenStats",
    "combined_dpo_loss",
    "dpo_loss",
    "dpo_metrics",
    "dpo_step",
    "metric_sums",
    "sequence_logps",
    "token_logps",
]
