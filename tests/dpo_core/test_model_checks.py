"""dpo_core.model_parts finds a model's parts from its own forward; dpo_core.model_checks proves
our log-probs equal the model's own, and refuses a model whose logits it cannot reproduce."""

from __future__ import annotations

import pytest
import torch

from dpo_core import model_parts as model_parts_module
from dpo_core.logit_transforms import UnknownLogitTransform
from dpo_core.model_checks import OwnLogitsMismatch, check_own_logits, own_logits_check
from dpo_core.model_parts import model_parts
from parity.sides.zoo import tiny_zoo_model
from tests.dpo_core.tiny import lora_model

torch.set_num_threads(1)


def spread(model):
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)  # logits ~ +-4: a skipped transform shows
    return model


@pytest.mark.parametrize(
    ("model_type", "transform"),
    [
        ("gemma2", "softcap final_logit_softcapping=30"),  # not attn_logit_softcapping=50
        ("recurrent_gemma", "softcap logits_soft_cap=30"),  # a name trl does not read
        ("cohere", "x logit_scale=0.0625"),
        ("llama", "none"),
    ],
)
def test_logit_transform_is_found_from_the_model(model_type, transform):
    model = spread(tiny_zoo_model(model_type))
    assert model_parts(model).transform_name == transform
    check = check_own_logits(model)
    assert check.passed and check.transform == transform


def test_granite_divides_its_logits():
    model = tiny_zoo_model("granite")
    model.config.logits_scaling = 4.0  # Granite's forward divides by it
    assert model_parts(spread(model)).transform_name == "/ logits_scaling=4"
    assert check_own_logits(model).passed


def test_prediction_head_between_backbone_and_projection_is_found():
    """ModernBERT-decoder: ``get_decoder()`` is the output projection, and the forward runs a
    prediction head (dense, activation, norm) before it; trl scores without it."""
    model = spread(tiny_zoo_model("modernbert-decoder"))
    parts = model_parts(model)
    assert parts.backbone is model.model
    assert parts.pre_head == (model.lm_head,)
    assert parts.head is model.decoder
    assert check_own_logits(model).passed


def test_a_transform_in_code_is_refused():
    """A model that changes its logits in code, under no config name, is refused at load, the
    model type and the difference named."""
    model = spread(tiny_zoo_model("llama"))

    class CappedLlama(type(model)):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = 3.0 * torch.tanh(out.logits / 3.0)
            return out

    model.__class__ = CappedLlama
    with pytest.raises(UnknownLogitTransform, match=r"llama: .* off by \d"):
        model_parts(model)


def test_the_guard_stops_on_wrong_log_probs(monkeypatch):
    """A scoring path that skips the model's soft-cap (the recipe emptied after it was found)
    fails the guard: the run would stop with one line."""
    model = spread(tiny_zoo_model("gemma2"))
    recipe = model_parts_module._recipes.get(model) or model_parts_module.find_head_recipe(model)
    broken = model_parts_module.HeadRecipe(recipe.backbone, recipe.pre_head, None, "none")
    monkeypatch.setitem(model_parts_module._recipes, model, broken)
    assert not own_logits_check(model).passed
    with pytest.raises(OwnLogitsMismatch, match=r"own-logits check \(reference, gemma2"):
        check_own_logits(model, role="reference")


def test_lora_wrapped_model_with_adapter_on_the_head():
    """The parts are found by name, so a LoRA injected into the head after the model was first
    seen is the head that runs; the check passes with and without the adapters."""
    base = spread(tiny_zoo_model("gemma2"))
    model_parts(base)  # found before the adapters exist
    peft = lora_model(base, targets=("q_proj", "v_proj", "lm_head"))
    assert type(model_parts(peft).head).__module__.startswith("peft")
    assert check_own_logits(peft).passed
    with peft.disable_adapter():
        assert check_own_logits(peft).passed


def test_probe_leaves_training_flags_alone():
    model = tiny_zoo_model("llama").train()
    own_logits_check(model)
    assert all(m.training for m in model.modules())


def test_a_forward_wrapped_in_bf16_autocast_is_read_through():
    """accelerate (trl's default bf16=True) wraps ``model.forward`` in bf16 autocast; the parts
    are found from the class's own forward, so the wrapper's rounding is not taken for a
    transform."""
    for model_type, transform in (
        ("mixtral", "none"),
        ("gemma2", "softcap final_logit_softcapping=30"),
    ):
        model = spread(tiny_zoo_model(model_type))
        model.forward = torch.autocast("cpu", dtype=torch.bfloat16)(model.forward)
        assert model_parts(model).transform_name == transform
