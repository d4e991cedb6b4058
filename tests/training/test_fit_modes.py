"""Full fine-tuning, LoRA and 4-bit QLoRA through ``training.fit``: what trains, what stays
frozen, that the DPO loss on a fixed batch goes down, and that the saved model loads and
generates."""

from __future__ import annotations

import copy

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dpo_core.reference import AdapterDisabledReference, FrozenCopyReference
from dpo_core.step import DPOSettings, dpo_step
from tests.training.conftest import base_args, base_name, dequantized, fit, fixed_batch
from training.inputs.four_bit import linear4bit_layers

# A few steps at a learning rate well above the default: enough for the loss on the training
# rows to move clearly, still far from divergence for a 1-layer model.
TRAIN = {"max_steps": 4, "batch_size": 8, "shuffle": True, "learning_rate": 5e-3}
# The loss must fall by more than this: float32 rounding of a ~0.69 loss is ~1e-7, so a drop
# of 1e-2 is training, not noise.
MIN_LOSS_DROP = 1e-2


def batch_loss(policy, reference, batch) -> float:
    with torch.no_grad():
        return dpo_step(policy, batch, reference, DPOSettings()).loss.item()


def assert_generates(model, tokenizer) -> None:
    prompt = tokenizer("Describe the cat.", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    n_prompt = prompt["input_ids"].shape[1]
    assert n_prompt < out.shape[1] <= n_prompt + 5
    assert int(out.max()) < len(tokenizer)
    assert isinstance(tokenizer.decode(out[0, n_prompt:]), str)


def test_full_fine_tuning_trains_every_weight_and_saves_a_model(tiny_assets, tmp_path):
    initial = AutoModelForCausalLM.from_pretrained(tiny_assets.model_dir)
    result = fit(base_args(tiny_assets, tmp_path, **TRAIN))
    trained = result.policy

    start = initial.state_dict()
    for name, p in trained.state_dict().items():
        assert not torch.equal(p, start[name]), f"{name} did not change"

    reloaded = AutoModelForCausalLM.from_pretrained(result.model_dir)
    for name, p in reloaded.state_dict().items():
        assert torch.equal(p, trained.state_dict()[name]), f"saved {name} differs from trained"

    batch = fixed_batch(tiny_assets)
    reference = FrozenCopyReference(copy.deepcopy(initial))
    before = batch_loss(initial, reference, batch)
    after = batch_loss(reloaded, reference, batch)
    assert after < before - MIN_LOSS_DROP
    assert_generates(reloaded, AutoTokenizer.from_pretrained(result.model_dir))


def test_lora_trains_only_the_adapters_and_saves_an_adapter(tiny_assets, tmp_path):
    from peft import PeftModel

    initial = AutoModelForCausalLM.from_pretrained(tiny_assets.model_dir)
    result = fit(base_args(tiny_assets, tmp_path, lora=True, **TRAIN))
    trained = result.policy

    start = initial.state_dict()
    lora = {n: p for n, p in trained.named_parameters() if "lora_" in n}
    assert lora and all(p.requires_grad for p in lora.values())
    for name, p in lora.items():
        if "lora_B" in name:  # lora_B starts at zero, so any value it holds was learned
            assert p.abs().max() > 0, f"{name} did not train"
    for name, p in trained.named_parameters():
        if name not in lora:
            assert not p.requires_grad, name
            assert torch.equal(p, start[base_name(name)]), f"frozen {name} changed"

    assert (result.model_dir / "adapter_config.json").exists()
    assert not (result.model_dir / "model.safetensors").exists()  # the adapter only
    peft = PeftModel.from_pretrained(initial, result.model_dir)
    saved = {n: p for n, p in peft.named_parameters() if "lora_" in n}
    assert saved.keys() == lora.keys()
    assert all(torch.equal(saved[n], lora[n]) for n in lora)

    batch = fixed_batch(tiny_assets)
    start_model = AutoModelForCausalLM.from_pretrained(tiny_assets.model_dir)
    before = batch_loss(start_model, FrozenCopyReference(copy.deepcopy(start_model)), batch)
    after = batch_loss(peft, AdapterDisabledReference(peft), batch)
    assert after < before - MIN_LOSS_DROP
    assert_generates(peft, AutoTokenizer.from_pretrained(result.model_dir))


def frozen_base(model) -> dict[str, torch.Tensor]:
    """What a (peft-wrapped) 4-bit model's base computes with: each 4-bit layer's dequantized
    weight (whatever layout bitsandbytes stores it in) and every other non-LoRA parameter."""
    four_bit = dict(linear4bit_layers(model))
    state = {base_name(name) + ".weight": dequantized(m) for name, m in four_bit.items()}
    for name, p in model.named_parameters():
        if "lora_" not in name and name.rsplit(".", 1)[0] not in four_bit:
            state[base_name(name)] = p
    return state


def test_qlora_keeps_the_4bit_base_frozen_and_trains_the_adapters(tiny_assets, tmp_path):
    import bitsandbytes as bnb
    from peft import PeftModel

    from training.base.cli import resolve_config
    from training.inputs.model_loading import load_causal_lm

    argv = base_args(tiny_assets, tmp_path, load_in_4bit=True, **TRAIN)
    cfg, _ = resolve_config(argv)
    assert cfg.lora.lora  # --load-in-4bit implies --lora

    def quantized_base():
        return load_causal_lm(str(tiny_assets.model_dir), cfg, quantize=True)

    result = fit(argv)
    trained = result.policy
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in trained.modules())

    # NF4 quantization is deterministic: a fresh load is the base the run started from.
    start, now = frozen_base(quantized_base()), frozen_base(trained)
    assert now.keys() == start.keys()
    for name, t in now.items():
        assert torch.equal(t, start[name]), f"frozen {name} changed"
    lora_b = [p for n, p in trained.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().max() > 0 for p in lora_b)  # zero at start: learned

    batch = fixed_batch(tiny_assets)
    start_model = quantized_base()
    before = batch_loss(start_model, FrozenCopyReference(quantized_base()), batch)
    peft = PeftModel.from_pretrained(quantized_base(), result.model_dir)
    after = batch_loss(peft, AdapterDisabledReference(peft), batch)
    assert after < before - MIN_LOSS_DROP
    assert_generates(peft, AutoTokenizer.from_pretrained(result.model_dir))


