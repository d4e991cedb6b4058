"""Models for parity runs: tiny architectures built locally, a reference that differs from the
policy, the LoRA / 4-bit settings, the one loader both sides use and the trained weights both
report.

The reference must differ from the policy: with reference == policy every log-ratio is 0 at
step 1, so the step-1 loss is log 2 whatever the log-probs are, and comparing it proves nothing.
Here the reference is the policy plus seeded Gaussian noise (``perturbed_copy``).
"""

from __future__ import annotations

import copy
import math
import pathlib

import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    BitsAndBytesConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
)

from parity.sides.cases import ParityCase
from parity.sides.zoo import ZOO, tiny_zoo_config
from training.inputs.four_bit import disable_cpu_packing

ADAPTER_WEIGHTS = "adapter_model.safetensors"

# Positions enough for long hh-rlhf dialogues; rotary models pay nothing for it, gpt2 a table.
MAX_POSITIONS = 4096


def tiny_config(arch: str, tokenizer: PreTrainedTokenizerBase) -> PretrainedConfig:
    """A 2-layer, hidden-64 config of ``arch`` whose vocabulary is the tokenizer's.

    Dropout is 0 everywhere (trl's ``disable_dropout`` leaves float attributes such as
    ``attention_dropout`` alone). llama and mistral keep a separate LM head; gpt2 and qwen2 tie
    it to the input embeddings, as their small released checkpoints do. Any other family of
    ``parity.sides.zoo.ZOO`` is the zoo's tiny config (``tiny_zoo_config``) with these ids.
    """
    ids = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    rotary = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": MAX_POSITIONS,
        "attention_dropout": 0.0,
    }
    if arch == "llama":
        return LlamaConfig(**rotary, tie_word_embeddings=False, **ids)
    if arch == "qwen2":
        return Qwen2Config(**rotary, tie_word_embeddings=True, **ids)
    if arch == "mistral":
        return MistralConfig(**rotary, sliding_window=None, tie_word_embeddings=False, **ids)
    if arch == "gpt2":
        return GPT2Config(
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=MAX_POSITIONS,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **ids,
        )
    if arch in ZOO:
        return tiny_zoo_config(arch, ids)
    raise ValueError(f"unknown arch {arch!r}; expected llama, qwen2, gpt2, mistral or a zoo family")


def build_tiny_model(arch: str, tokenizer: PreTrainedTokenizerBase, seed: int) -> PreTrainedModel:
    """A freshly initialised float32 tiny model; the same ``seed`` gives the same weights."""
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(arch, tokenizer), dtype=torch.float32)


def perturbed_copy(model: PreTrainedModel, seed: int, scale: float = 0.1) -> PreTrainedModel:
    """A copy of ``model`` with every parameter moved by seeded noise of relative size ``scale``.

    ``p_ref = p + scale * rms(p) * z``, ``z ~ N(0, 1)`` drawn from a generator seeded with
    ``seed``, ``rms(p) = sqrt(mean(p^2))``: large enough that the reference's log-probs differ
    from the policy's, proportionate for any checkpoint (an all-zero bias stays zero). Tied
    parameters are visited once, so ties survive.
    """
    reference = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(reference.named_parameters()):
            z = torch.randn(p.shape, generator=generator, dtype=torch.float32)
            p.add_((scale * p.float().pow(2).mean().sqrt() * z).to(p.dtype))
    return reference


def nudge_one_ulp(model: torch.nn.Module, seed: int) -> None:
    """Move every floating-point weight of ``model``, trainable or frozen, by one ulp of its
    dtype, up or down at random.

    The sign of each element is drawn from a generator seeded with ``seed`` (``torch.nextafter``
    towards +inf or -inf); 4-bit (integer) storage is left alone. A rounding-level change of the
    whole computation: parity's noise floor (``parity.check.noise_floor``) trains trl from it to
    measure how far rounding alone carries a run. Frozen weights are nudged too because the other
    side rounds differently in the frozen layers as well: with LoRA, nudging the adapters alone
    leaves the backbone's forward and backward bit-identical and underestimates that (measured on
    SmolLM2, ``parity/README.md``).
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.dtype.is_floating_point:
                up = torch.rand(p.shape, generator=generator) < 0.5
                towards = torch.where(up, math.inf, -math.inf).to(device=p.device, dtype=p.dtype)
                p.copy_(torch.nextafter(p, towards))


def quantization_config(case: ParityCase) -> BitsAndBytesConfig | None:
    """NF4 4-bit weights computing in float32 when ``case.load_in_4bit``, else None."""
    if not case.load_in_4bit:
        return None
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )


def lora_config(case: ParityCase) -> LoraConfig:
    """The adapter both sides train: rank, alpha and targets from the case, no dropout."""
    return LoraConfig(
        r=case.lora_r,
        lora_alpha=case.lora_alpha,
        target_modules=case.lora_target_modules,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )


def load_model(path: pathlib.Path | str, case: ParityCase) -> PreTrainedModel:
    """Load a policy or reference directory as both sides must: float32, or NF4 for 4-bit."""
    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch.float32, quantization_config=quantization_config(case)
    )
    # Both sides alike: no bitsandbytes CPU repacking, which drops 4-bit gradients after any
    # no-grad pass on AVX-512 BF16 CPUs (training.inputs.four_bit); trl would hit it too.
    disable_cpu_packing(model)
    return model


def save_adapter_init(policy_dir: pathlib.Path, case: ParityCase, out_dir: pathlib.Path) -> None:
    """Save a seeded fresh LoRA adapter (peft's default init: A random, B zero) to ``out_dir``.

    Both sides start from these adapter weights (``load_adapter_init``) instead of each drawing
    its own initialisation. The seed is ``case.seed + 2``, not the trainer's ``case.seed``: trl
    seeds with ``case.seed`` before wrapping the model, and would otherwise draw this very adapter
    by coincidence, hiding a side that forgot to load it.
    """
    base = AutoModelForCausalLM.from_pretrained(str(policy_dir), dtype=torch.float32)
    torch.manual_seed(case.seed + 2)
    get_peft_model(base, lora_config(case)).save_pretrained(str(out_dir))


def load_adapter_init(peft_model: torch.nn.Module, adapter_dir: pathlib.Path) -> None:
    """Overwrite the active adapter of ``peft_model`` with the weights in ``adapter_dir``.

    Raises:
        ValueError: when a saved adapter weight has no place in the model.
    """
    state = load_file(str(adapter_dir / ADAPTER_WEIGHTS))
    result = set_peft_model_state_dict(peft_model, state)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"{adapter_dir}: adapter weights not in the model: {unexpected[:5]}")


def trained_weights(model: torch.nn.Module, case: ParityCase) -> dict[str, torch.Tensor]:
    """The trainable weights after training, detached copies on CPU (both sides name them alike).

    Full fine-tuning: ``named_parameters`` with ``requires_grad`` (plain HF names; a tied LM head
    appears once, under the embedding's name). LoRA: ``get_peft_model_state_dict``.
    """
    if case.lora:
        state = get_peft_model_state_dict(model)
        return {k: v.detach().cpu().clone() for k, v in state.items()}
    return {
        name: p.detach().cpu().clone() for name, p in model.named_parameters() if p.requires_grad
    }
