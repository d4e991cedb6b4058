"""4-bit (bitsandbytes NF4) layers on CPU: keep them trainable, and refuse to train if they are not.

The defect this guards against (bitsandbytes 0.50.x, ``bitsandbytes/nn/modules.py``,
``Linear4bit.forward``): on a CPU with AVX-512 BF16 (``has_avx512bf16()``), the first forward
of a ``Linear4bit`` that is not in training mode, on an input that does not require grad (a
reference forward, the reference precomputation, an evaluation pass: any no-grad pass), repacks
the weight *in place* into a CPU inference layout (``_convert_weight_packed_for_cpu``: absmax to
bf16, ``quant_state.packing_format_for_cpu = True``). From then on ``matmul_4bit`` routes every
call, training included, to ``gemv_4bit``, which has no autograd kernel: the gradient through
each frozen 4-bit layer becomes zero, silently (torch only warns), and the forward itself moves
by ~1e-3. On AVX2 CPUs the path never runs, so the same run gives other numbers on other CPUs.

The fix: switch the fast path off on every ``Linear4bit`` as soon as the model is loaded
(``support_avx512bf16_for_cpu = False``, the attribute bitsandbytes reads), so every pass uses
the dequantize-then-matmul path that has a gradient, on every CPU. ``check_not_packed`` is the
guard the training loop runs at start: a model that reached training in the packed layout
stops the run with a message instead of training wrong.
"""

from __future__ import annotations

import sys

import torch


def _linear4bit_class():
    """bitsandbytes' ``Linear4bit`` if bitsandbytes is already imported, else None (a model
    with 4-bit layers has imported it; importing it here would only print its banner)."""
    bnb = sys.modules.get("bitsandbytes")
    return getattr(getattr(bnb, "nn", None), "Linear4bit", None) if bnb else None


def linear4bit_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """``(name, module)`` of every bitsandbytes ``Linear4bit`` in ``model``."""
    cls = _linear4bit_class()
    if cls is None:
        return []
    return [(name, m) for name, m in model.named_modules() if isinstance(m, cls)]


def disable_cpu_packing(model: torch.nn.Module) -> int:
    """Turn bitsandbytes' CPU inference repacking off on every 4-bit layer; returns how many.

    Must run before the model's first forward (see the module docstring)."""
    layers = linear4bit_layers(model)
    for _, module in layers:
        module.support_avx512bf16_for_cpu = False
    return len(layers)


def packed_layers(model: torch.nn.Module) -> list[str]:
    """Names of the 4-bit layers whose weight is in bitsandbytes' CPU inference layout."""
    return [
        name
        for name, m in linear4bit_layers(model)
        if getattr(getattr(m.weight, "quant_state", None), "packing_format_for_cpu", False)
    ]


def check_not_packed(model: torch.nn.Module, when: str) -> None:
    """Raise if any 4-bit layer of ``model`` is in the packed CPU layout (no gradient there)."""
    packed = packed_layers(model)
    if packed:
        more = f" and {len(packed) - 1} more" if len(packed) > 1 else ""
        raise RuntimeError(
            f"{when}: 4-bit layer {packed[0]}{more} is in bitsandbytes' CPU inference layout "
            "(packing_format_for_cpu), where it has no gradient: training would silently leave "
            "the base's input gradients at zero. Load 4-bit models with "
            "training.inputs.four_bit.disable_cpu_packing before their first forward."
        )
