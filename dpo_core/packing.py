"""Prompt sharing and padding-free rows: each prompt forwarded once, pairs packed into rows.

The plain batch holds every prompt twice, in ``prompt + chosen`` and ``prompt + rejected``, and
pads every row to the longest. Here pair i becomes one segment ``prompt + chosen + rejected``
(``dpo_core.pair_layout``): rejected tokens do not see the chosen ones and their positions
restart after the prompt, so every token sees exactly the tokens, at exactly the positions, that
it sees in its plain row. Padding-free (``padding_free``, the default) lays several segments end
to end in a row (bin packing) under a block mask, positions restarting per segment; without it
each segment has its own row. Either way every packed row of a forward goes through the backbone
in ONE call, right padded to the longest row (padding-free rows come out nearly full; the row
width is chosen by ``pair_layout.layout_cost``), as the plain forward is one call: a forward
runs each layer once, whichever path a batch takes, which FSDP2 needs of every process. Each
hidden state equals its plain counterpart up to float32 rounding (the attention sums run over a
differently shaped, masked matrix). The scored hidden states are gathered from the packed rows
in the plain (2B, L-1) grid order and go through the same head (``logps.score_states``): no
padding position goes through the head, and padding positions weigh 0 in a MoE router's loss.

This needs a model whose attention takes a ready 4D mask and explicit ``position_ids``
(transformers' ``sdpa`` and ``eager`` attention: the mask builders pass a 4D mask through,
``masking_utils._preprocess_mask_arguments``), and whose layers carry nothing from one segment
to the next. No list of families decides it: the first time a model is seen, packed rows run
against the plain forward on a probe (``probe_blocker``), and the model takes the fast path only
if every log-prob agrees within float32 rounding. A model that fails (recurrent or state-space
blocks, custom code that ignores the mask), a sliding window shorter than the rows, or a batch
whose two rows of a pair do not start with the same prompt (``keep_end`` truncation can cut them
differently) falls back to the plain forward, with a warning the first time (``batch_blocker``
says why). On a GPU the
block mask runs through SDPA's masked kernels (memory-efficient or math attention: the flash
kernel takes no mask). FlexAttention with a block mask built from the segment ids and token
kinds would skip the masked blocks; varlen FlashAttention cannot say "rejected sees the prompt
but not chosen" without forwarding the prompt twice (see BENCHMARKS.md's GPU note).

Both are on by default (``DPOSettings.prompt_sharing`` / ``padding_free``, ``--no-prompt-sharing``
and ``--no-padding-free`` in training.fit), and used for a batch only where ``layout_cost`` says
they save work: "exact" here is "equal to the plain computation within float32 rounding"
(tests/dpo_core/test_packing.py bounds the difference; ``python -m parity`` measures it against
a float64 forward in each case). ``python -m parity`` trains on the plain path, which sums in
trl's order, because its step-1 bounds (1e-6) are below a few ulps of a long completion's summed
log-prob.
"""

from __future__ import annotations

import warnings
from weakref import WeakKeyDictionary

import torch
from torch import nn

from dpo_core.batch import PreferenceBatch
from dpo_core.lm_head import selected_logps
from dpo_core.logp_types import LogpOptions, ScoredStates
from dpo_core.model_parts import ModelParts, model_parts, unwrap_peft
from dpo_core.pair_layout import (
    Layout,
    choose_layout,
    first_fit_decreasing,
    layout_cost,
    pack_pairs,
    pair_spans,
    plain_cost,
)
from dpo_core.probe import compute_dtype, logp_bound, model_probe_batch, probe_mode
from dpo_core.router_aux import RouterSpec, load_balancing_loss, router_logits_of

# Kernels given the block mask as a ready 4D mask. Not flash attention (it takes no mask: a varlen
# kernel cannot say "rejected sees the prompt but not chosen"), not flex_attention (a 4D tensor
# mask goes into its score_mod; on torch 2.13's CPU kernel that corrupts memory and kills the
# process, measured on a tiny Llama: a BlockMask built from the segments would be the way).
SUPPORTED_ATTENTION = ("sdpa", "eager")

# model -> ((attention kind, sliding window), why not or None): the probe runs once per model
_verdicts: WeakKeyDictionary[nn.Module, tuple[tuple, str | None]] = WeakKeyDictionary()


def model_blocker(model: nn.Module) -> str | None:
    """Why ``model`` cannot run packed rows (None when it can): its attention takes no 4D mask,
    or packed rows did not equal the plain forward on the probe (``probe_blocker``, run once per
    model, attention kind and window)."""
    base = unwrap_peft(model)
    attention = getattr(getattr(base, "config", None), "_attn_implementation", None)
    if attention not in SUPPORTED_ATTENTION:
        return f"attention {attention!r} takes no 4D mask (use one of {SUPPORTED_ATTENTION})"
    key = (attention, _sliding_window(model))
    verdict = _verdicts.get(base)
    if verdict is None or verdict[0] != key:
        verdict = _verdicts[base] = (key, probe_blocker(model))
    return verdict[1]


