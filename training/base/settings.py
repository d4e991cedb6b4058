"""The run's config as ``dpo_core``'s settings: the one place the two vocabularies meet.

``cfg.dpo`` is a ``dpo_core.settings.LossSettings`` already (``DPOConfig`` extends it); the
speed options beside it (``logps_chunk_size``, ``logps_keep_probs_mb``, ``prompt_sharing``,
``padding_free``) become ``dpo_core.step.DPOSettings`` for the training and evaluation steps,
whose ``policy_options()`` / ``reference_options()`` say how every log-prob of the run is computed.
"""

from __future__ import annotations

from dpo_core.step import DPOSettings
from training.base.config import FitConfig


def dpo_settings(cfg: FitConfig) -> DPOSettings:
    """The ``dpo_core`` view of the run's config (``cfg.dpo`` is a ``LossSettings``)."""
    d = cfg.dpo
    return DPOSettings(
        loss=d,
        chunk_size=d.logps_chunk_size,
        keep_probs_bytes=d.logps_keep_probs_mb * 2**20,
        prompt_sharing=d.prompt_sharing,
        padding_free=d.padding_free,
    )
