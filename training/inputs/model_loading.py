"""Loading the policy (full, LoRA, 4-bit QLoRA), its tokenizer, and choosing the reference.

The reference is chosen by one rule (``build_reference``):

- ``reference_free``            -> no reference (log-probs taken as 0);
- ``precompute_ref_log_probs``  -> log-probs computed once before training and cached on disk
                                   (unset: when the run reads every row, ``training.inputs.precompute``);
- LoRA / QLoRA                  -> the same model with its adapters switched off;
- otherwise                     -> a frozen copy (of ``--ref-model`` when given, else of the policy).
"""

from __future__ import annotations

import copy
import logging

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PreTrainedModel

from dpo_core import reference as ref
from training.base.config import FitConfig
from training.inputs.four_bit import disable_cpu_packing
from training.inputs.gguf import as_model_dir
from training.inputs.model_checks import check_model_source, loading_failure

log = logging.getLogger(__name__)

# What transformers, huggingface_hub and safetensors raise for a model they cannot read (a hub
# id's validation error is a ValueError); a RunError naming the path replaces them.
LOAD_ERRORS = (OSError, ValueError, ImportError, SafetensorError)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16``, with an error naming the accepted values."""
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} unknown; choose from {', '.join(DTYPES)}")
    return DTYPES[name]


def load_tokenizer(path: str, *, trust_remote_code: bool = False):
    """Load a tokenizer and make sure it can pad (pad = EOS when it has no pad token, as trl).
    A path that cannot be loaded is a ``RunError`` naming it (``training.inputs.model_checks``)."""
    check_model_source(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            as_model_dir(path), trust_remote_code=trust_remote_code
        )
    except LOAD_ERRORS as err:
        raise loading_failure(path, err) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _quantization_config(cfg: FitConfig):
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.lora.bnb_4bit_quant_type,
        bnb_4bit_compute_dtype=torch_dtype(cfg.lora.bnb_4bit_compute_dtype),
    )


def load_causal_lm(
    path: str, cfg: FitConfig, *, quantize: bool = False, flag: str = "--model"
) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_pretrained`` with the config's dtype, attention and 4-bit;
    a path that cannot be loaded is a ``RunError`` naming it and ``flag``."""
    check_model_source(path, flag)
    kwargs = {
        "dtype": torch_dtype(cfg.model.dtype),
        "trust_remote_code": cfg.model.trust_remote_code,
    }
    if cfg.model.attn_implementation:
        kwargs["attn_implementation"] = cfg.model.attn_implementation
    if quantize:
        kwargs["quantization_config"] = _quantization_config(cfg)
    try:
        model = AutoModelForCausalLM.from_pretrained(as_model_dir(path), **kwargs)
    except LOAD_ERRORS as err:
        raise loading_failure(path, err, flag) from err
    model.config.use_cache = False
    if quantize:  # before any forward: bitsandbytes' CPU repacking drops gradients (four_bit)
        disable_cpu_packing(model)
    return model


def disable_dropout(model: torch.nn.Module) -> None:
    """Set every ``nn.Dropout`` to p=0, as trl's ``disable_dropout=True`` does."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def add_lora(model: PreTrainedModel, cfg: FitConfig) -> torch.nn.Module:
    """Wrap ``model`` with LoRA adapters (peft): fresh ones, or ``--adapter``'s, trainable; with
    4-bit weights, prepare the model for k-bit training first."""
    # why: peft takes ~1.3 s to import (bitsandbytes with it); only adapter runs need it
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

    if cfg.lora.load_in_4bit:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.model.gradient_checkpointing
        )
    if cfg.model.adapter:
        model = PeftModel.from_pretrained(model, cfg.model.adapter, is_trainable=True)
        return cast_qlora_adapters(model, cfg)
    targets = cfg.lora.lora_target_modules
    peft_config = LoraConfig(
        r=cfg.lora.lora_r,
        lora_alpha=cfg.lora.lora_alpha,
        lora_dropout=cfg.lora.lora_dropout,
        target_modules=targets[0] if targets == ["all-linear"] else targets,
        task_type="CAUSAL_LM",
    )
    return cast_qlora_adapters(get_peft_model(model, peft_config), cfg)


def cast_qlora_adapters(model: torch.nn.Module, cfg: FitConfig) -> torch.nn.Module:
    """On a 4-bit base, store the trainable LoRA weights in ``qlora_adapter_dtype`` (bf16 by
    default, as the QLoRA paper (Dettmers 2023, sec. 3) and trl 1.16's ``DPOTrainer`` do; DoRA
    magnitude vectors stay float32, as trl keeps them)."""
    if not cfg.lora.load_in_4bit:
        return model
    dtype = torch_dtype(cfg.lora.qlora_adapter_dtype)
    for name, param in model.named_parameters():
        if param.requires_grad and "lora_magnitude_vector" not in name:
            param.data = param.data.to(dtype)
    return model


def enable_checkpointing(model: PreTrainedModel) -> None:
    """Recompute each layer's activations in backward (non-reentrant, as trl), through
    ``activation_checkpointing_enable`` where transformers has it (it deprecates the old name)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def load_policy(path: str, cfg: FitConfig) -> torch.nn.Module:
    """The model to train: full weights, or LoRA adapters on a (possibly 4-bit) base."""
    model = load_causal_lm(path, cfg, quantize=cfg.lora.load_in_4bit)
    disable_dropout(model)
    if cfg.model.gradient_checkpointing:
        enable_checkpointing(model)
        if cfg.lora.lora:
            model.enable_input_require_grads()
    if cfg.lora.lora:
        model = add_lora(model, cfg)
    return model


def frozen(model: torch.nn.Module) -> torch.nn.Module:
    """Eval mode, no gradients: what a reference model is."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def build_reference(policy: torch.nn.Module, cfg: FitConfig):
    """The reference source for ``policy`` following the module docstring's rule:
    ``NoReference`` for reference-free training, None for a precomputed reference (attached to
    the data by ``training.inputs.precompute``), else a live model source."""
    if cfg.dpo.reference_free:
        return ref.NoReference()
    if cfg.dpo.precompute_ref_log_probs:
        return None
    if cfg.model.ref_model:
        ref_model = load_causal_lm(
            cfg.model.ref_model, cfg, quantize=cfg.lora.load_in_4bit, flag="--ref-model"
        )
        ref_model = frozen(ref_model)
        disable_dropout(ref_model)
        return ref.FrozenCopyReference(ref_model)
    if cfg.lora.lora:
        return ref.AdapterDisabledReference(policy)
    return ref.FrozenCopyReference(frozen(copy.deepcopy(policy)))
