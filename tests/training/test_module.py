"""Unit tests of the Lightning module's optimizer pieces."""

import transformers as T

from training.run.module import param_groups


def test_tied_weight_is_in_one_group_once():
    """GPT-2 ties the LM head to the embeddings: AdamW must see that tensor once, or it would
    step it twice per optimizer step (a bug parity on gpt2/qwen2 caught)."""
    model = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2))
    assert model.lm_head.weight is model.transformer.wte.weight
    groups = param_groups(model, weight_decay=0.1)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}


def test_norms_and_biases_get_no_weight_decay():
    model = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2))
    decay, no_decay = param_groups(model, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1
    assert all("ln_" in names[id(p)] or "bias" in names[id(p)] for p in no_decay["params"])
    assert not any("bias" in names[id(p)] for p in decay["params"])
