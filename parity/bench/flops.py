"""FLOP accounting for ``python -m parity.bench``: what a DPO step computes, and the matmul peak.

Only matrix multiplies are counted (2 FLOPs per multiply-add); norms, rotary embeddings,
softmaxes and the optimizer are not. For a decoder of ``layers`` layers whose attention is
``a = heads x head_dim`` wide, with ``W`` the multiply-adds per token of every Linear / Conv1D
in the backbone (its layers; LoRA adapters included, embedding lookups excluded) and a head of
``d x V`` (hidden size d, vocabulary V):

    linear forward     2 W                  per position through the backbone
    linear backward    2 (W + W_trainable)  per position: every input gradient (frozen base
                                            weights too: gradients flow through them to the
                                            layers below), a weight gradient only where the
                                            weight trains (full fine-tuning: 2x forward; LoRA:
                                            ~1x forward of the base plus 2x its adapters)
    attention forward  4 layers a           per (query, key) pair computed (q kᵀ and p v)
    attention backward 2x its forward       (flash attention's recompute of the scores is
                                            not counted)
    recompute          one more forward of the layers under gradient checkpointing
    head               2 d V                per scored position and per matmul: forward 1,
                                            backward grad_h 1 + grad_W 1 (when the head trains)
                                            + 1 when backward recomputes the logits

Attention pairs, our convention: a causal kernel (no mask tensor: SDPA's ``is_causal``, e.g.
unpadded rows) computes ``n (n + 1) / 2`` pairs of a row of n; a kernel given a mask tensor
(padding, our block masks) or eager attention computes all ``n²``.

Two counts per optimizer step (``Work``: linear, attention, recompute, head):

- executed (``flops_per_step``, ``hfu``): what the side runs, from its actual backbone calls
  (``parity.bench.flop_meters.PassRecorder``: rows x length, padding included, each call of the
  policy and of a live reference) and its head rule (``trl_head_positions``,
  ``ours_head_matmuls``).
- necessary (``model_flops_per_step``, ``mfu``): the least an exact DPO step computes on the
  step's pairs (``necessary_work``): the policy's forward and backward over each real token
  once (the prompt once per pair, then chosen and rejected), causal attention over each
  token's own context (prompt + its completion so far), the head (forward and backward) on the
  scored completion positions only, no padding, no recompute, no reference forward (the
  reference log-probs depend on frozen weights and the data only, so they can be computed once
  before training). The same for every side that trains the same batches, so MFU ratios are
  speed ratios, and ``necessary / peak`` is the fastest step this machine could run: MFU is the
  fraction of that limit a side reaches.

Not covered: mixture-of-experts layers (all experts are counted), sliding-window attention
(counted as full causal), layers without attention.
"""

from __future__ import annotations

from dataclasses import asdict, astuple, dataclass

import torch
from torch import nn

from dpo_core.model_parts import model_parts, unwrap_peft


@dataclass(frozen=True)
class DecoderShape:
    """What the count needs from a causal LM (``decoder_shape`` reads it off the model).

    Attributes:
        layers: decoder layers. attention_width: heads x head_dim (query heads; GQA shares
            key/value heads but every query head computes its own scores).
        matmul_weights: W, multiply-adds per token of the backbone's Linear / Conv1D layers.
        trainable_weights: the part of W whose weights train (full fine-tuning: W; LoRA: the
            adapters). adapter_weights: the part of W in LoRA adapters (``lora_`` modules).
        hidden_size, vocab_size: the head's d and V. head_trainable: the head's weight trains
            (tied to the embeddings or not).
    """

    layers: int
    attention_width: int
    matmul_weights: int
    trainable_weights: int
    adapter_weights: int
    hidden_size: int
    vocab_size: int
    head_trainable: bool

    @property
    def head_weights(self) -> int:
        """d x V, the head's multiply-adds per scored position."""
        return self.hidden_size * self.vocab_size


@dataclass
class Work:
    """FLOPs of one step (or one pass), by where they go."""

    linear: float = 0.0
    attention: float = 0.0
    recompute: float = 0.0
    head: float = 0.0

    @property
    def total(self) -> float:
        return self.linear + self.attention + self.recompute + self.head

    def __add__(self, other: Work) -> Work:
        return Work(*(a + b for a, b in zip(astuple(self), astuple(other), strict=True)))

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "total": self.total}


def _matmul_size(module: nn.Module) -> int | None:
    """Multiply-adds per token of a Linear (bnb 4-bit included) or transformers' Conv1D (gpt2)."""
    if isinstance(module, nn.Linear):
        return module.in_features * module.out_features
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:
        return module.weight.shape[0] * module.weight.shape[1]  # (nx, nf)
    return None


