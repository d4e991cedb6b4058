"""Measuring for ``parity.bench.flops``: the backbone calls a side makes; the matmul peak.

``PassRecorder`` hooks a model's backbone and records each call (rows x length, whether its
attention is square, with or without gradients, the share of layers recomputed) between
``start`` and ``stop``; ``flop_counts`` turns a bench meter's recorded steps into the executed
and necessary FLOPs per step (``parity.bench.flops``); ``peak_matmul_flops`` times square matmuls on
the calling process's threads.
"""

from __future__ import annotations

import dataclasses
import time

import torch
from torch import nn

from dpo_core.model_parts import model_parts, unwrap_peft
from parity.bench import flops
from parity.bench.flops import Pass

# --------------------------------------------------------------------- recording calls


class PassRecorder:
    """Records every backbone call (a ``Pass``) of the models it is attached to, between
    ``start`` and ``stop`` (one optimizer step)."""

    def __init__(self) -> None:
        self.passes: list[Pass] | None = None  # None: not inside a step
        self._seen: set[int] = set()

    def attach(self, model: nn.Module | None) -> None:
        """Hook ``model``'s backbone (once, however many times it is attached)."""
        if model is None:
            return
        backbone = model_parts(model).backbone
        if id(backbone) in self._seen:
            return
        self._seen.add(id(backbone))
        attention = getattr(unwrap_peft(model).config, "_attn_implementation", None) or "sdpa"
        # transformers marks each checkpointed layer (and the backbone) ``gradient_checkpointing``
        # when training starts; read the flags at each call
        layers = [m for m in backbone.modules() if hasattr(m, "gradient_checkpointing")]
        layers = [m for m in layers if m is not backbone] or layers

        def hook(module, args, kwargs):
            if self.passes is None:
                return
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is None:
                ids = kwargs["inputs_embeds"]
            grad = torch.is_grad_enabled()
            square = attention_is_square(kwargs.get("attention_mask"), attention)
            rows, length = ids.shape[:2]
            rerun = sum(bool(m.gradient_checkpointing) for m in layers) / max(1, len(layers))
            recompute = rerun if grad and module.training else 0.0
            self.passes.append(Pass(rows, length, square, grad, recompute))

        backbone.register_forward_pre_hook(hook, with_kwargs=True)

    def start(self) -> None:
        self.passes = []

    def stop(self) -> list[Pass]:
        passes, self.passes = self.passes or [], None
        return passes


def attention_is_square(mask: torch.Tensor | None, implementation: str) -> bool:
    """Whether a call's attention computes every (query, key) pair of its rows: eager always;
    SDPA when a mask tensor reaches the kernel (transformers drops an all-ones 2D mask and uses
    ``is_causal``); flash-attention kernels run causal on the real tokens."""
    if implementation == "eager":
        return True
    if implementation.startswith("flash") or mask is None:
        return False
    return not (mask.dim() == 2 and bool(mask.all()))


# ------------------------------------------------------------------------ matmul peak


def peak_matmul_flops(
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    n: int | None = None,
    repeats: int = 5,
) -> float:
    """The best FLOP/s of ``repeats`` square (n x n) @ (n x n) matmuls after one warm-up, on
    the calling thread's torch threads (``torch.set_num_threads``): 2 n³ / fastest time.
    n defaults to 2048 on CPU (where fp32 and bf16 GEMMs plateau), 8192 on CUDA."""
    n = n or (8192 if device.startswith("cuda") else 2048)
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, generator=generator, device=device).to(dtype)
    b = torch.randn(n, n, generator=generator, device=device).to(dtype)
    out = torch.empty(n, n, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    best = float("inf")
    for i in range(repeats + 1):
        sync()
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        sync()
        if i:  # the first is the warm-up
            best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best


# ----------------------------------------------------------------- per-step counts


def flop_counts(meter, device: str) -> dict:
    """Per step, the FLOPs executed (by part) and the necessary ones (``parity.bench.flops``), and
    the matmul peak of this process (after training, on the same threads) per dtype."""
    shape, rule = meter.shape, meter.head_rule
    if shape is None:  # training never started
        return {}
    executed = [
        flops.executed_work(shape, rule, passes, pairs).as_dict()
        for passes, pairs in zip(meter.step_passes, meter.step_pairs, strict=True)
    ]
    necessary = [
        sum((flops.necessary_work(shape, b) for b in pairs), flops.Work()).total
        for pairs in meter.step_pairs
    ]
    dtypes = dict.fromkeys(("float32", "bfloat16", meter.compute_dtype))
    peaks = {d: peak_matmul_flops(getattr(torch, d), device) for d in dtypes}
    return {
        "step_flops": executed,
        "step_model_flops": necessary,
        "compute_dtype": meter.compute_dtype,
        "matmul_peak_flops_per_s": peaks,
        "decoder_shape": dataclasses.asdict(shape),
    }
