"""The checks on the DPO objective: its settings when they are made, its inputs on every call.

trl 1.16 checks the loss types and their options once, when ``DPOTrainer`` is built
(dpo_trainer.py:808-833). Here ``check_loss_settings`` checks each field when a
``dpo_core.settings.LossSettings`` is made; the loss functions check how the fields combine and
the tensors they get on every call, with an error that names the argument, its shape and what
was expected.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from dpo_core.divergences import F_DIVERGENCE_TYPES
from dpo_core.loss_functions import LOSS_REGISTRY

if TYPE_CHECKING:
    from dpo_core.settings import LossSettings

Tensor = torch.Tensor

LOSS_TYPES: tuple[str, ...] = tuple(LOSS_REGISTRY)
"""The 15 loss types of trl 1.16, in trl's order."""

F_DIVERGENCE_LOSS_TYPES: frozenset[str] = frozenset(
    name for name, spec in LOSS_REGISTRY.items() if spec.f_divergence
)
"""Loss types trl 1.16 allows with a non-default ``f_divergence_type`` (dpo_trainer.py:808-816)."""


def check_known_loss_types(loss_types: Sequence[str], name: Callable[[str], str] = str) -> None:
    """``loss_types`` is not empty and every entry is in ``LOSS_TYPES``."""
    unknown = [t for t in loss_types if t not in LOSS_REGISTRY]
    if not loss_types or unknown:
        problem = f"{unknown} unknown" if unknown else "is empty"
        raise ValueError(f"{name('loss_type')} {problem}; choose from {', '.join(LOSS_TYPES)}")


def check_loss_settings(s: LossSettings, name: Callable[[str], str] = str) -> None:
    """Each field of ``s`` on its own (run when one is made); ``name`` spells a field in the error
    as its user wrote it (training: the flag)."""
    check_known_loss_types(s.loss_type, name)
    if s.loss_weights is not None and len(s.loss_weights) != len(s.loss_type):
        raise ValueError(
            f"{name('loss_weights')} has {len(s.loss_weights)} values for "
            f"{len(s.loss_type)} loss types {s.loss_type}"
        )
    if not s.beta > 0:
        raise ValueError(f"{name('beta')} must be > 0, got {s.beta}")
    if s.f_divergence_type not in F_DIVERGENCE_TYPES:
        raise ValueError(
            f"{name('f_divergence_type')} {s.f_divergence_type!r} unknown; "
            f"choose from {', '.join(F_DIVERGENCE_TYPES)}"
        )
    if not s.discopop_tau > 0:
        raise ValueError(f"{name('discopop_tau')} must be > 0, got {s.discopop_tau}")


def check_loss_combination(loss_types: Sequence[str], label_smoothing: float, f_type: str) -> None:
    """trl's init-time checks (dpo_trainer.py:808-833) on how loss types and options combine."""
    disallowed = sorted(set(loss_types) - F_DIVERGENCE_LOSS_TYPES)
    if f_type != "reverse_kl" and disallowed:
        raise ValueError(
            f"dpo_loss: f_divergence_type={f_type!r} is only defined for loss types "
            f"{sorted(F_DIVERGENCE_LOSS_TYPES)}; not for {disallowed}. Use 'reverse_kl' with those."
        )
    if "exo_pair" in loss_types and label_smoothing == 0.0:
        raise ValueError(
            "dpo_loss: loss_type 'exo_pair' needs label_smoothing > 0 (EXO suggests 1e-3)"
        )
    if "robust" in loss_types and not 0.0 <= label_smoothing < 0.5:
        warnings.warn(
            f"dpo_loss: loss_type 'robust' expects label_smoothing in [0, 0.5); got {label_smoothing}",
            stacklevel=3,
        )


def check_pair_shapes(pairs: dict[str, Tensor | None]) -> None:
    """All four per-pair tensors must be 1-D of one length B."""
    expected = pairs["policy_chosen_logps"].shape
    for name, value in pairs.items():
        if value is None:
            raise ValueError(
                f"dpo_loss: {name} is None; pass a (B,) tensor (reference-free: SequenceLogps.zeros)"
            )
        if value.ndim != 1 or value.shape != expected:
            raise ValueError(
                f"dpo_loss: {name} has shape {tuple(value.shape)}; expected (B,) = "
                f"{tuple(expected)} like policy_chosen_logps"
            )


def check_needs(loss_types: Sequence[str], opts: dict[str, Tensor | None], batch_size: int) -> None:
    """Each loss type's optional inputs (``opts``, by keyword) are present if it needs them, and
    shaped (B,) or (B, T)."""
    for name in loss_types:
        for key in LOSS_REGISTRY[name].needs:
            if opts[key] is None:
                raise ValueError(
                    f"dpo_loss: loss_type {name!r} needs {key!r}: give the policy's SequenceLogps "
                    "its lengths and per-token values (as dpo_core.logps.sequence_logps does)"
                )
    for key in ("chosen_lengths", "rejected_lengths"):
        if opts[key] is not None and tuple(opts[key].shape) != (batch_size,):
            raise ValueError(
                f"dpo_loss: {key} has shape {tuple(opts[key].shape)}; expected ({batch_size},)"
            )
    token_logps, token_mask = opts["chosen_token_logps"], opts["chosen_token_mask"]
    if token_logps is None or token_mask is None:
        return
    if (
        token_logps.ndim != 2
        or token_logps.shape[0] != batch_size
        or token_logps.shape != token_mask.shape
    ):
        raise ValueError(
            f"dpo_loss: chosen_token_logps {tuple(token_logps.shape)} and chosen_token_mask "
            f"{tuple(token_mask.shape)} must both be ({batch_size}, T)"
        )
    if "sft" in loss_types and not bool(token_mask.any()):
        raise ValueError("dpo_loss: loss_type 'sft': chosen_token_mask has no completion token")


def check_pair_weights(pair_weights: Tensor, loss_types: list[str], shape: torch.Size) -> None:
    sorting = sorted({"aot", "aot_unpaired"} & set(loss_types))
    if sorting:
        raise NotImplementedError(
            f"combined_dpo_loss: pair_weights (WPO) with {sorting}: those losses sort the pairs, "
            "so per-pair weights would be misaligned (as trl)"
        )
    if pair_weights.shape != shape:
        raise ValueError(
            f"combined_dpo_loss: pair_weights has shape {tuple(pair_weights.shape)}; expected {tuple(shape)}"
        )
