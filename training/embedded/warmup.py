"""A short causal-LM warm-up that turns a randomly initialised model into a "pretrained" one.

The DPO paper, when no SFT model exists, first fine-tunes the base model on the preferred
completions (Rafailov et al., 2023, §4). The embedded default goes one step further back: it
trains the model on **both** completions of every pair, so that the starting model writes
preferred and dispreferred answers alike (about half each when sampling) and DPO has something
to move. Plain torch, seeded, one line of progress every ``log_every`` steps.

The loss is next-token cross-entropy over every real token of ``<s> prompt completion </s>``
(padding excluded): the model learns the openings too, which a pretrained model would know.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class WarmupConfig:
    """Settings of the warm-up loop.

    Attributes:
        steps: optimizer steps.
        batch_size: texts per step.
        lr: peak AdamW learning rate.
        ramp_steps: steps of linear learning-rate ramp from 0 before the cosine decay.
        final_lr_fraction: the cosine decays to ``lr * final_lr_fraction`` at the last step.
        weight_decay: AdamW weight decay.
        max_grad_norm: gradient clipping threshold (total L2 norm).
        log_every: print progress every this many steps (and at the last step).
    """

    steps: int = 1000
    batch_size: int = 32
    lr: float = 5e-3
    ramp_steps: int = 20
    final_lr_fraction: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    log_every: int = 100

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.log_every < 1:
            raise ValueError(f"WarmupConfig: steps, batch_size, log_every must be >= 1: {self}")
        if self.lr <= 0 or not 0 <= self.final_lr_fraction <= 1 or self.ramp_steps < 0:
            raise ValueError(f"WarmupConfig: need lr > 0, 0 <= final_lr_fraction <= 1: {self}")


def both_responses(rows: Sequence[dict], eos_token: str) -> list[str]:
    """The warm-up texts: ``prompt + chosen + eos`` and ``prompt + rejected + eos`` per row.

    These are the exact strings trl tokenises for a standard-format row (it appends the EOS as
    text), so the warm-up sees the same ids DPO will.
    """
    return [r["prompt"] + r[key] + eos_token for r in rows for key in ("chosen", "rejected")]


def lr_at(step: int, config: WarmupConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear ramp, then cosine decay.

    ``lr * (step + 1) / ramp_steps`` during the ramp; afterwards, with progress
    ``p = (step - ramp_steps) / max(1, steps - 1 - ramp_steps)`` in [0, 1],
    ``lr * (f + (1 - f) * (1 + cos(pi p)) / 2)`` where ``f = final_lr_fraction``.
    """
    if step < config.ramp_steps:
        return config.lr * (step + 1) / config.ramp_steps
    p = (step - config.ramp_steps) / max(1, config.steps - 1 - config.ramp_steps)
    f = config.final_lr_fraction
    return config.lr * (f + (1 - f) * (1 + math.cos(math.pi * min(p, 1.0))) / 2)


def causal_lm_loss(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Mean next-token cross-entropy over real tokens.

    Args:
        input_ids: (N, L) right-padded ids.
        attention_mask: (N, L), 1 on real tokens.

    Returns:
        A scalar: ``-mean_{t: mask[t+1]=1} log p(x_{t+1} | x_{<=t})``.
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # (N, L, V)
    targets = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)  # (N, L-1)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten())


def _batches(n: int, batch_size: int, steps: int, generator: torch.Generator):
    """Index tensors for ``steps`` batches: seeded reshuffles of ``range(n)``, epoch by epoch."""
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        while len(order) < batch_size:  # a batch may span epochs (or, for tiny n, several)
            order = torch.cat([order, torch.randperm(n, generator=generator)])
        yield order[:batch_size]
        order = order[batch_size:]


def warmup_causal_lm(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    config: WarmupConfig = WarmupConfig(),
    *,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> list[float]:
    """Train ``model`` in place on ``texts`` with the causal-LM loss; return the per-step losses.

    Texts are tokenised once (the tokenizer adds ``<s>``); each step pads its batch on the right
    to its own longest text. Batches come from seeded reshuffles, so a run is reproducible on
    the same machine and thread count.
    """
    if not texts:
        raise ValueError("warmup_causal_lm: texts is empty")
    if tokenizer.pad_token_id is None:
        raise ValueError("warmup_causal_lm: the tokenizer has no pad token to pad batches with")
    encoded = [torch.tensor(ids) for ids in tokenizer(list(texts))["input_ids"]]
    pad_id = tokenizer.pad_token_id
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    generator = torch.Generator().manual_seed(seed)
    model.train()
    losses, start = [], time.perf_counter()
    batches = _batches(len(encoded), config.batch_size, config.steps, generator)
    for step, index in enumerate(batches):
        seqs = [encoded[i] for i in index.tolist()]
        input_ids = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=pad_id)
        mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(s) for s in seqs], batch_first=True)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config)
        loss = causal_lm_loss(model, input_ids, mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        losses.append(loss.item())
        if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
            recent = losses[-config.log_every :]
            log(
                f"warm-up step {step + 1}/{config.steps}  loss {sum(recent) / len(recent):.3f}"
                f"  ({time.perf_counter() - start:.0f} s)"
            )
    model.eval()
    return losses
