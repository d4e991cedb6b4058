"""Tiny models and batches shared by the dpo_core tests, and their float32 tolerances."""

from __future__ import annotations

import torch
from torch import nn

from dpo_core.batch import PreferenceBatch

# Values: per-token log-probs are O(log V) ~ 5-10; float32's ulp there is ~1e-6, and the chunked
# and full computations round logsumexp differently, so allow a few ulp.
VALUE_TOL = dict(rtol=0.0, atol=4e-6)
# Gradients: grad_W sums T token contributions in a different order (per chunk vs all at once),
# so relative float32 error grows like T·eps ~ 1e-5 at worst on these sizes.
GRAD_TOL = dict(rtol=2e-5, atol=2e-6)


def value_tol(logits: torch.Tensor) -> dict:
    """``VALUE_TOL``, widened to 4 float32 roundings of the largest logit when the logits are
    large: a log-softmax inherits the rounding of ``z_target - log Z``, and a head product summed
    in another order (one row at a time vs all rows, a LoRA's extra product) rounds each logit
    by up to ~eps |z| (measured: 1.4 eps max|z| with |z| up to 45 on an AVX-512 CPU)."""
    scale = float(logits.detach().abs().max())
    return dict(rtol=0.0, atol=max(VALUE_TOL["atol"], 4 * torch.finfo(torch.float32).eps * scale))


def make_batch(
    spans: list[tuple[int, int]], length: int, vocab: int, seed: int = 0
) -> PreferenceBatch:
    """Rows of ``prompt_len`` prompt tokens then ``completion_len`` completion tokens, right-padded.

    Random ids in [1, vocab), pad id 0. ``spans`` lists (prompt_len, completion_len) per row,
    chosen rows first.
    """
    g = torch.Generator().manual_seed(seed)
    n = len(spans)
    input_ids = torch.randint(1, vocab, (n, length), generator=g)
    attention_mask = torch.zeros(n, length, dtype=torch.long)
    completion_mask = torch.zeros(n, length, dtype=torch.long)
    for i, (p, c) in enumerate(spans):
        attention_mask[i, : p + c] = 1
        completion_mask[i, p : p + c] = 1
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    return PreferenceBatch(input_ids, attention_mask, completion_mask)


SPANS = [(3, 6), (5, 2), (0, 9), (2, 4), (4, 5), (1, 1)]  # incl. a completion at position 0


def tiny_llama(vocab: int = 128, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(LlamaConfig(**{**config, **overrides})).eval()


def tiny_gpt2(vocab: int = 128):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_positions=64)
    config.bos_token_id = config.eos_token_id = 0
    return GPT2LMHeadModel(config).eval()


def tiny_gemma2():
    """A Gemma 2 with ``final_logit_softcapping``: exercises the logit transform."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, head_dim=16,
        final_logit_softcapping=0.5,  # small: actually bends these small logits
    )  # fmt: skip
    return Gemma2ForCausalLM(config).eval()


def softcap(z: torch.Tensor) -> torch.Tensor:
    return 30.0 * torch.tanh(z / 30.0)


def lora_model(model, targets=("q_proj", "v_proj", "lm_head")):
    """``model`` wrapped in a LoRA whose B matrices are perturbed, so the adapters change outputs."""
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=list(targets)))
    torch.manual_seed(5)
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.1)
    return peft


def make_head(kind: str, hidden: int, vocab: int) -> nn.Module:
    """A head of the given kind, with every trainable part non-trivial."""
    torch.manual_seed(1)
    linear = nn.Linear(hidden, vocab, bias=kind == "linear_bias")
    if kind in ("linear", "linear_bias", "softcap"):
        return linear
    if kind == "lora":
        from peft import LoraConfig, get_peft_model

        holder = nn.Sequential(linear)
        peft = get_peft_model(holder, LoraConfig(r=4, target_modules=["0"], lora_alpha=8))
        nn.init.normal_(peft.base_model.model[0].lora_B.default.weight)  # B != 0: LoRA is live
        return peft.base_model.model[0]
    raise ValueError(kind)
