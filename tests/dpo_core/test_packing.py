"""dpo_core.packing: packed rows (one pair per row, or padding-free: several pairs per row) give
the plain forward's log-probs and gradients."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import dpo_core.packing
from dpo_core.collate import PreferenceCollator
from dpo_core.logp_types import LogpOptions
from dpo_core.packing import batch_blocker, packed_layout
from dpo_core.pair_layout import layout_cost, one_pair_per_row, pack_pairs, plain_cost
from dpo_core.reference import AdapterDisabledReference, FrozenCopyReference
from dpo_core.step import DPOSettings, dpo_step
from tests.dpo_core.oracle import plain_token_logps, shared_token_logps
from tests.dpo_core.tiny import lora_model, tiny_gpt2, tiny_llama

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    """Each test sees the fallback warnings that are warned once per process."""
    monkeypatch.setattr(dpo_core.packing, "_warned", set())


# Per-token log-probs are O(log V) ~ 5; the packed and plain forwards run the same float32 math
# over differently shaped (masked) attention matrices, so they may differ by a few ulp (~5e-7).
VALUE_TOL = dict(rtol=0.0, atol=4e-6)
# Gradients sum the same contributions in another order: relative float32 error ~ n·eps.
GRAD_TOL = dict(rtol=2e-5, atol=2e-6)
STATS = ("entropy", "mean_logits", "log_sum_sq_probs")

# (prompt, chosen, rejected) lengths: padding, an empty prompt, an empty chosen completion,
# and a rejected completion longer than everything else.
SPANS = [(3, 4, 2), (5, 1, 6), (0, 3, 3), (2, 0, 2), (4, 2, 9)]


def pair_batch(spans=SPANS, vocab: int = 128, seed: int = 0, **collate):
    """Pairs with the given (P, C, R) lengths, collated as training collates them."""
    g = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(1, vocab, (n,), generator=g).tolist()

    features = [
        {"prompt_ids": ids(p), "chosen_ids": ids(c), "rejected_ids": ids(r)} for p, c, r in spans
    ]
    return PreferenceCollator(pad_token_id=0, **collate)(features)


def tiny_qwen2(vocab: int = 128):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
    )  # fmt: skip
    return Qwen2ForCausalLM(config).eval()


def with_attention(model, attention: str):
    model.set_attn_implementation(attention)
    return model


def both_ways(model, batch, padding_free=True, **kw):
    """(plain, packed) TokenLogps; packing must not fall back (a warning would say it did), and
    padding-free must put several pairs in a row."""
    layout = packed_layout(model, batch, padding_free)
    assert layout is not None
    assert (layout.num_rows < batch.num_pairs) == padding_free
    plain = plain_token_logps(model, batch, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        packed = shared_token_logps(model, batch, padding_free=padding_free, **kw)
    return plain, packed


def weighted_grads(logps, params):
    w = torch.rand(logps.shape, generator=torch.Generator().manual_seed(3))
    return torch.autograd.grad((logps * w).sum(), params)


def test_packed_layout_hand_worked():
    """Pair 0: prompt [1, 2], chosen [3], rejected [4, 5]; pair 1: prompt [6], chosen [7, 8],
    rejected [9]. Rows ``prompt + chosen + rejected``; rejected positions restart after the
    prompt; rejected tokens do not see chosen ones."""
    features = [
        {"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4, 5]},
        {"prompt_ids": [6], "chosen_ids": [7, 8], "rejected_ids": [9]},
    ]
    packed = pack_pairs(PreferenceCollator(pad_token_id=0)(features))
    assert packed.input_ids.tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 0]]
    assert packed.position_ids.tolist()[0] == [0, 1, 2, 2, 3]
    assert packed.position_ids.tolist()[1][:4] == [0, 1, 2, 1]
    allowed = packed.allowed[:, 0].int()
    # pair 0, query 3 (rejected 4): sees prompt 0-1 and itself, not chosen 2
    assert allowed[0, 3].tolist() == [1, 1, 0, 1, 0]
    assert allowed[0, 4].tolist() == [1, 1, 0, 1, 1]
    assert allowed[1, 3].tolist() == [1, 0, 0, 1, 0]  # pair 1, rejected 9: prompt 6 only
    assert allowed[0, 2].tolist() == [1, 1, 1, 0, 0]  # chosen: plain causal
    # Scored tokens in grid order: chosen 3 (from position 1), chosen 7, 8 (positions 0, 1),
    # rejected 4 (from the last prompt position 1), 5 (from 3), rejected 9 (from position 0).
    assert packed.targets.tolist() == [3, 7, 8, 4, 5, 9]
    assert packed.hidden_index.tolist() == [1, 5 + 0, 5 + 1, 1, 3, 5 + 0]


@pytest.mark.parametrize("padding_free", [True, False])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("builder", [tiny_llama, tiny_qwen2, tiny_gpt2])
def test_packed_equals_plain_values_and_gradients(builder, attention, padding_free):
    model = with_attention(builder(), attention)
    batch = pair_batch()
    params = list(model.parameters())
    plain, packed = both_ways(model, batch, padding_free, stats=True, wpo=True)
    torch.testing.assert_close(packed.logps, plain.logps, **VALUE_TOL)
    assert torch.equal(packed.mask, plain.mask)
    assert torch.equal(packed.stats.is_top1, plain.stats.is_top1)
    for name in STATS:
        torch.testing.assert_close(
            getattr(packed.stats, name), getattr(plain.stats, name), **VALUE_TOL
        )
    for got, want in zip(
        weighted_grads(packed.logps, params), weighted_grads(plain.logps, params), strict=True
    ):
        torch.testing.assert_close(got, want, **GRAD_TOL)


def test_packed_equals_plain_under_lora_and_for_its_reference():
    """A LoRA policy (adapters live) and its adapters-off reference, packed vs plain."""
    model = lora_model(tiny_llama())
    batch = pair_batch(seed=1)
    params = [p for p in model.parameters() if p.requires_grad]
    plain, packed = both_ways(model, batch)
    torch.testing.assert_close(packed.logps, plain.logps, **VALUE_TOL)
    for got, want in zip(
        weighted_grads(packed.logps, params), weighted_grads(plain.logps, params), strict=True
    ):
        torch.testing.assert_close(got, want, **GRAD_TOL)
    reference = AdapterDisabledReference(model)
    separate = reference(batch, LogpOptions(prompt_sharing=False))
    for padding_free in (True, False):
        shared = reference(batch, LogpOptions(padding_free=padding_free))
        for a, b in ((shared.chosen, separate.chosen), (shared.rejected, separate.rejected)):
            torch.testing.assert_close(a, b, rtol=0.0, atol=3e-5)  # sums of ~10 tokens of O(5)


def test_dpo_step_with_and_without_sharing():
    """The whole step: loss, metrics and gradients agree with prompt sharing on and off."""
    policy = tiny_llama()
    reference_model = copy.deepcopy(policy)
    with torch.no_grad():  # a reference that differs from the policy: a non-trivial loss
        for p in reference_model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(4)))
    reference = FrozenCopyReference(reference_model)
    batch = pair_batch(seed=2)
    outs, grads = [], []
    for sharing in (True, False):
        policy.zero_grad()
        reference.prompt_sharing = sharing
        out = dpo_step(policy, batch, reference, DPOSettings(prompt_sharing=sharing))
        out.loss.backward()
        outs.append(out)
        grads.append([p.grad.clone() for p in policy.parameters()])
    # Measured here: loss and every sum bit-identical (diff 0.0; also for 3 reference x 6 batch
    # seeds, and per-token packed vs plain logps are identical on this CPU). The bounds allow every
    # per-token logp of the 32 completion tokens (SPANS) to be one float32 ulp off (4.8e-7 at
    # |logp| ~ 5: the measured llama eager-vs-sdpa gap), all in the same direction, for policy
    # and reference. Loss (0.72, ulp 6e-8): the mean over 5 pairs of -logsigmoid(beta z) moves by
    # <= beta/5 * 64 * 4.8e-7 = 6.1e-7 < 1e-6.
    torch.testing.assert_close(outs[0].loss, outs[1].loss, rtol=0.0, atol=1e-6)
    for key in outs[0].sums:
        # Sums over the batch: rewards/margins, beta * 64 tokens * 4.8e-7 = 3.1e-6 < atol 4e-6;
        # logps/rejected (-101) 22 * 4.8e-7 = 1.1e-5 and entropy (145, 30 tokens) 1.4e-5, both
        # ~1e-7 relative, within rtol 1e-6 (8 float32 eps).
        torch.testing.assert_close(outs[0].sums[key], outs[1].sums[key], rtol=1e-6, atol=4e-6)
        assert torch.equal(outs[0].counts[key], outs[1].counts[key])
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, **GRAD_TOL)


def test_sharing_is_used_only_where_it_saves_work():
    """Long shared prompts save tokens; with no prompt the packed row is twice as long and its
    masked attention computes 4x the (query, key) pairs of two causal rows."""
    long_prompt = pair_batch([(128, 128, 128)] * 2)
    no_prompt = pair_batch([(0, 2048, 2048)] * 2)
    assert layout_cost(one_pair_per_row([384] * 2), 256) < plain_cost(long_prompt, 256)
    assert layout_cost(one_pair_per_row([4096] * 2), 256) > plain_cost(no_prompt, 256)
    model = tiny_llama()  # hidden 64: plain is cheaper for this batch, and is what runs
    short = pair_batch([(0, 40, 40)] * 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a silent choice, not a fallback
        shared = shared_token_logps(model, short)
    assert torch.equal(shared.logps, plain_token_logps(model, short).logps)


def test_recurrent_model_falls_back_with_a_warning():
    """RecurrentGemma's recurrent blocks carry state from one packed segment to the next: the probe
    sees it, and the model runs the plain forward, saying why."""
    from parity.sides.zoo import tiny_zoo_model

    model = tiny_zoo_model("recurrent_gemma")
    batch = pair_batch()
    assert "differ from the plain forward" in batch_blocker(model, batch)
    with pytest.warns(UserWarning, match="prompt sharing off"):
        packed = shared_token_logps(model, batch)
    assert torch.equal(packed.logps, plain_token_logps(model, batch).logps)


def test_model_that_ignores_the_mask_falls_back():
    """A backbone that drops the mask and positions it is given (custom code) is caught by the
    probe; the same model with its own forward takes the fast path."""
    model = tiny_llama()
    assert batch_blocker(model, pair_batch()) is None
    own_forward = model.model.forward
    model.model.forward = lambda input_ids, use_cache=False, **_: own_forward(
        input_ids=input_ids, use_cache=use_cache
    )
    dpo_core.packing._verdicts.clear()
    assert "differ from the plain forward" in batch_blocker(model, pair_batch())


def test_attention_without_4d_masks_falls_back(monkeypatch):
    model = tiny_llama()
    monkeypatch.setattr(model.config, "_attn_implementation", "flash_attention_2")
    assert "takes no 4D mask" in batch_blocker(model, pair_batch())


def test_unshared_prompts_fall_back():
    """keep_end truncation cuts the two rows of a pair differently: no common prompt to share."""
    model = tiny_llama()
    batch = pair_batch(max_length=6, truncation_mode="keep_end")
    assert "same prompt" in batch_blocker(model, batch)
    with pytest.warns(UserWarning, match="same prompt"):
        packed = shared_token_logps(model, batch)
    torch.testing.assert_close(packed.logps, plain_token_logps(model, batch).logps)


def test_sliding_window_shorter_than_rows_falls_back():
    """A window shorter than the rows falls back; a window no layer uses (Qwen2-MoE keeps
    ``sliding_window=0`` with ``use_sliding_window=False``) does not."""
    from parity.sides.zoo import tiny_zoo_model

    model = tiny_zoo_model("mistral")
    model.config.sliding_window = 4
    assert "sliding window" in batch_blocker(model, pair_batch())
    model.config.sliding_window = None
    assert batch_blocker(model, pair_batch()) is None
    moe = tiny_zoo_model("qwen2_moe")
    assert (moe.config.sliding_window, moe.config.use_sliding_window) == (0, False)
    assert batch_blocker(moe, pair_batch()) is None


def test_pack_pairs_refuses_unpackable_batches():
    with pytest.raises(ValueError, match="same prompt"):
        pack_pairs(pair_batch(max_length=6, truncation_mode="keep_end"))


def count_backbone_calls(model) -> list[tuple[int, int]]:
    """The (rows, length) of every call of ``model``'s backbone from now on, in order."""
    seen: list[tuple[int, int]] = []
    model.model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(tuple(kwargs["input_ids"].shape)),
        with_kwargs=True,
    )
    return seen


