"""parity.bench.flops: the FLOP formulas against hand counts and against torch's own FLOP counter.

Hand counts, for a decoder of L layers, hidden d, intermediate f, h query heads and k key/value
heads of head_dim e, vocabulary V:

    llama   per layer  q: d·he  k: d·ke  v: d·ke  o: he·d  gate, up, down: 3·d·f
            head       d·V (a separate ``lm_head``)
    gpt2    per layer  c_attn: d·3d  attn c_proj: d·d  c_fc: d·4d  mlp c_proj: 4d·d = 12 d²
            head       d·V (tied to the embeddings, trains with them)

and for one call of r rows of n positions with gradients (``pass_work``):
linear 2W·rn forward + 2(W + W_trainable)·rn backward; attention 4·L·he per (query, key)
pair, rn² pairs square or r·n(n+1)/2 causal, times 3 with the backward.
"""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch.utils.flop_counter import FlopCounterMode
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from parity.bench import flop_meters, flops
from parity.bench.flops import DecoderShape, HeadRule, PairTokens, Pass

torch.set_num_threads(1)

LLAMA = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=24, vocab_size=101)  # fmt: skip
GPT2 = dict(n_embd=48, n_layer=2, n_head=4, vocab_size=97, n_positions=64)


def llama(attention: str = "sdpa", **overrides):
    torch.manual_seed(0)
    config = LlamaConfig(**{**LLAMA, **overrides}, tie_word_embeddings=False)
    config._attn_implementation = attention
    return LlamaForCausalLM(config)


def gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(**GPT2))


def llama_layer_weights(c: dict = LLAMA) -> int:
    d, f, e = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    h, k = c["num_attention_heads"], c["num_key_value_heads"]
    return d * h * e + 2 * d * k * e + h * e * d + 3 * d * f


def test_llama_shape_is_the_hand_count():
    """GQA (2 KV heads for 4 query heads) and a head_dim other than d / h: the attention is
    h·e = 96 wide, not d = 64."""
    shape = flops.decoder_shape(llama())
    c = LLAMA
    assert shape.layers == c["num_hidden_layers"]
    assert shape.attention_width == c["num_attention_heads"] * c["head_dim"]
    assert shape.matmul_weights == c["num_hidden_layers"] * llama_layer_weights()
    assert shape.trainable_weights == shape.matmul_weights and shape.adapter_weights == 0
    assert (shape.hidden_size, shape.vocab_size) == (c["hidden_size"], c["vocab_size"])
    assert shape.head_weights == c["hidden_size"] * c["vocab_size"] and shape.head_trainable


def test_gpt2_shape_counts_conv1d_and_the_tied_head():
    shape = flops.decoder_shape(gpt2())
    d = GPT2["n_embd"]
    assert shape.layers == GPT2["n_layer"] and shape.attention_width == d
    assert shape.matmul_weights == GPT2["n_layer"] * 12 * d * d
    assert shape.head_weights == d * GPT2["vocab_size"] and shape.head_trainable


