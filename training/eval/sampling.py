"""Sampling completions for held-out prompts: one seeded ``generate`` draw per prompt, as token
ids cut at EOS, so that ``training.eval.scoring`` scores them exactly as training scores data."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from training.eval.scoring import ModelView, batches, progress


@dataclass(frozen=True)
class SamplingSettings:
    """How completions are drawn (see ``training.base.config.EvalConfig``)."""

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


class StepTicker(StoppingCriteria):
    """Advances a progress bar by one per generated token position; never stops generation."""

    def __init__(self, bar) -> None:
        self.bar = bar

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        self.bar.update(1)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def cut_at_eos(ids: list[int], eos_id: int | None) -> list[int]:
    """The generated ids up to and including the first EOS (what follows is padding)."""
    if eos_id is not None and eos_id in ids:
        return ids[: ids.index(eos_id) + 1]
    return ids


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
    groups = batches(len(prompt_ids), settings.batch_size)
    # one tick per generated position of each batch: a batch of 64 prompts moves too
    bar = progress(None, desc, total=len(groups) * settings.max_new_tokens, unit="step")
    ticker = StoppingCriteriaList([StepTicker(bar)])
    with torch.random.fork_rng(devices=forked), view.active() as model, torch.no_grad(), bar:
        torch.manual_seed(settings.seed)
        for done, rows in enumerate(groups, start=1):
            ids, mask = left_pad([prompt_ids[i] for i in rows], tokenizer.pad_token_id)
            generated = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                generation_config=config,
                stopping_criteria=ticker,
            )
            new = generated[:, ids.shape[1] :].tolist()
            out += [cut_at_eos(seq, tokenizer.eos_token_id) for seq in new]
            bar.update(done * settings.max_new_tokens - bar.n)  # a batch that stopped early
    return out
