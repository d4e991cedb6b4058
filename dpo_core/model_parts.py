"""The parts of a causal LM that ``dpo_core.logps`` needs: backbone, head, logit transform.

trl's fused head (trl/trainer/utils.py:1548-1698) runs ``model.base_model`` to get the last hidden
states, projects them with ``model.get_output_embeddings()`` and scales the logits as it reads
the config (utils.py:1568-1590, a list of attribute names). A model that does anything else
(ModernBERT-decoder's prediction head between backbone and projection, RecurrentGemma's soft-cap
kept as ``logits_soft_cap``) is scored wrong by such a reading, silently. Here the parts are
found from the model itself: its own forward runs once on a probe (``dpo_core.probe``) with
hooks on its children, and the logit transform is the one under which our head reproduces the
model's own logits (``logit_transforms``); a model whose logits no candidate reproduces is
refused. The finding is kept per model (by module names, so adapters injected later still run).

A peft ``PeftModel`` is unwrapped first: its LoRA layers live inside the base model, so running
the base model's backbone runs the adapters too (unless ``disable_adapter()`` is active). peft is
not imported: a ``PeftModel`` is recognised by its ``get_base_model`` method.
"""

from __future__ import annotations

from dataclasses import dataclass
from weakref import WeakKeyDictionary

import torch
from torch import nn

from dpo_core.logit_transforms import LogitTransform, UnknownLogitTransform, closest_transform
from dpo_core.probe import compute_dtype, logp_bound, model_probe_batch, probe_mode


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
    """What ``dpo_core.logps`` calls, found by ``model_parts``.

    Attributes:
        backbone: the decoder; ``backbone(input_ids=..., attention_mask=...)`` returns
            ``last_hidden_state`` of shape (N, L, H).
        head: the LM head, any module mapping (n, H') -> (n, V).
        logit_transform: the model's own logit scaling / soft-capping, or None.
        pre_head: modules the model's forward applies between the backbone and the head
            (ModernBERT-decoder's prediction head: dense, activation, norm), in order; usually none.
        transform_name: what ``logit_transform`` is, in words ("none", "softcap 30.0 (...)").
    """

    backbone: nn.Module
    head: nn.Module
    logit_transform: LogitTransform | None
    pre_head: tuple[nn.Module, ...] = ()
    transform_name: str = "none"

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """The (n, H) backbone states as the head takes them: ``pre_head`` applied in order."""
        for module in self.pre_head:
            hidden = module(hidden)
        return hidden


@dataclass(frozen=True)
class HeadRecipe:
    """How to find a model's parts again (module names, not modules: adapters and wrappers
    injected later are picked up) and the logit transform its own forward applies."""

    backbone: str
    pre_head: tuple[str, ...]
    transform: LogitTransform | None
    transform_name: str


_recipes: WeakKeyDictionary[nn.Module, HeadRecipe] = WeakKeyDictionary()


def model_parts(model: nn.Module) -> ModelParts:
    """Backbone, head and logit transform of a transformers causal LM (optionally peft-wrapped),
    found on a probe the first time a model is seen (``find_head_recipe``)."""
    base = unwrap_peft(model)
    recipe = _recipes.get(base)
    if recipe is None:
        recipe = _recipes[base] = find_head_recipe(base)
    return ModelParts(
        backbone=base.get_submodule(recipe.backbone),
        head=_output_head(base),
        logit_transform=recipe.transform,
        pre_head=tuple(base.get_submodule(name) for name in recipe.pre_head),
        transform_name=recipe.transform_name,
    )


def _output_head(base: nn.Module) -> nn.Module:
    if not callable(getattr(base, "get_output_embeddings", None)):
        raise TypeError(
            f"model_parts: {type(base).__name__} has no get_output_embeddings(); expected a "
            "transformers causal LM (e.g. LlamaForCausalLM) or a peft PeftModel wrapping one."
        )
    head = base.get_output_embeddings()
    if head is None:
        raise TypeError(f"model_parts: {type(base).__name__}.get_output_embeddings() is None.")
    return head


def _record_calls(base: nn.Module, head: nn.Module, batch) -> tuple[list, torch.Tensor]:
    """Run the model's own forward on the probe: the (name, output) of each direct child in call
    order (the head's call marked ``_HEAD``), and the model's own logits.

    The forward is the model class's own (``type(base).forward``), not an instance attribute a
    library may have put over it: accelerate wraps ``model.forward`` in bf16 autocast under
    mixed precision (trl's default ``bf16=True``), which would make the own logits bf16-rounded
    and hide the transform under that rounding."""
    calls: list[tuple[str, object]] = []
    hooks = [
        child.register_forward_hook(lambda _m, _i, out, name=name: calls.append((name, out)))
        for name, child in base.named_children()
    ]
    hooks.append(head.register_forward_hook(lambda _m, _i, _o: calls.append((_HEAD, None))))
    try:
        with probe_mode(base):
            out = type(base).forward(
                base,
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                use_cache=False,
            )
    finally:
        for hook in hooks:
            hook.remove()
    return calls, out.logits


_HEAD = "<head>"


def _split_calls(base: nn.Module, calls: list) -> tuple[str, torch.Tensor, tuple[str, ...]]:
    """(backbone name, its last hidden state, the children called between it and the head)."""
    names = [name for name, _ in calls]
    for i, (name, out) in enumerate(calls):
        if getattr(out, "last_hidden_state", None) is not None:
            end = names.index(_HEAD, i) if _HEAD in names[i:] else len(calls)
            head_names = {n for n, m in base.named_children() if m is _output_head(base)}
            between = tuple(n for n in names[i + 1 : end] if n not in head_names and n != _HEAD)
            return name, out.last_hidden_state, between
    raise TypeError(
        f"model_parts: no child of {type(base).__name__} returned a last_hidden_state in its "
        "own forward; cannot find the backbone (a transformers decoder model is expected)."
    )


def find_head_recipe(base: nn.Module) -> HeadRecipe:
    """Find the backbone, the modules after it and the logit transform from the model itself.

    The model's own forward runs on the probe (``dpo_core.probe``) with hooks on its children:
    the backbone is the first child that returns a ``last_hidden_state``, ``pre_head`` the
    children called after it and before the output embedding. The transform is the candidate
    (``logit_transforms.candidates``: identity, every softcap and scale the config names, in any
    combination) whose ``log_softmax(transform(head(pre_head(h))))`` is closest to the model's own
    log-softmax; it must be within ``probe.logp_bound``, else the model is refused
    (``UnknownLogitTransform``): it does something to its logits we would not reproduce.
    """
    head = _output_head(base)
    config = getattr(base, "config", None)
    batch = model_probe_batch(base)
    calls, own = _record_calls(base, head, batch)
    backbone, hidden, between = _split_calls(base, calls)
    with probe_mode(base):
        for name in between:
            hidden = base.get_submodule(name)(hidden)
        logits = head(hidden)
    keep = batch.attention_mask.bool().to(own.device)
    name, transform, error = closest_transform(logits[keep], own[keep], config)
    bound = logp_bound(own[keep], compute_dtype(head))
    if error > bound:
        model_type = getattr(config, "model_type", type(base).__name__)
        raise UnknownLogitTransform(
            f"{model_type}: the model's own logits are not its LM head's output under any logit "
            f"transform its config names (closest: {name}, log-probs off by {error:.2e}, float "
            f"bound {bound:.1e}); dpo_core would score this model wrong, so it refuses it."
        )
    return HeadRecipe(backbone, between, transform, name)
