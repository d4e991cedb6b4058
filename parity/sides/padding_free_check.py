"""Parity's check of ours' padding-free forward, which trl has no counterpart of.

``python -m parity`` trains ours on the plain path (trl's summation order). The padding-free
forward that ``training.fit`` runs by default (``dpo_core.packing``: prompt sharing, several
pairs per row under a block mask) computes the same log-probs up to float32 rounding. This
module measures that on the case's own model and batches, against an independent computation:

    plain_error  = max_seq |plain32(x) - plain64(x)|     the plain path's float32 error
    packed_error = max_seq |packed32(x) - plain64(x)|    the padding-free path's

over the summed completion log-probs of every sequence of the first ``MAX_BATCHES`` training
batches, ``plain64`` being the plain forward of a float64 twin of the model
(``parity.sides.float64_twin``; where there is none, the row says why and is not gated). The check passes
when the padding-free path is as accurate as the plain one: ``packed_error <= FACTOR *
plain_error`` plus one float32 rounding at the values' scale. Two float32 computations of one
sum that differ only in summation order have errors of the same size; a factor of 2 leaves room
for the maximum over a few dozen sequences, and a real difference (a token seeing another
pair, a wrong position) moves a log-prob by far more than its rounding error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dpo_core.batch import PreferenceBatch
from dpo_core.logp_types import LogpOptions
from dpo_core.logps import token_logps
from dpo_core.packing import packed_layout
from parity.sides.float64_twin import float64_twin

MAX_BATCHES = 4
FACTOR = 2.0


@dataclass
class PaddingFreeCheck:
    """What ``measure`` found.

    Attributes:
        plain_error, packed_error: see the module docstring (nats, summed log-probs).
        packed_vs_plain: ``max_seq |packed32 - plain32|``, for the report.
        scale: ``max_seq |plain64|``.
        sequences: sequences compared. rows, pairs: packed rows and pairs, over the batches
            that ran padding-free (a batch where the plain forward is cheaper runs plain).
        skipped: why nothing was measured (no float64 twin, or its forward failed; then every
            number is 0 and the row is not gated).
        error: ours' own plain or padding-free forward failed (the row fails).
    """

    plain_error: float = 0.0
    packed_error: float = 0.0
    packed_vs_plain: float = 0.0
    scale: float = 0.0
    sequences: int = 0
    rows: int = 0
    pairs: int = 0
    skipped: str = ""
    error: str = ""

    @property
    def bound(self) -> float:
        return FACTOR * self.plain_error + torch.finfo(torch.float32).eps * self.scale


def _sums(model, batch: PreferenceBatch, options: LogpOptions) -> torch.Tensor:
    with torch.no_grad():
        return token_logps(model, batch, options).row_sums().double()


def float64_sums(twin: torch.nn.Module, batch: PreferenceBatch) -> torch.Tensor:
    """(2B,) summed completion log-probs from the float64 twin, the textbook way: full logits,
    ``log_softmax`` and sum all in float64 (``dpo_core.logps`` casts the head's logits to
    float32, which would put float32 rounding in the reference), one row at a time."""
    sums = []
    with torch.no_grad():
        for i in range(batch.input_ids.shape[0]):
            ids, attn = batch.input_ids[i : i + 1], batch.attention_mask[i : i + 1]
            logits = twin(input_ids=ids, attention_mask=attn, use_cache=False).logits[0, :-1]
            log_p = logits.double().log_softmax(dim=-1)
            token = log_p.gather(-1, ids[0, 1:].unsqueeze(-1)).squeeze(-1)
            sums.append((token * batch.completion_mask[i, 1:]).sum())
    return torch.stack(sums)


def measure(model: torch.nn.Module, batches: list[PreferenceBatch]) -> PaddingFreeCheck:
    """Plain float32, padding-free float32 and plain float64 log-probs of ``batches[:MAX_BATCHES]``
    under ``model`` (see the module docstring)."""
    twin = float64_twin(model)
    if isinstance(twin, str):
        return PaddingFreeCheck(skipped=twin)
    check = PaddingFreeCheck()
    for batch in batches[:MAX_BATCHES]:
        try:
            exact = float64_sums(twin, batch)
        except Exception as exc:  # the twin cannot run this family in float64: say so
            return PaddingFreeCheck(skipped=f"float64 twin failed: {_why(exc)}")
        try:
            plain = _sums(model, batch, LogpOptions(prompt_sharing=False))
            packed = _sums(model, batch, LogpOptions(prompt_sharing=True, padding_free=True))
        except Exception as exc:  # ours' forward: a failure of ours, reported in the row
            return PaddingFreeCheck(error=f"ours failed: {_why(exc)}")
        layout = packed_layout(model, batch, padding_free=True)
        if layout is not None:
            check.rows, check.pairs = check.rows + layout.num_rows, check.pairs + batch.num_pairs
        check.plain_error = max(check.plain_error, float((plain - exact).abs().max()))
        check.packed_error = max(check.packed_error, float((packed - exact).abs().max()))
        check.packed_vs_plain = max(check.packed_vs_plain, float((packed - plain).abs().max()))
        check.scale = max(check.scale, float(exact.abs().max()))
        check.sequences += plain.numel()
    return check


def _why(exc: Exception) -> str:
    """An exception as one line: its type and first line."""
    return f"{type(exc).__name__}: {exc}".splitlines()[0]
