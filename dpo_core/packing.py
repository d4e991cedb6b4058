"""Prompt sharing: forward each pair's prompt once, as one packed row prompt + chosen + rejected.

The plain batch holds every prompt twice, in ``prompt + chosen`` and ``prompt + rejected``. Here
pair i becomes one row (P = prompt length, C / R = chosen / rejected completion lengths)::

    ids        p0 p1 .. p(P-1) | c0 .. c(C-1)     | r0 .. r(R-1)     | pad ..
    positions  0  1  .. P-1    | P  .. P+C-1      | P  .. P+R-1      | (clamped)

with an attention mask that is causal, except that rejected tokens do not see the chosen ones.
Every token then sees exactly the tokens, at exactly the positions, that it sees in its plain
row, so each hidden state equals its plain counterpart up to float32 rounding (the attention sums
run over a differently shaped, masked matrix). The scored hidden states are gathered from the
packed rows in the plain (2B, L-1) grid order and go through the same head
(``logps.score_selected``): chosen token t+1 is predicted from packed position t, as in the
plain row; rejected token u+1 from packed position u + C when u is a rejected position, and from
the last prompt position P-1 when u = P-1, the same hidden state that predicts the first chosen
token.

This needs a model whose attention takes a ready 4D mask and explicit ``position_ids``: the
transformers models listed in ``SUPPORTED_MODEL_TYPES`` with ``sdpa`` or ``eager`` attention
(their mask builders pass a 4D mask through, ``masking_utils._preprocess_mask_arguments``).
Anything else, a sliding window shorter than the rows, or a batch whose two rows of a pair do
not start with the same prompt (``keep_end`` truncation can cut them differently) falls back to
the plain forward, with a warning the first time (``batch_blocker`` says why).

It is on by default (``DPOSettings.prompt_sharing``, ``--no-prompt-sharing`` in training.fit):
the issue's "exact" is "equal to the plain computation within float32 rounding", and the packed
rows change only the attention's summation order (tests/dpo_core/test_packing.py bounds the
difference). ``python -m parity`` pins the plain path, which sums in trl's order, because its
step-1 bounds (1e-6) are below a few ulps of a long completion's summed log-prob.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from dpo_core.batch import PreferenceBatch
from dpo_core.lm_head import CHUNK_SIZE, KEEP_PROBS_BYTES
from dpo_core.logps import TokenLogps, model_token_logps, score_selected
from dpo_core.model_parts import model_parts, unwrap_peft

# Families whose decoder builds its mask with transformers' masking_utils (a 4D mask passes
# through untouched) and whose positions come from ``position_ids`` (rotary or learned). Checked
# by tests/dpo_core/test_packing.py against the plain forward.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gpt2")
SUPPORTED_ATTENTION = ("sdpa", "eager")


@dataclass
class PackedPairs:
    """B preference pairs as B packed rows, and where the plain grid's scored states lie in them.

    Attributes:
        input_ids: (B, Lp) long, ``prompt + chosen + rejected`` then padding (id 0).
        position_ids: (B, Lp) long, the positions each token has in its plain row.
        allowed: (B, 1, Lp, Lp) bool, True where query q may attend to key k.
        hidden_index: (T,) long, for each True entry of ``mask`` (row-major), the index of the
            hidden state that predicts it in the flattened (B * Lp) packed states.
        mask: (2B, L-1) bool, the plain grid's scored positions, ``completion_mask[:, 1:]``.
        targets: (T,) long, the tokens scored, ``input_ids[:, 1:][mask]``.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    allowed: torch.Tensor
    hidden_index: torch.Tensor
    mask: torch.Tensor
    targets: torch.Tensor


