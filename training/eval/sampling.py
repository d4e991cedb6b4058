"""Sampling completions for held-out prompts, and scoring token sequences under a model.

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
from transformers import GenerationConfig

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


@dataclass(frozen=True)
class SamplingSettings:
    """How completions are drawn (see ``training.run.config.EvalConfig``)."""

    max_new_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 64
    seed: int = 0


def _generation_config(tokenizer, s: SamplingSettings) -> GenerationConfig:
    """Plain ancestral sampling: no top-k (transformers defaults to 50), no penalties."""
    return GenerationConfig(
        do_sample=True,
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=0,
        max_new_tokens=s.max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        use_cache=True,
    )


def left_pad(seqs: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (N, L) long, each row right-aligned (what generate
    needs: every row's next token goes at the same position L)."""
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, length - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        mask[row, length - len(seq) :] = 1
    return ids, mask


def cut_at_eos(ids: list[int], eos_id: int | None) -> list[int]:
    """The generated ids up to and including the first EOS (what follows is padding)."""
    if eos_id is not None and eos_id in ids:
        return ids[: ids.index(eos_id) + 1]
    return ids


def _batches(n: int, size: int) -> list[range]:
    return [range(start, min(n, start + size)) for start in range(0, n, size)]


def _progress(items, desc: str):
    """A transient tqdm bar on a terminal; nothing when output goes to a file or pipe."""
    return tqdm(items, desc=desc, leave=False, disable=None)


def sample_completions(
    view: ModelView,
    prompt_ids: Sequence[list[int]],
    tokenizer,
    settings: SamplingSettings,
    *,
    desc: str = "sampling",
) -> list[list[int]]:
    """One sampled completion (token ids, EOS included if generated) per prompt.

    The global RNG is seeded with ``settings.seed`` inside ``fork_rng``, so the draw is
    reproducible and the caller's random state is left as it was.
    """
    config = _generation_config(tokenizer, settings)
    device = view.device
    out: list[list[int]] = []
    forked = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=forked), view.active() as model, torch.no_grad():
        torch.manual_seed(settings.seed)
        for rows in _progress(_batches(len(prompt_ids), settings.batch_size), desc):
            ids, mask = left_pad([prompt_ids[i] for i in rows], tokenizer.pad_token_id)
            generated = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config
            )
            new = generated[:, ids.shape[1] :].tolist()
            out += [cut_at_eos(seq, tokenizer.eos_token_id) for seq in new]
    return out


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
        for rows in _progress(_batches(len(prompt_ids), batch_size), desc):
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
        for batch in _progress(batches, "held-out pairs"):
            token = model_token_logps(model, batch.to(view.device), chunk_size=chunk_size)
            c, r = split_pairs(sequence_logps(token).float().cpu())
            chosen.append(c)
            rejected.append(r)
    return torch.cat(chosen), torch.cat(rejected)