def test_padding_free_rows_go_through_in_one_call():
    """Padding-free, all packed rows of a forward go through the backbone in one call of
    (Nr, Lp): fewer rows than pairs, the width the cost model chose, and the plain forward's
    log-probs. One pair per row: one call of (B, longest)."""
    model = tiny_llama()
    spans = SPANS + [(2, 3, 4), (4, 3, 2), (1, 1, 1)]
    batch = pair_batch(spans)
    real = [p + c + r for p, c, r in spans]
    assert batch_blocker(model, batch) is None  # the probe's forwards run before counting
    seen = count_backbone_calls(model)
    layout = packed_layout(model, batch, padding_free=True)
    plain, packed = both_ways(model, batch, padding_free=True)
    assert seen == [
        (2 * len(spans), batch.input_ids.shape[1]),
        (layout.num_rows, layout.row_length),
    ]
    assert layout.num_rows < len(spans) and sum(layout.fills) == sum(real)
    # h = 64: two rows of 34 (67 tokens, 1 padding position) cost less than first fit at the
    # longest pair (15: five rows of 15, 8 padding positions), whose rows are shorter.
    assert (layout.num_rows, layout.row_length) == (2, 34)
    torch.testing.assert_close(packed.logps, plain.logps, **VALUE_TOL)
    seen.clear()
    both_ways(model, batch, padding_free=False)
    assert seen[1:] == [(len(real), max(real))]


