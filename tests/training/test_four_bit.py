"""4-bit layers stay trainable on every CPU (``training.inputs.four_bit``).

bitsandbytes 0.50 repacks a ``Linear4bit`` into a gradient-less CPU inference layout after a
no-grad pass on AVX-512 BF16 CPUs. These tests compare against an independent computation,
the *float twin* (every 4-bit linear replaced by an ``nn.Linear`` holding its dequantized NF4
weight, in float32), so they catch the defect on machines that have it; the guard test packs a
layer by hand, so it checks the guard on any CPU.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.training.conftest import base_args, base_name, dequantized, fit, load_weights
from training.inputs.four_bit import disable_cpu_packing, linear4bit_layers, packed_layers

# A 3-step QLoRA run with a precomputed reference: a no-grad pass over every row before the
# first step, exactly what made bitsandbytes repack (and then drop gradients).
QLORA = {
    "load_in_4bit": True,
    "qlora_adapter_dtype": "float32",
    "precompute_ref_log_probs": True,
    "learning_rate": 5e-3,
    "max_steps": 3,
}
# QLoRA and LoRA on the float twin run the same dequantized matmuls in float32; only the
# no-grad reference pass may sum in another order (bitsandbytes' gemm_4bit vs F.linear), and a
# few float32 ulps of the summed log-probs (|x| ~ 50, ulp 3.8e-6) reach the loss as ~1e-7. The
# defect moves the loss by ~1e-2 and grad_norm by ~50%.
TWIN_REL_TOL = 1e-5


def save_float_twin(model_4bit, float_dir, out_dir) -> None:
    """The float model with each 4-bit linear's weight replaced by its NF4 round trip."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    twin = AutoModelForCausalLM.from_pretrained(float_dir, dtype=torch.float32)
    state = twin.state_dict()
    layers = linear4bit_layers(model_4bit)
    assert layers
    for name, module in layers:
        state[base_name(name) + ".weight"].copy_(dequantized(module))
    twin.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(float_dir).save_pretrained(out_dir)


def quantized_base(assets):
    from training.base.cli import resolve_config
    from training.inputs.model_loading import load_causal_lm

    cfg, _ = resolve_config(base_args(assets, "unused", load_in_4bit=True))
    return load_causal_lm(str(assets.model_dir), cfg, quantize=True)


def test_loading_switches_bitsandbytes_cpu_packing_off(tiny_assets):
    model = quantized_base(tiny_assets)
    layers = linear4bit_layers(model)
    assert layers and all(not m.support_avx512bf16_for_cpu for _, m in layers)
    model.eval()
    with torch.no_grad():  # the pass that repacks on AVX-512 BF16 CPUs when the path is on
        model(torch.tensor([[1, 2, 3, 4]]))
    assert packed_layers(model) == []


def test_qlora_after_a_no_grad_pass_trains_like_lora_on_its_float_twin(tiny_assets, tmp_path):
    qlora = fit(base_args(tiny_assets, tmp_path / "qlora", **QLORA))

    twin_dir = tmp_path / "twin"
    save_float_twin(quantized_base(tiny_assets), tiny_assets.model_dir, twin_dir)
    flags = {**QLORA, "load_in_4bit": False, "lora": True, "model": twin_dir}
    twin = fit(base_args(tiny_assets, tmp_path / "lora", **flags))

    assert len(qlora.history) == len(twin.history) == QLORA["max_steps"]
    for step, (q, t) in enumerate(zip(qlora.history, twin.history, strict=True), start=1):
        for key in ("loss", "grad_norm", "rewards/chosen", "rewards/rejected", "logps/chosen"):
            assert math.isclose(q[key], t[key], rel_tol=TWIN_REL_TOL, abs_tol=TWIN_REL_TOL), (
                f"step {step} {key}: QLoRA {q[key]} vs float twin {t[key]}"
            )
    ours, theirs = load_weights(qlora.model_dir), load_weights(twin.model_dir)
    assert ours.keys() == theirs.keys() and ours
    for name, w in ours.items():
        scale = theirs[name].abs().max().item()
        assert (w - theirs[name]).abs().max().item() <= TWIN_REL_TOL * scale, name


def test_no_4bit_layer_is_packed_after_precompute_and_evaluation(tiny_assets, tmp_path):
    flags = {**QLORA, "eval_fraction": 0.25, "evaluate": True, "max_steps": 2}
    result = fit(base_args(tiny_assets, tmp_path, **flags))
    assert result.evaluation is not None  # before/after scoring and sampling ran
    assert packed_layers(result.policy) == []


def pack_every_4bit_layer(model) -> int:
    """What bitsandbytes does on AVX-512 BF16 CPUs at the first no-grad pass, done by hand."""
    from bitsandbytes import functional as F

    layers = linear4bit_layers(model)
    for _, m in layers:
        m.weight.data, m.weight.quant_state = F._convert_weight_packed_for_cpu(
            m.weight.data, m.weight.quant_state
        )
    return len(layers)


def test_training_refuses_to_start_on_packed_4bit_layers(tiny_assets, tmp_path, monkeypatch):
    import training.inputs.model_loading

    monkeypatch.setattr(training.inputs.model_loading, "disable_cpu_packing", pack_every_4bit_layer)
    argv = base_args(
        tiny_assets, tmp_path, load_in_4bit=True, precompute_ref_log_probs=False, max_steps=1
    )
    with pytest.raises(RuntimeError, match="CPU inference layout") as err:
        fit(argv)
    assert "model.layers.0" in str(err.value)


def test_disable_cpu_packing_counts_layers_and_ignores_float_models(tiny_assets):
    from transformers import AutoModelForCausalLM

    assert disable_cpu_packing(AutoModelForCausalLM.from_pretrained(tiny_assets.model_dir)) == 0
    model = quantized_base(tiny_assets)
    assert disable_cpu_packing(model) == len(linear4bit_layers(model)) == 7  # q k v o gate up down