def test_lora_shape_trains_the_adapters_only():
    """rank r on q and v: each adapter is A (in -> r) and B (r -> out): r·(in + out)."""
    r, c = 4, LLAMA
    model = get_peft_model(
        llama(), LoraConfig(r=r, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    shape = flops.decoder_shape(model)
    d, e = c["hidden_size"], c["head_dim"]
    adapters = c["num_hidden_layers"] * (
        r * (d + c["num_attention_heads"] * e) + r * (d + c["num_key_value_heads"] * e)
    )
    assert shape.adapter_weights == shape.trainable_weights == adapters
    assert shape.matmul_weights == c["num_hidden_layers"] * llama_layer_weights() + adapters
    assert not shape.head_trainable  # fmt: skip


SHAPE = DecoderShape(layers=2, attention_width=8, matmul_weights=100, trainable_weights=100,
                     adapter_weights=0, hidden_size=4, vocab_size=10, head_trainable=True)  # fmt: skip


def test_pass_work_by_hand():
    """3 rows of 5: 15 positions; square 75 pairs, causal 3·15 = 45; 4·2·8 = 64 per pair."""
    square = flops.pass_work(SHAPE, Pass(3, 5, square=True, grad=True))
    assert square.linear == 2 * 100 * 15 + 2 * 200 * 15
    assert square.attention == 3 * 64 * 75 and square.recompute == 0
    causal = flops.pass_work(SHAPE, Pass(3, 5, square=False, grad=False, recompute=1.0))
    assert causal.linear == 2 * 100 * 15 and causal.attention == 64 * 45
    assert causal.recompute == 0  # no backward, nothing to recompute
    checkpointed = flops.pass_work(SHAPE, Pass(3, 5, square=False, grad=True, recompute=0.5))
    assert checkpointed.recompute == 0.5 * (2 * 100 * 15 + 64 * 45)
    lora = DecoderShape(**{**SHAPE.__dict__, "trainable_weights": 10})
    assert flops.pass_work(lora, Pass(1, 1, False, True)).linear == 2 * 100 + 2 * 110


def test_pair_tokens_share_the_prompt():
    """The docstring's pair, P=2, C=3, R=1, plus a pair whose rows' prompts differ (2 and 1
    tokens: counted as two sequences of 3 and 2), right-padded to 5: tokens 6 + (3 + 2), pairs
    18 + (6 + 3), and the scored positions are the completion tokens (none at position 0)."""
    lengths, completions = [5, 3, 3, 2], [3, 1, 1, 1]  # chosen 0, chosen 1, rejected 0, rejected 1
    attention = torch.tensor([[1] * n + [0] * (5 - n) for n in lengths])
    completion = torch.zeros_like(attention)
    for row, (n, c) in enumerate(zip(lengths, completions, strict=True)):
        completion[row, n - c : n] = 1
    counts = flops.pair_tokens(attention, completion)
    assert counts == PairTokens(tokens=6 + 5, pairs=18 + 9, scored=sum(completions))


def test_necessary_work_is_the_policy_on_real_tokens():
    work = flops.necessary_work(SHAPE, PairTokens(tokens=7, pairs=20, scored=3))
    assert work.linear == 6 * 100 * 7 and work.attention == 3 * 64 * 20
    assert work.head == 3 * 2 * 40 * 3 and work.recompute == 0


def test_trl_head_scores_every_position_on_cpu():
    """Policy: 4 rows of 6 (forward 1, recompute 1, grad_h 1, grad_W 1), reference: forward."""
    passes = [Pass(4, 6, False, True), Pass(4, 6, False, False)]
    work = flops.executed_work(SHAPE, HeadRule("trl"), passes, [PairTokens(9, 30, 8)])
    assert work.head == 2 * 40 * 4 * 5 * (4 + 1)
    compact = flops.executed_work(
        SHAPE, HeadRule("trl", compact=True), passes, [PairTokens(9, 30, 8)]
    )
    assert compact.head == 2 * 40 * 8 * (4 + 1)  # fmt: skip


def test_ours_head_keeps_or_recomputes_the_softmax():
    """8 scored positions x V = 10 float32 = 320 bytes of softmax: kept under a 320-byte budget
    (3 matmuls), recomputed above it (4); a reference pass adds its forward."""
    batch = [PairTokens(9, 30, 8)]
    kept = flops.executed_work(
        SHAPE, HeadRule("ours", keep_probs_bytes=320), [Pass(2, 9, True, True)], batch
    )
    assert kept.head == 2 * 40 * 8 * 3
    tight = HeadRule("ours", keep_probs_bytes=319)
    live = flops.executed_work(
        SHAPE, tight, [Pass(2, 9, True, True), Pass(2, 9, True, False)], batch
    )
    assert live.head == 2 * 40 * 8 * (4 + 1)
    other = HeadRule("ours", linear_kernel=False, chunk_size=4)  # checkpointed chunks
    assert (
        flops.ours_head_matmuls(SHAPE, 8, keep_probs_bytes=0, linear_kernel=False, chunk_size=4)
        == 4
    )
    assert flops.executed_work(SHAPE, other, [Pass(2, 9, True, True)], batch).head == 2 * 40 * 8 * 4  # fmt: skip


def test_attention_is_square():
    ones, padded = torch.ones(2, 5), torch.tensor([[1, 1, 1, 0, 0]])
    assert not flop_meters.attention_is_square(None, "sdpa")
    assert not flop_meters.attention_is_square(ones, "sdpa")
    assert flop_meters.attention_is_square(padded, "sdpa")
    assert flop_meters.attention_is_square(torch.ones(2, 1, 5, 5, dtype=torch.bool), "sdpa")
    assert flop_meters.attention_is_square(None, "eager")
    assert not flop_meters.attention_is_square(padded, "flash_attention_2")


def test_recorder_sees_each_call_inside_steps_only():
    model = llama()
    recorder = flop_meters.PassRecorder()
    recorder.attach(model)
    recorder.attach(model)  # once only
    ids = torch.randint(0, 100, (2, 7))
    model(ids)  # not recording
    recorder.start()
    model(ids, attention_mask=torch.ones(2, 7, dtype=torch.long))
    with torch.no_grad():
        model(ids, attention_mask=torch.tensor([[1] * 7, [1] * 5 + [0] * 2]))
    model.activation_checkpointing_enable()  # what trl's gradient_checkpointing=True calls
    model.train()
    model(ids)
    assert recorder.stop() == [
        Pass(2, 7, square=False, grad=True),
        Pass(2, 7, square=True, grad=False),
        Pass(2, 7, square=False, grad=True, recompute=1.0),
    ]
    assert recorder.passes is None


def measured_flops(model, ids: torch.Tensor) -> int:
    """torch's count of one forward (all logits) and backward of ``model`` on ``ids``."""
    with FlopCounterMode(display=False) as counter:
        model(ids).logits.sum().backward()
    return counter.get_total_flops()


def test_full_fine_tuning_matches_torch_flop_counter():
    """Eager attention (torch's counter has no formula for the CPU flash kernel): the same
    matmuls as ``pass_work`` (square attention) plus the head on every position (forward,
    grad_h, grad_W): equal to the FLOP (both count matrix products only, and llama's rotary
    frequencies reach torch's counter as none)."""
    model = llama("eager").train()
    ids = torch.randint(0, LLAMA["vocab_size"], (3, 11))
    shape = flops.decoder_shape(model)
    expected = flops.pass_work(shape, Pass(3, 11, square=True, grad=True)).total
    expected += flops.head_flops(shape, ids.numel(), 3)
    assert measured_flops(model, ids) == expected


def test_lora_matches_torch_flop_counter():
    """LoRA (frozen base and head): our backward counts every input gradient; autograd skips
    those of the modules reading layer 0's input (nothing below them trains), the q, k, v
    projections and their A matrices, which is the whole difference."""
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(llama("eager"), LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    model.train()
    ids = torch.randint(0, LLAMA["vocab_size"], (2, 9))
    shape = flops.decoder_shape(model)
    expected = flops.pass_work(shape, Pass(2, 9, square=True, grad=True)).total
    expected += flops.head_flops(shape, ids.numel(), 2)  # forward, grad_h
    attention = model.get_base_model().model.layers[0].self_attn
    first = [attention.q_proj, attention.k_proj, attention.v_proj]
    reads_input = sum(m.base_layer.in_features * m.base_layer.out_features
                      + m.lora_A["default"].in_features * m.lora_A["default"].out_features
                      for m in first)  # fmt: skip
    skipped = 2 * ids.numel() * reads_input
    assert measured_flops(model, ids) == expected - skipped


def test_peak_matmul_flops_is_a_positive_rate():
    for dtype in (torch.float32, torch.bfloat16):
        peak = flop_meters.peak_matmul_flops(dtype, n=128, repeats=2)
        assert math.isfinite(peak) and peak > 0


@pytest.mark.parametrize("n", [1, 2, 7])
def test_causal_pairs(n):
    assert flops.causal_pairs(n) == sum(range(1, n + 1))