def decoder_shape(model: nn.Module) -> DecoderShape:
    """The ``DecoderShape`` of a transformers causal LM, optionally peft-wrapped: the matmuls
    from the backbone's modules (any architecture), layers and attention width from the config
    (``num_hidden_layers``, ``num_attention_heads``, ``head_dim`` or hidden / heads; gpt2's
    ``n_layer``/``n_head`` through its attribute map)."""
    parts = model_parts(model)
    total = trainable = adapter = 0
    for name, module in parts.backbone.named_modules():
        size = _matmul_size(module)
        if size is None:
            continue
        total += size
        trainable += size if module.weight.requires_grad else 0
        adapter += size if "lora_" in name else 0
    config = unwrap_peft(model).config.get_text_config()
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    vocab, hidden = parts.head.weight.shape  # (V, d), tied to the embeddings or not
    return DecoderShape(
        layers=config.num_hidden_layers,
        attention_width=heads * head_dim,
        matmul_weights=total,
        trainable_weights=trainable,
        adapter_weights=adapter,
        hidden_size=hidden,
        vocab_size=vocab,
        head_trainable=parts.head.weight.requires_grad,
    )


# ------------------------------------------------------------------------------ formulas


def causal_pairs(n: int) -> int:
    """(query, key) pairs of causal attention over a row of n: 1 + 2 + ... + n."""
    return n * (n + 1) // 2


def linear_flops(shape: DecoderShape, positions: int, backward: bool) -> float:
    """2 W per position forward, plus 2 (W + W_trainable) backward."""
    w = shape.matmul_weights
    forward = 2.0 * w * positions
    return forward + (2.0 * (w + shape.trainable_weights) * positions if backward else 0.0)


def attention_flops(shape: DecoderShape, pairs: int, backward: bool) -> float:
    """4 layers a per (query, key) pair forward; backward 2x that."""
    forward = 4.0 * shape.layers * shape.attention_width * pairs
    return forward * (3 if backward else 1)


def head_flops(shape: DecoderShape, positions: int, matmuls: int) -> float:
    """2 d V per scored position and per matmul of the head."""
    return 2.0 * shape.head_weights * positions * matmuls


@dataclass(frozen=True)
class Pass:
    """One call of a backbone: ``rows`` x ``length`` positions (padding included).

    Attributes:
        square: the attention computes all length² pairs of a row (a mask tensor or eager
            attention), not the causal half. grad: a backward follows (the policy).
        recompute: the fraction of the layers whose forward gradient checkpointing reruns in
            backward (transformers' ``every_n_layers``; 1.0: all of them).
    """

    rows: int
    length: int
    square: bool
    grad: bool
    recompute: float = 0.0


def pass_work(shape: DecoderShape, p: Pass) -> Work:
    """The backbone FLOPs of one ``Pass`` (the head is counted per trainer, below)."""
    positions = p.rows * p.length
    pairs = p.rows * (p.length**2 if p.square else causal_pairs(p.length))
    forward = linear_flops(shape, positions, False) + attention_flops(shape, pairs, False)
    return Work(
        linear=linear_flops(shape, positions, p.grad),
        attention=attention_flops(shape, pairs, p.grad),
        recompute=forward * p.recompute if p.grad else 0.0,
    )


# ----------------------------------------------------------------------- necessary work


@dataclass(frozen=True)
class PairTokens:
    """What the necessary work of a micro-batch depends on.

    Attributes:
        tokens: distinct real tokens, each prompt once per pair. pairs: causal (query, key)
            pairs over each token's own context. scored: completion positions scored.
    """

    tokens: int
    pairs: int
    scored: int


def pair_tokens(attention_mask: torch.Tensor, completion_mask: torch.Tensor) -> PairTokens:
    """``PairTokens`` of 2B rows ``[chosen..., rejected...]`` (2B, L), right- or left-padded.

    Pair i with prompt P, completions C and R (both rows' prompts P long; otherwise the two
    rows count as separate sequences): P + C + R tokens and
    ``P(P+1)/2 + C P + C(C+1)/2 + R P + R(R+1)/2`` pairs. Example: P=2, C=3, R=1 gives 6
    tokens and 3 + 6 + 6 + 2 + 1 = 18 pairs (the two plain rows: 15 + 6 = 21, prompt twice).
    """
    lengths = attention_mask.long().sum(dim=1).tolist()
    completions = completion_mask.long().sum(dim=1).tolist()
    half = len(lengths) // 2
    tokens = pairs = 0
    for i in range(half):
        (nc, nr), (c, r) = (lengths[i], lengths[i + half]), (completions[i], completions[i + half])
        p = nc - c
        if p == nr - r:
            tokens += p + c + r
            pairs += causal_pairs(p) + c * p + causal_pairs(c) + r * p + causal_pairs(r)
        else:
            tokens += nc + nr
            pairs += causal_pairs(nc) + causal_pairs(nr)
    scored = int(completion_mask[:, 1:].long().sum())
    return PairTokens(tokens, pairs, scored)


