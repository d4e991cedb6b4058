"""parity.sides.float64_twin: a float64 model computing what the float32 one does, built from
its config (no deep copy), mixtures of experts included (eager experts), LoRA merged in
float64."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model

from parity.sides.float64_twin import float64_twin
from parity.sides.zoo import tiny_zoo_model

torch.set_num_threads(1)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.double()


def test_a_mixture_of_experts_runs_in_float64():
    """transformers' default experts kernel (grouped_mm) refuses float64; the twin's eager
    experts run it, and agree with the float32 model to float32 rounding (logits ~1: 1e-5 is
    ~100 float32 ulps, a wrong expert or weight is O(0.1))."""
    model = tiny_zoo_model("mixtral")
    twin = float64_twin(model)
    assert not isinstance(twin, str), twin
    assert next(twin.parameters()).dtype == torch.float64
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    assert (logits(twin, ids) - logits(model, ids)).abs().max() < 1e-5
    assert twin.config._experts_implementation == "eager"


def test_lora_adapters_are_merged_in_float64():
    """A LoRA model with nonzero B: the twin is the plain model with W + s * B @ A (1e-5 as
    above; without the merge the difference is the adapter's whole effect, ~1e-2)."""
    torch.manual_seed(0)
    base = tiny_zoo_model("llama")
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    twin = float64_twin(peft_model)
    assert not isinstance(twin, str), twin
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    with peft_model.disable_adapter():
        without = logits(peft_model, ids)
    merged = logits(peft_model, ids)
    assert (merged - without).abs().max() > 1e-3  # the adapter matters
    assert (logits(twin, ids) - merged).abs().max() < 1e-5
