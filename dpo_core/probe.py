"""A few tokens to ask a model what its own forward does, and the float bound answers are held to.

Three questions are answered by running the model on a probe, once per model, instead of by
reading its config or its class name (``dpo_core.model_parts`` finds the head and the logit
transform, ``dpo_core.packing`` decides whether packed rows equal plain ones,
``dpo_core.model_checks`` proves our log-probs equal a log-softmax of the model's own logits).
The probe is three preference pairs, (P, C, R) = (5, 3, 4), (3, 3, 1) and (2, 1, 1) tokens, ids
drawn from a fixed generator: small enough to cost nothing next to a training step, shaped so
that every packing path is exercised (the two short pairs share a row, so state carried across
segments shows; rejected positions restart after the prompt; a chosen shorter and longer than
its rejected).

The probe runs in evaluation mode (no dropout), without gradient and without autocast, so two
runs of it see the same computation; bitsandbytes 4-bit layers keep their training flag (a no-grad
forward in evaluation mode repacks their weights for inference on AVX-512 BF16 CPUs, see
``training/inputs/four_bit.py``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from dpo_core.batch import PreferenceBatch
from dpo_core.collate import PreferenceCollator

PROBE_SPANS = ((5, 3, 4), (3, 3, 1), (2, 1, 1))  # (prompt, chosen, rejected) tokens per pair
_FIRST_ID = 3  # skip the ids special tokens usually take (pad / bos / eos)


def probe_batch(vocab_size: int, device: torch.device | str = "cpu") -> PreferenceBatch:
    """The probe pairs as a collated batch (2B = 6 rows), ids in ``[3, vocab_size)``."""
    g = torch.Generator().manual_seed(0)
    low = _FIRST_ID if vocab_size > _FIRST_ID + 1 else 0

    def ids(n: int) -> list[int]:
        return torch.randint(low, vocab_size, (n,), generator=g).tolist()

    features = [
        {"prompt_ids": ids(p), "chosen_ids": ids(c), "rejected_ids": ids(r)}
        for p, c, r in PROBE_SPANS
    ]
    batch = PreferenceCollator(pad_token_id=0)(features)
    return batch.to(device)


def model_probe_batch(model: nn.Module) -> PreferenceBatch:
    """``probe_batch`` for ``model``: ids within its input embedding's rows (never quantized,
    unlike a 4-bit head whose packed weight has another shape), on its device."""
    embeddings = model.get_input_embeddings()
    return probe_batch(embeddings.weight.shape[0], model_device(model))


def model_device(model: nn.Module) -> torch.device:
    """Where the model's input embeddings live (the probe's ids go there)."""
    return next(model.parameters()).device


@contextmanager
def probe_mode(model: nn.Module) -> Iterator[None]:
    """Evaluation mode (4-bit layers excepted), no gradient, no autocast; every module's training
    flag is restored after."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        for m, _ in flags:
            if type(m).__name__ != "Linear4bit":
                m.training = False
        device_type = model_device(model).type
        with torch.no_grad(), torch.autocast(device_type, enabled=False):
            yield
    finally:
        for m, training in flags:
            m.training = training


def compute_dtype(head: nn.Module) -> torch.dtype:
    """The dtype the head's product is rounded in: its weight's, float32 for integer storage."""
    weight = getattr(head, "weight", None)
    if weight is None or not weight.dtype.is_floating_point:
        return torch.float32
    return weight.dtype


def logp_bound(logits: torch.Tensor, dtype: torch.dtype) -> float:
    """How far two correct computations of a log-prob may differ: 4 roundings at its size.

    ``log p_t = z_t - log Z`` with ``|log Z| <= max|z| + log V``: each side rounds the logits,
    the exponentials' sum and the subtraction at that magnitude, ``eps(dtype)`` relative each
    (float32 for a float32 head; the head's dtype when it computes in bf16 / fp16), so two
    computations that round differently differ by a few ``eps (max|z| + log V)``; 4 of them is
    the bound tests/dpo_core/test_packing.py holds packed against plain rows to (measured there:
    1.4 eps max|z| at most).
    """
    scale = float(logits.detach().abs().max()) + math.log(logits.shape[-1])
    return 4 * torch.finfo(dtype).eps * scale
