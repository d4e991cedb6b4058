"""Scoring token sequences under a model: summed completion log-probs of sampled completions
(held-out preference pairs are scored by ``training.eval.heldout``).

It works on token ids, so a sampled completion is scored exactly as training scores the data's
completions: ``prompt_ids + completion_ids`` right-padded, with a completion mask, through
``dpo_core.logps`` (EOS included when the model wrote one).

A ``ModelView`` is a model as evaluation sees it: a LoRA model with its adapters switched off is
the base model it was trained from, so "before" and "reference" cost no second copy.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from dpo_core.batch import PreferenceBatch
from dpo_core.collate import pad_right
from dpo_core.logp_types import CHUNK_SIZE, LogpOptions
from dpo_core.logps import token_logps


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


def progress(items, desc: str, *, total: int | None = None, unit: str = "batch"):
    """A tqdm bar on stderr, kept when done (it shows how long the pass took). Shown in a log
    file too, where it is redrawn at most every 10 s instead of every 0.1 s; ``TQDM_DISABLE=1``
    turns every bar off."""
    interval = 0.1 if sys.stderr.isatty() else 10.0
    return tqdm(
        items, desc=desc, total=total, unit=unit, file=sys.stderr, leave=True, mininterval=interval
    )


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
    chunk_size: int = CHUNK_SIZE,
    desc: str = "scoring",
) -> torch.Tensor:
    """``log π(completion | prompt)`` summed over completion tokens, (N,) float32 on CPU.

    Batched by length (shortest first), so that a batch pads little; the values come back in
    the order given."""
    n = len(prompt_ids)
    order = sorted(range(n), key=lambda i: len(prompt_ids[i]) + len(completion_ids[i]))
    values = torch.empty(n, dtype=torch.float32)
    bar = progress(None, desc, total=n, unit="seq")
    with view.active() as model, torch.no_grad(), bar:
        for rows in batches(n, batch_size):
            picked = [order[i] for i in rows]
            batch = completion_batch(
                [prompt_ids[i] for i in picked], [completion_ids[i] for i in picked], pad_id
            ).to(view.device)
            options = LogpOptions(chunk_size=chunk_size, prompt_sharing=False)  # rows, not pairs
            values[picked] = token_logps(model, batch, options).row_sums().float().cpu()
            bar.update(len(rows))
    return values


class CompletionScores:
    """``score_completions`` that remembers: within one evaluation each (model, prompt,
    completion) is scored once. The KL estimate and the implicit judge ask for the same samples
    under the same models, and the judge's baselines are the same for both policies' samples."""

    def __init__(self, pad_id: int, *, batch_size: int = 16) -> None:
        self.pad_id, self.batch_size = pad_id, batch_size
        self.memo: list[tuple[ModelView, dict[tuple[tuple[int, ...], tuple[int, ...]], float]]] = []

    def _memo(self, view: ModelView) -> dict:
        for seen, values in self.memo:
            if seen.same_as(view):
                return values
        self.memo.append((view, {}))
        return self.memo[-1][1]

    def __call__(
        self,
        view: ModelView,
        prompt_ids: Sequence[list[int]],
        completion_ids: Sequence[list[int]],
        desc: str,
    ) -> torch.Tensor:
        """(N,) float32, as ``score_completions``; only sequences not seen under ``view`` run."""
        memo = self._memo(view)
        keys = [(tuple(p), tuple(c)) for p, c in zip(prompt_ids, completion_ids, strict=True)]
        missing = [k for k in dict.fromkeys(keys) if k not in memo]
        if missing:
            prompts, completions = [list(p) for p, _ in missing], [list(c) for _, c in missing]
            values = score_completions(
                view, prompts, completions, self.pad_id, batch_size=self.batch_size, desc=desc
            )
            memo.update(zip(missing, values.tolist(), strict=True))
        return torch.tensor([memo[k] for k in keys], dtype=torch.float32)
