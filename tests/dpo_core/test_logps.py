"""dpo_core.logps: chunked completion log-probs against full logits, trl's fused head and models.

The sums over tokens (sequence, LD-DPO, lengths) are in test_sequence_logps.py."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from dpo_core.logp_types import TokenLogps
from dpo_core.model_parts import model_parts
from tests.dpo_core.oracle import plain_token_logps, score_hidden, token_logps_from_logits
from tests.dpo_core.tiny import (
    GRAD_TOL,
    SPANS,
    VALUE_TOL,
    lora_model,
    make_batch,
    make_head,
    softcap,
    tiny_gemma2,
    tiny_gpt2,
    tiny_llama,
    value_tol,
)

torch.set_num_threads(1)
warnings.filterwarnings("ignore", message=".*gemm_4bit.*")

STAT_FIELDS = ("entropy", "mean_logits", "is_top1", "log_sum_sq_probs")


# ---------------------------------------------------------------- chunked head vs full logits


def full_reference(head, hidden, batch, transform=None):
    """token_logps_from_logits on the full (N, L, V) logits of ``head(hidden)``."""
    logits = head(hidden).float()
    logits = logits if transform is None else transform(logits)
    return token_logps_from_logits(logits, batch.input_ids, batch.completion_mask, stats=True)


def grads(out: torch.Tensor, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """d(Σ w·out)/d tensors for a fixed random weighting w (so every token matters differently)."""
    w = torch.rand(out.shape, generator=torch.Generator().manual_seed(3))
    return torch.autograd.grad((out * w).sum(), tensors)


@pytest.mark.parametrize("kind", ["linear", "linear_bias", "softcap", "lora"])
@pytest.mark.parametrize("chunk_size", [1, 5, 7, 16, 10_000])
def test_chunked_equals_full_logits_values_and_grads(kind, chunk_size):
    """Every path (custom Function, checkpointed chunks, one plain chunk) equals full logits.

    The 6 rows hold 24 scored tokens: chunk sizes 5 and 7 do not divide it, 10_000 is one chunk.
    """
    batch = make_batch(SPANS, length=10, vocab=50)
    head = make_head(kind, hidden=12, vocab=50)
    transform = softcap if kind == "softcap" else None
    hidden = torch.randn(6, 10, 12, generator=torch.Generator().manual_seed(2)) * 3
    hidden.requires_grad_(True)
    params = [p for p in head.parameters() if p.requires_grad]

    ours = score_hidden(
        hidden, head, batch.input_ids, batch.completion_mask,
        chunk_size=chunk_size, stats=True, wpo=True, logit_transform=transform,
    )  # fmt: skip
    expected = full_reference(head, hidden, batch, transform)
    torch.testing.assert_close(ours.logps, expected.logps, **value_tol(head(hidden)))
    assert torch.equal(ours.mask, batch.completion_mask[:, 1:].bool())
    for got, want in zip(
        grads(ours.logps, [hidden, *params]), grads(expected.logps, [hidden, *params])
    ):
        torch.testing.assert_close(got, want, **GRAD_TOL)


def bnb_linear4bit(hidden: int, vocab: int) -> nn.Module:
    """An NF4 bitsandbytes Linear4bit head on CPU, wrapped in a live LoRA."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    dense = nn.Linear(hidden, vocab, bias=False)
    quantized = bnb.nn.Linear4bit(
        hidden, vocab, bias=False, compute_dtype=torch.float32, quant_type="nf4"
    )
    quantized.weight = bnb.nn.Params4bit(
        dense.weight.data.clone(), requires_grad=False, quant_type="nf4"
    )
    quantized = quantized.to("cpu")  # moving the module is what quantizes the weight
    assert quantized.weight.dtype == torch.uint8
    peft = get_peft_model(nn.Sequential(quantized), LoraConfig(r=4, target_modules=["0"]))
    nn.init.normal_(peft.base_model.model[0].lora_B.default.weight)
    return peft.base_model.model[0]


