"""A float64 twin of a (trained) model, made without deep-copying it.

Parity's checks against float64 (``parity.sides.padding_free_check``) need the same function as
the float32 model, computed in float64. ``copy.deepcopy(model).double()`` made one, but a model
that cannot be deep-copied then failed the whole case, and a mixture of experts cannot run in
float64 with transformers' default experts kernel (``grouped_mm``: "Expected mat_a to be Float32,
BFloat16 or Float16 matrix, got Double"). So the twin is built afresh from the model's config,
with the experts' plain per-expert loop (``experts_implementation="eager"``, which runs in
float64), and the model's weights are loaded into it, cast to float64. A LoRA model's adapters
are merged into the twin's weights in float64 (``W + scaling * B @ A``).

When there can be no twin (4-bit weights; a LoRA layer that is not a plain linear one; a model
transformers cannot rebuild from its config), ``float64_twin`` returns why, as one line, and the
check that needed it reports that instead of failing the case.
"""

from __future__ import annotations

import copy

import torch
from transformers import AutoModelForCausalLM

from training.inputs.four_bit import linear4bit_layers


def float64_twin(model: torch.nn.Module) -> torch.nn.Module | str:
    """A float64 model computing what ``model`` computes, in eval mode, or why there is none."""
    from peft import PeftModel  # why here: seconds to import, and only a run needs it

    if linear4bit_layers(model):
        return "4-bit weights have no float64 twin"
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    state = float64_state(model)
    if isinstance(state, str):
        return state
    config = copy.deepcopy(base.config)
    config._experts_implementation = "eager"  # grouped_mm has no float64 kernel
    try:
        twin = AutoModelForCausalLM.from_config(
            config, dtype=torch.float64, attn_implementation=base.config._attn_implementation
        )
        twin.load_state_dict(state, strict=True)
    except Exception as exc:  # any model transformers cannot rebuild: say why, go on
        return f"no float64 {type(base).__name__}: {type(exc).__name__}: {exc}".splitlines()[0]
    # float32 buffers made at init (rotary frequencies) cast as the model's own would be
    return twin.to(torch.float64).eval()


def float64_state(model: torch.nn.Module) -> dict[str, torch.Tensor] | str:
    """The weights and buffers of ``model`` as a plain (non-peft) state dict, floating ones in
    float64; a LoRA model's active adapters merged in float64. Or why that cannot be done."""
    from peft import PeftModel  # see float64_twin
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    if not isinstance(model, PeftModel):
        return {k: _float64(v) for k, v in model.state_dict().items()}
    base = model.get_base_model()
    state = {
        k.replace(".base_layer.", "."): _float64(v)
        for k, v in base.state_dict().items()
        if ".lora_" not in k
    }
    for name, module in base.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if not isinstance(module, LoraLinear):
            return f"no float64 twin for a LoRA {type(module).__name__} ({name})"
        if not module.merged:
            state[f"{name}.weight"] = state[f"{name}.weight"] + lora_delta64(module)
    return state


def lora_delta64(layer: torch.nn.Module) -> torch.Tensor:
    """``sum over active adapters of scaling * B @ A`` of a peft LoRA ``Linear``, in float64, in
    the base weight's layout (peft's ``get_delta_weight`` computes in the adapter's dtype)."""
    delta = torch.zeros(layer.get_base_layer().weight.shape, dtype=torch.float64)
    for adapter in layer.active_adapters:
        if adapter not in layer.lora_A:
            continue
        a = layer.lora_A[adapter].weight.detach().double().cpu()
        b = layer.lora_B[adapter].weight.detach().double().cpu()
        product = b @ a * layer.scaling[adapter]
        delta += product.T if layer.fan_in_fan_out else product
    return delta.to(layer.get_base_layer().weight.device)


def _float64(t: torch.Tensor) -> torch.Tensor:
    """A detached float64 copy of a floating tensor; other tensors (int buffers) detached."""
    return t.detach().double() if t.dtype.is_floating_point else t.detach()