def test_gradient_checkpointing_gives_the_same_run(tiny_assets, tmp_path):
    """Recomputing activations in backward changes memory, not numbers: the same steps and
    weights as without it, full fine-tuning and LoRA alike (LoRA needs input gradients on)."""
    from tests.training.conftest import assert_steps_close, assert_weights_close

    for mode in ({}, {"lora": True}):
        plain = fit(base_args(tiny_assets, tmp_path / f"plain{len(mode)}", **TRAIN, **mode))
        ckpt = fit(
            base_args(
                tiny_assets,
                tmp_path / f"ckpt{len(mode)}",
                gradient_checkpointing=True,
                **TRAIN,
                **mode,
            )
        )
        model = ckpt.policy.get_base_model() if mode else ckpt.policy
        assert (
            getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
        )
        assert ckpt.history[-1]["rewards/margins"] != 0
        assert_steps_close(ckpt.history, plain.history)
        if not mode:
            assert_weights_close(ckpt.model_dir, plain.model_dir, tiny_assets.model_dir)


def test_bf16_mixed_trains_with_clipping_and_reference_log_probs_in_bf16(tiny_assets, tmp_path):
    """``--precision bf16-mixed``: float32 weights and optimizer (fused AdamW, clipping on: a
    combination Lightning's mixed-precision plugin refuses on its own), forwards under bf16
    autocast, the reference precomputed under the same autocast (its log-probs differ from a
    float32 run's, and so does its cache file)."""
    flags = dict(TRAIN, max_grad_norm=0.05, precompute_ref_log_probs=True)
    result = fit(base_args(tiny_assets, tmp_path / "bf16", precision="bf16-mixed", **flags))
    fp32 = fit(base_args(tiny_assets, tmp_path / "fp32", **flags))
    assert all(p.dtype == torch.float32 for p in result.policy.parameters())
    assert all(row["grad_norm"] > 0.05 for row in result.history)  # clipped every step
    ref_files = [
        sorted(p.name for p in (tmp_path / run / "reference_logps").iterdir())
        for run in ("bf16", "fp32")
    ]
    assert ref_files[0] != ref_files[1]
    first = [r.history[0] for r in (result, fp32)]
    # The same rows and step-1 weights: only bf16 rounding tells the runs apart, and it does.
    assert first[0]["logps/chosen"] != first[1]["logps/chosen"]
    batch = fixed_batch(tiny_assets)
    initial = AutoModelForCausalLM.from_pretrained(tiny_assets.model_dir)
    reference = FrozenCopyReference(copy.deepcopy(initial))
    assert batch_loss(result.policy, reference, batch) < (
        batch_loss(initial, reference, batch) - MIN_LOSS_DROP
    )
