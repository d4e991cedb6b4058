"""Tiny random models of the popular decoder families, built from transformers' own configs.

``tiny_zoo_config(model_type, ids)`` is ``AutoConfig.for_model(model_type)`` cut to 2 layers,
hidden 64, 4 heads (2 key/value heads), 4 experts (2 active) for mixtures of experts, no dropout,
and the tokenizer's vocabulary and special ids: small enough that a CI sweep over every family
runs in seconds, shaped like the released models in every way that matters to a log-prob (the
attention kind, rotary or learned positions, tied or untied head, logit scaling or soft-capping,
routed experts, recurrent blocks). The families and their extra settings are ``ZOO``; anything a
family's config does not know is left out, so one table serves them all.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

# Shared shape, applied where the family's config has the attribute.
_COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=4096,
    # mixtures of experts
    moe_intermediate_size=32,
    shared_expert_intermediate_size=32,
    num_experts=4,
    num_local_experts=4,
    n_routed_experts=4,
    num_experts_per_tok=2,
    n_shared_experts=1,
    n_group=1,
    topk_group=1,
    first_k_dense_replace=0,
    decoder_sparse_step=1,
    # no dropout anywhere
    attention_dropout=0.0,
    hidden_dropout=0.0,
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    attn_pdrop=0.0,
    embedding_dropout=0.0,
    mlp_dropout=0.0,
)

# model_type -> settings of its own (on top of _COMMON). Eager attention where the family
# refuses sdpa (soft-capped attention, attention sinks).
ZOO: dict[str, dict] = {
    "llama": {},
    "mistral": {"sliding_window": None},
    "qwen2": {"tie_word_embeddings": True},
    "qwen3": {},
    "qwen2_moe": {},
    "qwen3_moe": {},
    "mixtral": {"sliding_window": None},
    "olmoe": {},
    "deepseek_v3": {
        "head_dim": 8,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 8,
        "v_head_dim": 16,
        "kv_lora_rank": 16,
        "q_lora_rank": 16,
        "num_key_value_heads": 4,
    },  # fmt: skip
    "gpt_oss": {"attn_implementation": "eager"},
    "gemma": {},
    "gemma2": {"attn_implementation": "eager"},
    "gemma3_text": {"attn_implementation": "eager", "sliding_window": 512},
    "phi": {},
    "phi3": {},
    "cohere": {},
    "cohere2": {"attn_implementation": "eager", "sliding_window": 512},
    "granite": {},
    "granitemoe": {},
    "olmo": {},
    "olmo2": {},
    "olmo3": {"sliding_window": 512},
    "starcoder2": {"sliding_window": None},
    "gpt_neox": {},
    "falcon": {},
    "gpt2": {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 4096},
    "smollm3": {},
    "glm4": {},
    "nemotron": {},
    "recurrent_gemma": {
        "lru_width": 64,
        "attention_window_size": 512,
        "block_types": ["recurrent", "attention"],
    },  # fmt: skip
    "modernbert-decoder": {"local_attention": 512, "global_attn_every_n_layers": 2},
}


def tiny_zoo_config(model_type: str, ids: dict | None = None) -> PretrainedConfig:
    """The tiny config of ``model_type`` (a key of ``ZOO``); ``ids`` sets ``vocab_size`` and the
    special token ids (default: a 128-token vocabulary, pad 0, bos 1, eos 2)."""
    if model_type not in ZOO:
        raise ValueError(f"no tiny {model_type!r} in the zoo; known: {', '.join(ZOO)}")
    ids = ids or {"vocab_size": 128, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    known = AutoConfig.for_model(model_type).to_dict()
    settings = {k: v for k, v in _COMMON.items() if k in known}
    settings.update(ZOO[model_type])
    settings.setdefault("tie_word_embeddings", False)
    return AutoConfig.for_model(model_type, **settings, **ids)


def tiny_zoo_model(model_type: str, seed: int = 0, ids: dict | None = None) -> PreTrainedModel:
    """A freshly initialised float32 tiny ``model_type`` in eval mode (same seed, same weights)."""
    torch.manual_seed(seed)
    config = tiny_zoo_config(model_type, ids)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