@pytest.mark.parametrize("chunk_size", [4, 10_000])
def test_bnb_4bit_head_with_lora_matches_its_own_full_logits(chunk_size):
    """A 4-bit NF4 head (dequantised on the fly) + LoRA: forward and backward through our chunks."""
    batch = make_batch(SPANS, length=10, vocab=64)
    head = bnb_linear4bit(hidden=64, vocab=64)
    hidden = torch.randn(6, 10, 64, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    params = [p for p in head.parameters() if p.requires_grad]
    assert len(params) == 2  # lora_A, lora_B

    ours = score_hidden(hidden, head, batch.input_ids, batch.completion_mask, chunk_size=chunk_size)
    expected = full_reference(head, hidden, batch)
    torch.testing.assert_close(ours.logps, expected.logps, **VALUE_TOL)
    for got, want in zip(
        grads(ours.logps, [hidden, *params]), grads(expected.logps, [hidden, *params])
    ):
        torch.testing.assert_close(got, want, **GRAD_TOL)


@pytest.mark.parametrize("kind", ["linear", "softcap"])
def test_statistics_equal_textbook_formulas(kind):
    """entropy, mean_logits, is_top1, log Σp² from the chunks == token_logps_from_logits's formulas.

    Targets are set to the argmax at some positions so is_top1 has both values.
    """
    batch = make_batch(SPANS, length=10, vocab=50)
    head = make_head(kind, hidden=12, vocab=50)
    transform = softcap if kind == "softcap" else None
    hidden = torch.randn(6, 10, 12, generator=torch.Generator().manual_seed(2)) * 3
    with torch.no_grad():
        logits = head(hidden) if transform is None else transform(head(hidden))
        argmax_next = logits.argmax(-1)[:, :-1]
        batch.input_ids[:, 1:][:, ::2] = argmax_next[:, ::2]  # every other target is the argmax

    ours = score_hidden(
        hidden, head, batch.input_ids, batch.completion_mask,
        chunk_size=5, stats=True, wpo=True, logit_transform=transform,
    )  # fmt: skip
    expected = token_logps_from_logits(
        logits, batch.input_ids, batch.completion_mask, stats=True, wpo=True
    )
    for field in ("entropy", "mean_logits", "log_sum_sq_probs"):
        torch.testing.assert_close(
            getattr(ours.stats, field), getattr(expected.stats, field), **VALUE_TOL
        )
    assert torch.equal(ours.stats.is_top1, expected.stats.is_top1)
    assert 0 < ours.stats.is_top1.sum() < ours.mask.sum()
    for field in STAT_FIELDS:  # zero off the completion
        assert not getattr(ours.stats, field)[~ours.mask].any()


def test_is_top1_tie_rule():
    """trl's rule (kern:383): a tie with an EARLIER vocabulary index is not top-1; a later one is.

    One row, two scored positions, V = 4, head = identity (hidden are the logits):
    position 0 logits [5, 1, 5, 0] target 2: ties index 0, which comes first -> False;
    position 1 logits [0, 5, 1, 5] target 1: ties index 3, which comes later -> True.
    """
    logits = torch.tensor([[[5.0, 1.0, 5.0, 0.0], [0.0, 5.0, 1.0, 5.0], [0.0, 0.0, 0.0, 0.0]]])
    input_ids = torch.tensor([[0, 2, 1]])
    completion_mask = torch.tensor([[0, 1, 1]])
    expected = torch.tensor([[False, True]])
    for head in (nn.Identity(), nn.Linear(4, 4, bias=False)):
        if isinstance(head, nn.Linear):
            nn.init.eye_(head.weight)
        ours = score_hidden(logits, head, input_ids, completion_mask, stats=True)
        assert torch.equal(ours.stats.is_top1, expected)
    full = token_logps_from_logits(logits, input_ids, completion_mask, stats=True)
    assert torch.equal(full.stats.is_top1, expected)


def test_matches_trl_chunked_logprob_kernel():
    """Every output of trl's own ChunkedLogProbFunction (CPU path) on the scored tokens, and the
    gradient w.r.t. the hidden states, equal ours to float32 rounding."""
    from trl.kernels import ChunkedLogProbFunction

    batch = make_batch(SPANS, length=10, vocab=50)
    head = make_head("linear_bias", hidden=12, vocab=50)
    hidden = torch.randn(6, 10, 12, generator=torch.Generator().manual_seed(2)) * 3
    hidden.requires_grad_(True)
    mask = batch.completion_mask[:, 1:].bool()
    outputs = ("log_probs", *STAT_FIELDS)
    trl_out = ChunkedLogProbFunction.apply(
        hidden[:, :-1][mask], head.weight, head.bias, batch.input_ids[:, 1:][mask],
        1.0, 32768, None, 1.0, outputs,
    )  # fmt: skip
    ours = score_hidden(
        hidden, head, batch.input_ids, batch.completion_mask,
        chunk_size=4, stats=True, wpo=True,
    )  # fmt: skip
    trl_by_name = dict(
        zip(("logps", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1"), trl_out)
    )
    torch.testing.assert_close(ours.logps[mask], trl_by_name["logps"].detach(), **VALUE_TOL)
    for field in ("entropy", "mean_logits", "log_sum_sq_probs"):
        torch.testing.assert_close(
            getattr(ours.stats, field)[mask], trl_by_name[field].detach(), **VALUE_TOL
        )
    assert torch.equal(ours.stats.is_top1[mask], trl_by_name["is_top1"])
    (trl_grad,) = grads(trl_by_name["logps"], [hidden])
    (our_grad,) = grads(ours.logps[mask], [hidden])
    torch.testing.assert_close(our_grad, trl_grad, **GRAD_TOL)


# ---------------------------------------------------------------- whole models


def _model_logits_reference(model, batch, **kw) -> TokenLogps:
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return token_logps_from_logits(logits, batch.input_ids, batch.completion_mask, **kw)


@pytest.mark.parametrize("builder", [tiny_llama, tiny_gpt2, tiny_gemma2])
def test_token_logps_equals_model_logits(builder):
    """token_logps (backbone + chunked head) == log_softmax(model(...).logits) gathered,
    values and gradients w.r.t. all parameters."""
    model = builder()
    batch = make_batch(SPANS, length=10, vocab=128)
    params = [p for p in model.parameters()]
    ours = plain_token_logps(model, batch, chunk_size=5, stats=True)
    expected = _model_logits_reference(model, batch, stats=True)
    torch.testing.assert_close(ours.logps, expected.logps, **VALUE_TOL)
    torch.testing.assert_close(ours.stats.entropy, expected.stats.entropy, **VALUE_TOL)
    for got, want in zip(grads(ours.logps, params), grads(expected.logps, params)):
        torch.testing.assert_close(got, want, **GRAD_TOL)


def _trl_fused(model, batch, outputs):
    """trl's patched forward (utils:1548-1698) on a copy of ``model``."""
    from trl.trainer.utils import add_fused_lm_head

    patched = copy.deepcopy(model)
    add_fused_lm_head(patched, outputs=outputs)
    labels = batch.input_ids.masked_fill(batch.completion_mask == 0, -100)
    return patched(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask,
        use_cache=False, labels=labels, fused_lm_head=True,
    )  # fmt: skip


@pytest.mark.parametrize("builder", [tiny_llama, tiny_gpt2, tiny_gemma2])
def test_matches_trl_fused_lm_head(builder):
    """Per-token logps and every statistic equal trl's fused head on the same model and batch."""
    model = builder()
    batch = make_batch(SPANS, length=10, vocab=128)
    outputs = ("log_probs", *STAT_FIELDS)
    with torch.no_grad():
        theirs = _trl_fused(model, batch, outputs)
        ours = plain_token_logps(model, batch, chunk_size=5, stats=True, wpo=True)
    torch.testing.assert_close(ours.logps, theirs.log_probs, **VALUE_TOL)
    for field in ("entropy", "mean_logits", "log_sum_sq_probs"):
        torch.testing.assert_close(getattr(ours.stats, field), getattr(theirs, field), **VALUE_TOL)
    assert torch.equal(ours.stats.is_top1, theirs.is_top1)


def test_softcap_bends_the_logps():
    """Gemma 2's softcap (0.5) really changes the log-probs, so the test above checks the transform."""
    model = tiny_gemma2()
    batch = make_batch(SPANS, length=10, vocab=128)
    parts = model_parts(model)
    with torch.no_grad():
        hidden = parts.backbone(input_ids=batch.input_ids).last_hidden_state
        args = (hidden, parts.head, batch.input_ids, batch.completion_mask)
        capped = score_hidden(*args, logit_transform=parts.logit_transform)
        uncapped = score_hidden(*args)
    assert (capped.logps - uncapped.logps).abs().max() > 1e-2


def test_peft_model_with_lora_on_backbone_and_head():
    """A PeftModel (LoRA on attention and lm_head): values and LoRA gradients equal its logits."""
    model = lora_model(tiny_llama())
    batch = make_batch(SPANS, length=10, vocab=128)
    params = [p for p in model.parameters() if p.requires_grad]
    ours = plain_token_logps(model, batch, chunk_size=5)
    expected = _model_logits_reference(model, batch)
    torch.testing.assert_close(ours.logps, expected.logps, **VALUE_TOL)
    for got, want in zip(grads(ours.logps, params), grads(expected.logps, params)):
        torch.testing.assert_close(got, want, **GRAD_TOL)
    with torch.no_grad(), model.disable_adapter():
        base = plain_token_logps(model, batch)
    assert (base.logps - ours.logps).abs().max() > 1e-3  # the adapters were really on


def test_4bit_model_with_lora(tmp_path):
    """A QLoRA model (bitsandbytes NF4 via BitsAndBytesConfig, CPU) + LoRA: values and grads."""
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    tiny_llama().save_pretrained(tmp_path)
    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    model = LlamaForCausalLM.from_pretrained(
        tmp_path, quantization_config=quant, device_map="cpu", dtype=torch.float32
    )
    model = lora_model(model, targets=("q_proj", "v_proj"))
    model.train()  # the policy's mode: bitsandbytes' CPU eval path repacks weights
    batch = make_batch(SPANS, length=10, vocab=128)
    params = [p for p in model.parameters() if p.requires_grad]
    ours = plain_token_logps(model, batch, chunk_size=5)
    expected = _model_logits_reference(model, batch)
    torch.testing.assert_close(ours.logps, expected.logps, **VALUE_TOL)
    for got, want in zip(grads(ours.logps, params), grads(expected.logps, params)):
        torch.testing.assert_close(got, want, **GRAD_TOL)
