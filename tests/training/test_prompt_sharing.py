"""``--prompt-sharing``: unset means on for float32 models, off for bf16 weights; flags win."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.dpo_core.test_logps import lora_model, tiny_llama
from training.cli import resolve_config
from training.config import FitConfig
from training.models import build_reference, resolve_prompt_sharing
from training.module import DPOModule


def with_sharing(value) -> FitConfig:
    cfg = FitConfig()
    return dataclasses.replace(cfg, dpo=dataclasses.replace(cfg.dpo, prompt_sharing=value))


def test_flags_reach_the_config():
    assert resolve_config([])[0].dpo.prompt_sharing is None
    assert resolve_config(["--prompt-sharing"])[0].dpo.prompt_sharing is True
    assert resolve_config(["--no-prompt-sharing"])[0].dpo.prompt_sharing is False


@pytest.mark.parametrize(("dtype", "expected"), [(torch.float32, True), (torch.bfloat16, False)])
def test_unset_follows_the_weights_dtype(dtype, expected):
    model = tiny_llama().to(dtype)
    assert resolve_prompt_sharing(with_sharing(None), model).dpo.prompt_sharing is expected
    assert DPOModule(model, None, with_sharing(None), total_steps=1).settings.prompt_sharing is (
        expected
    )


def test_bf16_adapters_on_a_float32_base_keep_the_plain_forward():
    """QLoRA stores its adapters in bf16: one of them is enough to turn sharing off."""
    model = lora_model(tiny_llama())
    for name, p in model.named_parameters():
        if "lora_A" in name:
            p.data = p.data.to(torch.bfloat16)
            break
    assert resolve_prompt_sharing(with_sharing(None), model).dpo.prompt_sharing is False


@pytest.mark.parametrize("value", [True, False])
def test_an_explicit_choice_is_kept(value):
    model = tiny_llama().to(torch.bfloat16)
    assert resolve_prompt_sharing(with_sharing(value), model).dpo.prompt_sharing is value
    assert build_reference(tiny_llama(), with_sharing(value)).prompt_sharing is value