def necessary_work(shape: DecoderShape, batch: PairTokens) -> Work:
    """The least an exact DPO step computes on a micro-batch (module docstring): the policy's
    forward and backward over ``batch.tokens``, causal attention, the head on scored positions
    (forward, grad_h, and grad_W when the head trains)."""
    head_matmuls = 2 + int(shape.head_trainable)
    return Work(
        linear=linear_flops(shape, batch.tokens, True),
        attention=attention_flops(shape, batch.pairs, True),
        head=head_flops(shape, batch.scored, head_matmuls),
    )


# ------------------------------------------------------------- what each trainer executes


def trl_head_matmuls(shape: DecoderShape, grad: bool) -> int:
    """trl 1.16's ``ChunkedLogProbFunction``: forward 1; backward recomputes the logits, then
    grad_h, and grad_W when the head trains (trl/kernels/chunked_logprob.py:394-451); the
    reference's forward only."""
    if not grad:
        return 1
    return 3 + int(shape.head_trainable)


def trl_head_positions(p: Pass) -> int:
    """trl without Triton (CPU) projects every position but the last of every row it forwards,
    padding and prompt included (trainer/utils.py ``_fused_forward``, ``compact`` False)."""
    return p.rows * (p.length - 1)


def ours_head_matmuls(
    shape: DecoderShape, scored: int, *, keep_probs_bytes: int, linear_kernel: bool, chunk_size: int
) -> int:
    """Our policy head (``dpo_core.lm_head``) on ``scored`` positions: forward 1, grad_h 1,
    grad_W 1 when the head trains, and a recompute of the logits in backward when the float32
    Linear kernel cannot keep the (T, V) softmax within ``keep_probs_bytes``, or when any other
    head runs more than one chunk (each under activation checkpointing)."""
    if linear_kernel:
        recompute = scored * shape.vocab_size * 4 > keep_probs_bytes
    else:
        recompute = scored > chunk_size
    return 2 + int(shape.head_trainable) + int(recompute)


@dataclass(frozen=True)
class HeadRule:
    """How a side's head runs.

    Attributes:
        trainer: ``trl`` or ``ours``. compact: trl scores completion positions only (Triton on
            CUDA/XPU), not every position. keep_probs_bytes, chunk_size, linear_kernel: ours'
            head options (``ours_head_matmuls``).
    """

    trainer: str
    compact: bool = False
    keep_probs_bytes: int = 0
    chunk_size: int = 1024
    linear_kernel: bool = True


def executed_work(
    shape: DecoderShape, rule: HeadRule, passes: list[Pass], batches: list[PairTokens]
) -> Work:
    """What a side computed in one step: its backbone ``passes`` and its head. trl on CPU
    projects every forwarded position (``trl_head_positions``) of each pass; otherwise each
    micro-batch's scored positions go through the policy's head (when a pass had gradients)
    and the live reference's (when a pass had none), as ours does."""
    work = sum((pass_work(shape, p) for p in passes), Work())
    if rule.trainer == "trl" and not rule.compact:
        for p in passes:
            matmuls = trl_head_matmuls(shape, p.grad)
            work += Work(head=head_flops(shape, trl_head_positions(p), matmuls))
        return work
    policy, reference = any(p.grad for p in passes), any(not p.grad for p in passes)
    for b in batches:
        if policy:
            work += Work(head=head_flops(shape, b.scored, _policy_head_matmuls(shape, rule, b)))
        if reference:
            work += Work(head=head_flops(shape, b.scored, 1))
    return work


def _policy_head_matmuls(shape: DecoderShape, rule: HeadRule, batch: PairTokens) -> int:
    if rule.trainer == "trl":
        return trl_head_matmuls(shape, True)
    return ours_head_matmuls(
        shape,
        batch.scored,
        keep_probs_bytes=rule.keep_probs_bytes,
        linear_kernel=rule.linear_kernel,
        chunk_size=rule.chunk_size,
    )
