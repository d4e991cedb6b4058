"""The two halves of a causal LM that ``dpo_core.logps`` needs: the backbone and the LM head.

trl's fused head (trl/trainer/utils.py:1548-1698) runs ``model.base_model`` to get the last hidden
states and then projects them with ``model.get_output_embeddings()``, after scaling the logits the
way the model's own forward does (utils.py:1568-1590). We do the same through
``model.get_decoder()``, which is the same module for llama / qwen2 / mistral / gpt2 in
transformers 5, and unwrap a peft ``PeftModel`` first: its LoRA layers live inside the base model,
so running the base model's decoder runs the adapters too (unless ``disable_adapter()`` is active).

peft is not imported: a ``PeftModel`` is recognised by its ``get_base_model`` method.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

LogitTransform = Callable[[torch.Tensor], torch.Tensor]


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model under a peft ``PeftModel`` (adapters stay injected), else ``model``.

    Prompt-learning adapters (prompt / prefix tuning) live outside the base model and are
    refused: running the base model's decoder would silently skip them.
    """
    get_base_model = getattr(model, "get_base_model", None)
    if not callable(get_base_model):
        return model
    config = getattr(model, "active_peft_config", None)
    if getattr(config, "is_prompt_learning", False):
        raise NotImplementedError(
            f"model_parts: prompt-learning peft adapters ({type(config).__name__}) are not "
            "supported; use LoRA-style adapters, which live inside the base model."
        )
    return get_base_model()


@dataclass
class ModelParts:
    """What ``dpo_core.logps`` calls.

    Attributes:
        backbone: the decoder; ``backbone(input_ids=..., attention_mask=...)`` returns
            ``last_hidden_state`` of shape (N, L, H).
        head: the LM head, any module mapping (n, H) -> (n, V).
        logit_transform: the model's own logit scaling (softcap / logit_scale), or None.
    """

    backbone: nn.Module
    head: nn.Module
    logit_transform: LogitTransform | None


def model_parts(model: nn.Module) -> ModelParts:
    """Backbone, head and logit transform of a transformers causal LM (optionally peft-wrapped)."""
    base = unwrap_peft(model)
    for method in ("get_decoder", "get_output_embeddings"):
        if not callable(getattr(base, method, None)):
            raise TypeError(
                f"model_parts: {type(base).__name__} has no {method}(); expected a transformers "
                "causal LM (e.g. LlamaForCausalLM) or a peft PeftModel wrapping one."
            )
    head = base.get_output_embeddings()
    if head is None:
        raise TypeError(f"model_parts: {type(base).__name__}.get_output_embeddings() is None.")
    config = getattr(base, "config", None)
    transform = logit_transform_from_config(config) if config is not None else None
    return ModelParts(backbone=base.get_decoder(), head=head, logit_transform=transform)


def _logit_scale(text_config) -> float:
    """trl's reading of the scale applied before the softcap (utils.py:1571-1584)."""
    scale = getattr(text_config, "logit_scale", None)
    if scale is None:
        scale = getattr(text_config, "output_multiplier", None)
    if scale is None:
        scale = getattr(text_config, "lm_head_multiplier", None)
    if scale is None and getattr(text_config, "logits_scaling", None) is not None:
        scaling = text_config.logits_scaling
        scale = scaling if text_config.model_type == "hyperclovax" else 1 / scaling
    return 1.0 if scale is None else scale


def logit_transform_from_config(config) -> LogitTransform | None:
    """``z -> softcap * tanh(z * scale / softcap)`` as trl's kernel applies it, or None if identity.

    Source: trl/kernels/chunked_logprob.py ``_torch_transform`` (scale, then softcap, then
    temperature, which DPO leaves at 1); the scale and softcap are read from the text config as in
    trl/trainer/utils.py:1568-1590 (Gemma 2's ``final_logit_softcapping``, Cohere's
    ``logit_scale``, Granite's ``logits_scaling``, ...).
    """
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    softcap = getattr(text_config, "final_logit_softcapping", None)
    scale = _logit_scale(text_config)
    if softcap is None and scale == 1.0:
        return None

    def transform(logits: torch.Tensor) -> torch.Tensor:
        z = logits * scale
        return z if softcap is None else softcap * torch.tanh(z / softcap)

    return transform