@pytest.mark.parametrize(
    ("spans", "settings", "path"),
    [
        (SPANS, {}, "padding-free"),
        (SPANS, {"padding_free": False}, "one pair per row"),
        ([(0, 40, 40)] * 2, {}, "plain: cheaper by the cost model"),
        (SPANS, {"prompt_sharing": False}, "plain: asked for"),
    ],
)
def test_one_backbone_call_per_model_and_step_on_every_path(spans, settings, path):
    """A DPO step calls the policy's backbone once and the reference's once, whichever path the
    batch takes: what FSDP2 needs of every process (each call all-gathers every unit once), so
    processes whose batches take different paths stay in step."""
    policy, reference_model = tiny_llama(), tiny_llama()
    batch = pair_batch(spans)
    for model in (policy, reference_model):
        assert batch_blocker(model, batch) is None  # the probe's forwards run before counting
    packs = packed_layout(policy, batch, padding_free=settings.get("padding_free", True))
    assert (packs is not None and settings.get("prompt_sharing", True)) == (
        not path.startswith("plain")
    )
    calls = count_backbone_calls(policy), count_backbone_calls(reference_model)
    out = dpo_step(policy, batch, FrozenCopyReference(reference_model), DPOSettings(**settings))
    out.loss.backward()
    assert [len(c) for c in calls] == [1, 1], path


def test_unshared_prompts_also_take_one_call():
    """The fallback (a batch that cannot be packed) is the plain forward: one call too."""
    model = tiny_llama()
    batch = pair_batch(max_length=6, truncation_mode="keep_end")
    assert "same prompt" in batch_blocker(model, batch)
    calls = count_backbone_calls(model)
    with pytest.warns(UserWarning, match="same prompt"):
        shared_token_logps(model, batch)
    assert calls == [tuple(batch.input_ids.shape)]
