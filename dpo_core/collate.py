"""Tokenized preference rows to one right-padded ``[chosen; rejected]`` batch.

The same batch trl 1.16's ``DataCollatorForPreference`` builds (dpo:85-207): each pair gives the
sequences ``prompt + chosen`` and ``prompt + rejected``; each is truncated on its own to
``max_length`` (before padding, ids and completion mask together), then all 2B are right-padded to
the longest.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dpo_core.batch import PreferenceBatch

TRUNCATION_MODES = ("keep_start", "keep_end")
_REQUIRED = ("prompt_ids", "chosen_ids", "rejected_ids")
_OPTIONAL = ("index", "ref_chosen_logps", "ref_rejected_logps")


def check_truncation_mode(mode: str, name: str = "truncation_mode") -> None:
    """Raise ``ValueError`` unless ``mode`` is one of :data:`TRUNCATION_MODES`; the message calls
    the setting ``name`` (a flag such as ``"--truncation-mode"`` where a user typed it)."""
    if mode not in TRUNCATION_MODES:
        raise ValueError(f"{name} must be one of {', '.join(TRUNCATION_MODES)}, got {mode!r}")


def truncate(
    ids: list[int], mask: list[int], max_length: int | None, mode: str
) -> tuple[list[int], list[int]]:
    """Cut one sequence and its completion mask to ``max_length`` (dpo:152-165).

    ``keep_start`` keeps ``ids[:max_length]`` (may cut the completion, EOS included);
    ``keep_end`` keeps ``ids[-max_length:]`` (may cut BOS and the whole prompt).
    """
    if max_length is None:
        return ids, mask
    cut = slice(None, max_length) if mode == "keep_start" else slice(-max_length, None)
    return ids[cut], mask[cut]


def pad_right(seqs: Sequence[list[int]], value: int, multiple: int | None = None) -> torch.Tensor:
    """Stack lists into a (N, L) long tensor, right-padded with ``value`` to the longest length L,
    rounded up to a multiple of ``multiple`` when given (trl ``pad``, utils:128-191)."""
    length = max(len(s) for s in seqs)
    if multiple is not None:
        length = -(-length // multiple) * multiple
    out = torch.full((len(seqs), length), value, dtype=torch.long)
    for row, seq in enumerate(seqs):
        out[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return out


@dataclass(frozen=True)
class PreferenceCollator:
    """Collate tokenized pairs into a :class:`PreferenceBatch` of 2B rows ``[chosen; rejected]``.

    Each feature is a dict with ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` (lists of ints)
    and, optionally, ``index`` (int) and ``ref_chosen_logps``/``ref_rejected_logps`` (floats),
    which pass through as (B,) tensors (long / float32).

    Example, two pairs, ``pad_token_id=0``, ``max_length=4``: chosen 0 ``[1, 2, 3] + [4, 5]`` is
    cut to 4 tokens; every other sequence fits and is padded to length 4.

    >>> collate = PreferenceCollator(pad_token_id=0, max_length=4)
    >>> batch = collate([
    ...     {"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6], "index": 7},
    ...     {"prompt_ids": [7, 8], "chosen_ids": [9], "rejected_ids": [10, 11], "index": 3},
    ... ])
    >>> batch.input_ids.tolist()        # rows: chosen 0, chosen 1, rejected 0, rejected 1
    [[1, 2, 3, 4], [7, 8, 9, 0], [1, 2, 3, 6], [7, 8, 10, 11]]
    >>> batch.attention_mask.tolist()
    [[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1]]
    >>> batch.completion_mask.tolist()  # 1 on completion tokens, EOS included; 0 on prompt, pad
    [[0, 0, 0, 1], [0, 0, 1, 0], [0, 0, 0, 1], [0, 0, 1, 1]]
    >>> batch.index.tolist(), batch.ref_chosen_logps
    ([7, 3], None)

    Args:
        pad_token_id: id written into padded positions of ``input_ids``.
        max_length: per-sequence limit applied before padding, or None.
        truncation_mode: ``"keep_start"`` (trl's default) or ``"keep_end"``.
        pad_to_multiple_of: round the padded length up to a multiple of this, or None.
    """

    pad_token_id: int
    max_length: int | None = None
    truncation_mode: str = "keep_start"
    pad_to_multiple_of: int | None = None

    def __post_init__(self) -> None:
        check_truncation_mode(self.truncation_mode)
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(
                f"max_length must be a positive integer or None, got {self.max_length}"
            )
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ValueError(
                f"pad_to_multiple_of must be positive or None, got {self.pad_to_multiple_of}"
            )

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> PreferenceBatch:
        """Build the batch; rows ``0..B-1`` are ``prompt + chosen``, ``B..2B-1`` ``prompt + rejected``."""
        _check_features(features)
        ids, masks = [], []
        for completion in ("chosen_ids", "rejected_ids"):
            for f in features:
                prompt, comp = list(f["prompt_ids"]), list(f[completion])
                seq, mask = truncate(
                    prompt + comp,
                    [0] * len(prompt) + [1] * len(comp),
                    self.max_length,
                    self.truncation_mode,
                )
                ids.append(seq)
                masks.append(mask)
        return PreferenceBatch(
            input_ids=pad_right(ids, self.pad_token_id, self.pad_to_multiple_of),
            attention_mask=pad_right([[1] * len(s) for s in ids], 0, self.pad_to_multiple_of),
            completion_mask=pad_right(masks, 0, self.pad_to_multiple_of),
            ref_chosen_logps=_column(features, "ref_chosen_logps", torch.float32),
            ref_rejected_logps=_column(features, "ref_rejected_logps", torch.float32),
            index=_column(features, "index", torch.long),
        )


def _check_features(features: Sequence[Mapping[str, Any]]) -> None:
    """Every feature has the id lists; an optional key is in all features or in none."""
    if len(features) == 0:
        raise ValueError("cannot collate an empty list of features")
    for k, f in enumerate(features):
        for key in _REQUIRED:
            if key not in f:
                raise ValueError(f"feature {k} has no '{key}' (has {sorted(f)})")
    for key in _OPTIONAL:
        have = [key in f for f in features]
        if any(have) and not all(have):
            raise ValueError(
                f"feature {have.index(False)} has no '{key}' but feature {have.index(True)} has"
            )


def _column(
    features: Sequence[Mapping[str, Any]], key: str, dtype: torch.dtype
) -> torch.Tensor | None:
    """The optional per-pair value ``key`` as a (B,) tensor, or None when absent."""
    if key not in features[0]:
        return None
    return torch.tensor([f[key] for f in features], dtype=dtype)
