"""The logit transforms a causal LM may apply after its head, and which one a model applies.

Some families change the logits after the LM head's product: Gemma 2/3 soft-cap them
(``z -> c tanh(z / c)``, ``final_logit_softcapping``), RecurrentGemma too (``logits_soft_cap``),
Cohere multiplies them (``logit_scale``), Granite divides them (``logits_scaling``), others call
it ``output_multiplier`` or ``lm_head_multiplier``. Reading one list of names is how trl does it
(trl/trainer/utils.py:1568-1590), and a name off the list is scored wrong without a word.

Here every number the config holds under a name that says soft-cap or logit scale/multiplier is
a candidate, as a product or a quotient, with or without each soft-cap; the model's own forward
decides which one it is (``closest_transform``, run by ``model_parts`` on a probe). The order
of operations is trl's kernel's (trl/kernels/chunked_logprob.py ``_torch_transform``): scale,
then soft-cap.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable

import torch

LogitTransform = Callable[[torch.Tensor], torch.Tensor]

_SOFTCAP_NAME = re.compile(r"soft_?cap")
_SCALE_NAME = re.compile(r"logits?_?scal|multiplier")


class UnknownLogitTransform(ValueError):
    """The model's own logits are not its head's output under any transform its config names."""


def _numbers(config, pattern: re.Pattern) -> list[tuple[str, float]]:
    """(name, value) of the config's positive, finite numbers whose name matches ``pattern``."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    items = text.to_dict().items() if hasattr(text, "to_dict") else vars(text).items()
    found = []
    for name, value in sorted(items):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if pattern.search(name) and 0 < value < float("inf"):
            found.append((name, float(value)))
    return found


def make_transform(scale: float, softcap: float | None) -> LogitTransform | None:
    """``z -> softcap * tanh(z * scale / softcap)`` (no cap: ``z * scale``); None for identity."""
    if softcap is None and scale == 1.0:
        return None

    def transform(logits: torch.Tensor) -> torch.Tensor:
        z = logits * scale if scale != 1.0 else logits
        return z if softcap is None else softcap * torch.tanh(z / softcap)

    return transform


def candidates(config) -> list[tuple[str, LogitTransform | None]]:
    """Identity first, then every (scale, soft-cap) combination the config's numbers allow."""
    scales = [("", 1.0)]
    for name, value in _numbers(config, _SCALE_NAME):
        if value != 1.0:
            scales += [(f"x {name}={value:g}", value), (f"/ {name}={value:g}", 1.0 / value)]
    caps = [
        ("", None),
        *((f"softcap {name}={v:g}", v) for name, v in _numbers(config, _SOFTCAP_NAME)),
    ]
    found = []
    for (scale_name, scale), (cap_name, cap) in itertools.product(scales, caps):
        name = ", ".join(n for n in (scale_name, cap_name) if n) or "none"
        found.append((name, make_transform(scale, cap)))
    return found


def closest_transform(
    logits: torch.Tensor, own_logits: torch.Tensor, config
) -> tuple[str, LogitTransform | None, float]:
    """The candidate under which ``logits`` (n, V, the head's raw output) best reproduce the model's
    ``own_logits`` (n, V), compared as float64 log-softmaxes (a constant shift is harmless):
    ``(name, transform, max |difference|)``."""
    target = own_logits.double().log_softmax(dim=-1)
    best = ("none", None, float("inf"))
    for name, transform in candidates(config):
        z = logits if transform is None else transform(logits)
        error = float((z.double().log_softmax(dim=-1) - target).abs().max())
        if error < best[2]:
            best = (name, transform, error)
    return best
