"""Scoring token sequences under a model: summed completion log-probs of sampled completions
and of held-out preference pairs.

Both work on token ids, so a sampled completion is scored exactly as training scores the data's
completions: ``prompt_ids + completion_ids`` right-padded, with a completion mask, through
``dpo_core.logps`` (EOS included when the model wrote one).

A ``ModelView`` is a model as evaluation sees it: a LoRA model with its adapters switched off is
the base model it was trained from, so "before" and "reference" cost no second copy.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from dpo_core.batch import PreferenceBatch
from dpo_core.collate import pad_right
from dpo_core.logps import model_token_logps, sequence_logps, split_pairs


@dataclass
class ModelView:
    """A causal LM (``model``), with its peft adapters switched off when ``adapters_off``."""

    model: nn.Module
    adapters_off: bool = False

    @contextlib.contextmanager
    def active(self) -> Iterator[nn.Module]:
        """The model in eval mode (adapters off if asked), restored to its mode afterwards."""
        was_training = self.model.training
        self.model.eval()
        try:
            with self.model.disable_adapter() if self.adapters_off else contextlib.nullcontext():
                yield self.model
        finally:
            self.model.train(was_training)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def same_as(self, other: ModelView) -> bool:
        """The same weights in the same state: scoring under both gives identical numbers."""
        return self.model is other.model and self.adapters_off == other.adapters_off


def batches(n: int, size: int) -> list[range]:
    return [range(start, min(n, start + size)) for start in range(0, n, size)]


def progress(items, desc: str):
    """A transient tqdm bar on a terminal; nothing when output goes to a file or pipe."""
    return tqdm(items, desc=desc, leave=False, disable=None)


def completion_batch(
    prompt_ids: Sequence[list[int]], completion_ids: Sequence[list[int]], pad_id: int
) -> PreferenceBatch:
    """``prompt + completion`` rows, right-padded, with a mask on the completion tokens.

    Example, pad 0: prompts ``[1, 5]``, ``[1]``; completions ``[7, 2]``, ``[8, 9, 2]`` ->
    input_ids ``[[1, 5, 7, 2], [1, 8, 9, 2]]``, completion_mask ``[[0, 0, 1, 1], [0, 1, 1, 1]]``.
    """
    rows = [list(p) + list(c) for p, c in zip(prompt_ids, completion_ids, strict=True)]
    masks = [[0] * len(p) + [1] * len(c) for p, c in zip(prompt_ids, completion_ids, strict=True)]
    return PreferenceBatch(
        input_ids=pad_right(rows, pad_id),
        attention_mask=pad_right([[1] * len(r) for r in rows], 0),
        completion_mask=pad_right(masks, 0),
    )


def score_completions(
    view: ModelView,
    prompt_ids: Sequence[list[int]],
    completion_ids: Sequence[list[int]],
    pad_id: int,
    *,
    batch_size: int = 16,
    chunk_size: int = 1024,
    desc: str = "scoring",
) -> torch.Tensor:
    """``log π(completion | prompt)`` summed over completion tokens, (N,) float32 on CPU."""
    values = []
    with view.active() as model, torch.no_grad():
        for rows in progress(batches(len(prompt_ids), batch_size), desc):
            batch = completion_batch(
                [prompt_ids[i] for i in rows], [completion_ids[i] for i in rows], pad_id
            ).to(view.device)
            token = model_token_logps(model, batch, chunk_size=chunk_size)
            values.append(sequence_logps(token).float().cpu())
    return torch.cat(values)


def score_pairs(
    view: ModelView, batches: Sequence[PreferenceBatch], *, chunk_size: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs of collated preference batches: (chosen (B,), rejected (B,))."""
    chosen, rejected = [], []
    with view.active() as model, torch.no_grad():
        for batch in progress(batches, "held-out pairs"):
            token = model_token_logps(model, batch.to(view.device), chunk_size=chunk_size)
            c, r = split_pairs(sequence_logps(token).float().cpu())
            chosen.append(c)
            rejected.append(r)
    return torch.cat(chosen), torch.cat(rejected)