def _spans(batch: PreferenceBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | str:
    """(P (B,), C (B,), R (B,)) of each pair, or why the batch cannot be packed."""
    attn, comp = batch.attention_mask.bool(), batch.completion_mask.bool()
    length = attn.sum(dim=1)  # (2B,)
    pos = torch.arange(attn.shape[1], device=attn.device)
    if not torch.equal(attn, pos < length.unsqueeze(1)):
        return "the attention mask is not right padding"
    start = torch.where(comp.any(dim=1), comp.int().argmax(dim=1), length)  # first completion
    in_completion = (pos >= start.unsqueeze(1)) & (pos < length.unsqueeze(1))
    if not torch.equal(comp, in_completion):
        return "a completion mask is not one span running to the end of its row"
    chosen_start, rejected_start = start.chunk(2)
    chosen_ids, rejected_ids = batch.input_ids.chunk(2)
    in_prompt = pos < chosen_start.unsqueeze(1)
    same_prompt = (chosen_ids == rejected_ids) | ~in_prompt
    if not (torch.equal(chosen_start, rejected_start) and bool(same_prompt.all())):
        return "the two rows of a pair do not start with the same prompt (truncation?)"
    chosen_len, rejected_len = length.chunk(2)
    return chosen_start, chosen_len - chosen_start, rejected_len - rejected_start


def pack_pairs(batch: PreferenceBatch) -> PackedPairs:
    """The packed rows of ``batch`` (see the module docstring). Raises ValueError when the batch
    cannot be packed (``batch_blocker`` says why)."""
    spans = _spans(batch)
    if isinstance(spans, str):
        raise ValueError(f"pack_pairs: {spans}")
    p, c, r = (t.unsqueeze(1) for t in spans)  # (B, 1) each
    num_pairs, length = batch.num_pairs, batch.input_ids.shape[1]
    device = batch.input_ids.device
    packed_len = max(int((p + c + r).max()), 1)
    q = torch.arange(packed_len, device=device).unsqueeze(0)  # (1, Lp)
    from_chosen_row = q < p + c
    valid = q < p + c + r
    source_pos = torch.where(from_chosen_row, q, q - c).clamp(0, length - 1)  # (B, Lp)
    pair = torch.arange(num_pairs, device=device).unsqueeze(1)
    source_row = torch.where(from_chosen_row, pair, pair + num_pairs)
    input_ids = batch.input_ids[source_row, source_pos].masked_fill(~valid, 0)
    is_chosen = (q >= p) & from_chosen_row
    is_rejected = ~from_chosen_row & valid
    causal = q.unsqueeze(-1) >= q.unsqueeze(-2)  # (1, Lp, Lp): key k <= query q
    hides = is_rejected.unsqueeze(-1) & is_chosen.unsqueeze(-2)  # rejected query, chosen key
    allowed = (causal & ~hides).unsqueeze(1)  # a padding query still sees itself: no empty row

    mask = batch.completion_mask[:, 1:].bool()
    t = torch.arange(length - 1, device=device).unsqueeze(0)  # (1, L-1)
    rejected_q = torch.where(t >= p, t + c, t)  # (B, L-1): packed position of rejected state t
    packed_q = torch.cat([t.expand(num_pairs, -1), rejected_q])  # (2B, L-1)
    flat = torch.cat([pair, pair]) * packed_len + packed_q
    return PackedPairs(
        input_ids=input_ids,
        position_ids=source_pos,
        allowed=allowed,
        hidden_index=flat[mask],
        mask=mask,
        targets=batch.input_ids[:, 1:][mask],
    )


def model_blocker(model: nn.Module) -> str | None:
    """Why ``model`` cannot run packed rows (None when it can)."""
    config = getattr(unwrap_peft(model), "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"model type {model_type!r} is not one of {SUPPORTED_MODEL_TYPES}"
    attention = getattr(config, "_attn_implementation", None)
    if attention not in SUPPORTED_ATTENTION:
        return f"attention {attention!r} takes no 4D mask (use one of {SUPPORTED_ATTENTION})"
    return None


def batch_blocker(model: nn.Module, batch: PreferenceBatch) -> str | None:
    """Why this batch cannot be packed for ``model`` (None when it can)."""
    reason = model_blocker(model)
    if reason is not None:
        return reason
    config = unwrap_peft(model).config
    window = getattr(config.get_text_config(), "sliding_window", None)
    if window is not None and batch.input_ids.shape[1] > window:
        return f"rows longer than the sliding window ({window} tokens)"  # one warning, not one a length
    spans = _spans(batch)
    return spans if isinstance(spans, str) else None


def sharing_saves_work(batch: PreferenceBatch, hidden_size: int) -> bool:
    """Whether the packed rows cost less backbone work than the plain ones (estimated).

    Per layer, a token costs ~12 h² multiply-adds in its projections and MLP, and each
    (query, key) pair the attention computes costs ~2h (scores, weighted sum). Packed rows are
    shorter in total but attend through a mask, so every pair of a row is computed; plain rows
    without padding attend causally (half the pairs). With short prompts and long completions
    the packed row's attention can cost more than the prompt tokens it saves.
    """
    p, c, r = _spans(batch)
    plain_len = batch.input_ids.shape[1]
    packed_len = int((p + c + r).max())
    causal = 0.5 if bool(batch.attention_mask.all()) else 1.0
    plain = batch.input_ids.shape[0] * (6 * hidden_size * plain_len + causal * plain_len**2)
    packed = batch.num_pairs * (6 * hidden_size * packed_len + packed_len**2)
    return packed < plain


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
        warnings.warn(f"prompt sharing off, plain forward used: {reason}", stacklevel=3)


def shared_prompt_token_logps(
    model: nn.Module,
    batch: PreferenceBatch,
    *,
    chunk_size: int = CHUNK_SIZE,
    with_stats: bool = False,
    with_wpo: bool = False,
    keep_probs_bytes: int = KEEP_PROBS_BYTES,
) -> TokenLogps:
    """``logps.model_token_logps`` with each prompt forwarded once per pair: the same (2B, L-1)
    ``TokenLogps``, equal up to float32 rounding. Falls back to the plain forward (warning once
    per reason) when the model or the batch cannot be packed."""
    reason = batch_blocker(model, batch)
    if reason is not None:
        _warn_once(reason)
    config = unwrap_peft(model).config.get_text_config()
    if reason is not None or not sharing_saves_work(batch, config.hidden_size):
        return model_token_logps(
            model,
            batch,
            chunk_size=chunk_size,
            with_stats=with_stats,
            with_wpo=with_wpo,
            keep_probs_bytes=keep_probs_bytes,
        )
    packed = pack_pairs(batch)
    parts = model_parts(model)
    embeddings = unwrap_peft(model).get_input_embeddings()
    out = parts.backbone(
        input_ids=packed.input_ids,
        attention_mask=_attention_mask(packed.allowed, model, embeddings.weight.dtype),
        position_ids=packed.position_ids,
        use_cache=False,
    )
    hidden = out.last_hidden_state  # (B, Lp, H)
    head_device = next(parts.head.parameters()).device
    selected = hidden.reshape(-1, hidden.shape[-1])[packed.hidden_index].to(head_device)
    return score_selected(
        selected,
        packed.targets.to(head_device),
        packed.mask.to(head_device),
        parts.head,
        chunk_size=chunk_size,
        with_stats=with_stats,
        with_wpo=with_wpo,
        logit_transform=parts.logit_transform,
        keep_probs_bytes=keep_probs_bytes,
    )


def token_logps(
    model: nn.Module, batch: PreferenceBatch, *, prompt_sharing: bool, **head_options
) -> TokenLogps:
    """The model's per-token completion log-probs: ``shared_prompt_token_logps`` when
    ``prompt_sharing``, else ``model_token_logps``; ``head_options`` are their keyword arguments
    (chunk_size, with_stats, with_wpo, keep_probs_bytes)."""
    forward = shared_prompt_token_logps if prompt_sharing else model_token_logps
    return forward(model, batch, **head_options)