def probe_blocker(model: nn.Module) -> str | None:
    """Packed rows against the plain forward on the probe (``dpo_core.probe``: two pairs share a
    row): None when every completion log-prob agrees within ``probe.logp_bound``, else why not.

    This is what lets any decoder take the fast path: one whose layers carry state from one
    segment to the next (recurrent or state-space blocks), or whose attention ignores the mask
    it is given (custom code), shows a difference far above rounding and runs plain."""
    parts = model_parts(model)
    batch = model_probe_batch(model)
    p, c, r = pair_spans(batch)
    lengths = (p + c + r).tolist()
    layout = first_fit_decreasing(lengths, max(lengths))  # the two short pairs share a row
    with probe_mode(model):
        try:
            packed = pack_pairs(batch, layout)
            packed_hidden, _ = _scored_states(parts.backbone, model, packed)
            plain = parts.backbone(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
            ).last_hidden_state
        except Exception as error:  # noqa: BLE001 - any failure means: not this model
            return f"packed rows fail on a probe ({type(error).__name__}: {error})"
        plain_hidden = plain[:, :-1][packed.mask.to(plain.device)]
        plain_logits = parts.head(parts.project(plain_hidden))
        got, want = (
            selected_logps(parts.project(h), packed.targets.to(h.device), parts.head,
                           parts.logit_transform, LogpOptions())[0]
            for h in (packed_hidden, plain_hidden)
        )  # fmt: skip
    difference = float((got - want).abs().max())
    bound = logp_bound(plain_logits, compute_dtype(parts.head))
    if not difference <= bound:
        return (
            f"packed rows differ from the plain forward by {difference:.1e} on a probe (float "
            f"bound {bound:.1e}): its layers carry state across segments or ignore the mask"
        )
    return None


def _sliding_window(model: nn.Module) -> int | None:
    """The attention window of the model's sliding layers, None when no layer slides."""
    text = unwrap_peft(model).config.get_text_config()
    window = getattr(text, "sliding_window", None)
    if not window or getattr(text, "use_sliding_window", True) is False:
        return None
    layer_types = getattr(text, "layer_types", None)
    if layer_types is not None and not any("sliding" in str(t) for t in layer_types):
        return None
    return window


def _spans_or_blocker(model: nn.Module, batch: PreferenceBatch):
    """The pairs' (P, C, R) spans (``pair_layout.pair_spans``), or why this batch cannot be
    packed for ``model``."""
    window = _sliding_window(model)
    if window is not None and batch.input_ids.shape[1] > window:
        return f"rows longer than the sliding window ({window} tokens)"  # one warning, not one a length
    reason = model_blocker(model)
    return reason if reason is not None else pair_spans(batch)


def batch_blocker(model: nn.Module, batch: PreferenceBatch) -> str | None:
    """Why this batch cannot be packed for ``model`` (None when it can)."""
    spans = _spans_or_blocker(model, batch)
    return spans if isinstance(spans, str) else None


def _attention_mask(allowed: torch.Tensor, model: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The 4D mask in the form the attention takes: bool for sdpa, additive float for eager."""
    if unwrap_peft(model).config._attn_implementation == "sdpa":
        return allowed
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


_warned: set[str] = set()


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(
            f"prompt sharing off (padding-free rows too), plain forward used: {reason}",
            stacklevel=3,
        )


def _scored_states(
    backbone, model: nn.Module, packed, router: RouterSpec | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The (T, H) last hidden states at ``packed.hidden_index`` (grid order (Nr, Lp)) from one
    backbone call over all the packed rows, and the router's load-balancing loss over the packed
    tokens when ``router`` (prompt tokens weighted 2, padding 0, ``PackedPairs.token_weights``:
    the plain rows' loss), else None."""
    dtype = unwrap_peft(model).get_input_embeddings().weight.dtype
    extra = {"output_router_logits": True} if router else {}
    out = backbone(
        input_ids=packed.input_ids,
        attention_mask=_attention_mask(packed.allowed, model, dtype),
        position_ids=packed.position_ids,
        use_cache=False,
        **extra,
    )
    hidden = out.last_hidden_state.flatten(0, 1)[packed.hidden_index]  # (Nr * Lp, H) -> (T, H)
    if not router:
        return hidden, None
    weights = packed.token_weights.reshape(-1)
    return hidden, load_balancing_loss(router_logits_of(out), weights, router)


def packed_layout(model: nn.Module, batch: PreferenceBatch, padding_free: bool) -> Layout | None:
    """The layout to pack ``batch`` in for ``model``, or None when the plain forward runs: the
    batch cannot be packed (warned once per reason) or the plain rows cost less work
    (``pair_layout.layout_cost``; no warning, a silent choice)."""
    spans = _spans_or_blocker(model, batch)
    if isinstance(spans, str):
        _warn_once(spans)
        return None
    hidden_size = unwrap_peft(model).config.get_text_config().hidden_size
    p, c, r = spans
    layout = choose_layout((p + c + r).tolist(), hidden_size, padding_free)
    return layout if layout_cost(layout, hidden_size) < plain_cost(batch, hidden_size) else None


def packed_states(
    model: nn.Module,
    parts: ModelParts,
    batch: PreferenceBatch,
    padding_free: bool = True,
    router: RouterSpec | None = None,
) -> ScoredStates | None:
    """The scored hidden states of ``batch`` from packed rows, each prompt forwarded once per pair
    (several pairs per row when ``padding_free``): the same ``ScoredStates`` as the plain forward
    (``logps.plain_states``), equal up to float32 rounding. None when the plain forward should
    run instead (``packed_layout``: packing cannot run, or costs more)."""
    layout = packed_layout(model, batch, padding_free)
    if layout is None:
        return None
    packed = pack_pairs(batch, layout)
    hidden, aux_loss = _scored_states(parts.backbone, model, packed, router)
    return ScoredStates(hidden, packed.targets, packed.mask, aux_loss)
