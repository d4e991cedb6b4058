"""The container one collated batch of preference pairs travels in.

Rows are ordered as trl orders them: the B chosen sequences first, then the B rejected ones,
each ``prompt + completion``, right-padded to a common length L.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PreferenceBatch:
    """A batch of B preference pairs as 2B right-padded rows ``[chosen_0..B-1, rejected_0..B-1]``.

    Attributes:
        input_ids: (2B, L) long, ``prompt + completion`` ids, right-padded with the pad id.
        attention_mask: (2B, L) long, 1 on real tokens, 0 on padding.
        completion_mask: (2B, L) long, 1 on completion tokens (EOS included), 0 on prompt and pad.
            Unshifted, as trl's: position t is 1 when token t belongs to the completion.
        ref_chosen_logps: (B,) float32 precomputed reference log-probs, or None.
        ref_rejected_logps: (B,) float32 precomputed reference log-probs, or None.
        index: (B,) long, the rows' indices in their data set (used to look up cached values), or None.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor
    ref_chosen_logps: torch.Tensor | None = None
    ref_rejected_logps: torch.Tensor | None = None
    index: torch.Tensor | None = None

    @property
    def num_pairs(self) -> int:
        """B, the number of preference pairs."""
        return self.input_ids.shape[0] // 2

    def to(self, device: torch.device | str) -> PreferenceBatch:
        """Move every tensor to ``device``."""

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return PreferenceBatch(
            input_ids=move(self.input_ids),
            attention_mask=move(self.attention_mask),
            completion_mask=move(self.completion_mask),
            ref_chosen_logps=move(self.ref_chosen_logps),
            ref_rejected_logps=move(self.ref_rejected_logps),
            index=move(self.index),
        )
