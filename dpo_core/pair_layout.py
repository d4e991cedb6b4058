"""Where each preference pair's tokens go in the packed rows of a prompt-sharing forward.

Pair i has a prompt of P tokens and completions of C (chosen) and R (rejected) tokens; its
segment ``prompt + chosen + rejected`` is n = P + C + R tokens long::

    ids        p0 p1 .. p(P-1) | c0 .. c(C-1)     | r0 .. r(R-1)
    positions  0  1  .. P-1    | P  .. P+C-1      | P  .. P+R-1

Rejected tokens see the prompt and each other, never the chosen tokens, and their positions
restart after the prompt, so every token sees exactly the tokens, at exactly the positions, it
sees in its plain row (``prompt + chosen`` or ``prompt + rejected``).

Padding-free (the default), segments are laid end to end in rows of at most ``capacity``
positions (bin packing, first fit by decreasing length); a block mask keeps each segment to
itself, and positions restart per segment. All rows go through the backbone in ONE call, right
padded to the longest row: each call has a fixed cost per layer (many small parallel regions,
felt most on a busy CPU), and under FSDP2 every process must run each unit equally often, which
one call per forward guarantees whatever the rows. The padding is what first-fit decreasing
leaves at the rows' ends, little as the rows come out nearly full::

    row 0   [ pair 3 ............................. ][ pair 0 .......... ]
    row 1   [ pair 1 ................ ][ pair 2 ............ ][ pair 4 ..]
    row 2   [ pair 5 ....................... ]      . . padding . . . . .

The capacity is chosen by cost (``choose_layout``): a masked attention computes every (query,
key) pair of its row, so longer rows cost more attention, and more rows cost more padding; the
candidates are the longest segment (as many rows as it takes) and the widths that would fit the
segments into k rows, k = 1 .. B. ``pack_pairs`` returns the rows right-padded to one (Nr, Lp)
grid, the call's input; ``Layout.fills`` says where each row's real positions end. With
``padding_free=False`` each segment gets its own row (one pair per row, the layout before
padding-free), also in one padded call.

Work, in units of 2h multiply-adds per layer (h the hidden size): a position costs ~12 h²
multiply-adds in its projections and MLP (6h units), and each (query, key) pair of a masked
attention ~2h (1 unit); a masked attention computes every pair of its row, padding included.
``layout_cost`` counts every row at the padded width Lp, as the one call computes it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dpo_core.batch import PreferenceBatch


@dataclass
class PackedPairs:
    """B preference pairs as packed rows, and where the plain grid's scored states lie in them.

    Attributes:
        input_ids: (Nr, Lp) long, the pairs' segments then padding (id 0).
        position_ids: (Nr, Lp) long, the positions each token has in its plain row (0 on padding).
        allowed: (Nr, 1, Lp, Lp) bool, True where query q may attend to key k.
        hidden_index: (T,) long, for each True entry of ``mask`` (row-major), the index of the
            hidden state that predicts it in the flattened (Nr * Lp) packed states.
        mask: (2B, L-1) bool, the plain grid's scored positions, ``completion_mask[:, 1:]``.
        targets: (T,) long, the tokens scored, ``input_ids[:, 1:][mask]``.
        token_weights: (Nr, Lp) long, how many plain-row tokens each packed position stands
            for: 2 for a prompt token (it is in the chosen and the rejected row), 1 for a
            completion token, 0 for padding (a MoE router's loss counts tokens this way).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    allowed: torch.Tensor
    hidden_index: torch.Tensor
    mask: torch.Tensor
    targets: torch.Tensor
    token_weights: torch.Tensor


@dataclass(frozen=True)
class Layout:
    """Row and offset of each pair's segment.

    Attributes:
        rows: row of pair i. offsets: its first position in that row.
        fills: positions used in each row (Nr,); the rows go through the backbone in one
            call, padded to the longest fill.
    """

    rows: tuple[int, ...]
    offsets: tuple[int, ...]
    fills: tuple[int, ...]

    @property
    def num_rows(self) -> int:
        """Nr."""
        return len(self.fills)

    @property
    def row_length(self) -> int:
        """Lp, the longest row's fill: the padded grid's width."""
        return max(self.fills, default=0)


def pair_spans(batch: PreferenceBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | str:
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


def first_fit_decreasing(lengths: list[int], capacity: int) -> Layout:
    """Segments in rows of at most ``capacity``: longest first, each into the first row with
    room. Example, lengths [3, 5, 2, 4], capacity 7: 5 -> row 0 at 0, 4 -> row 1 at 0,
    3 -> row 1 at 4, 2 -> row 0 at 5: rows (1, 0, 0, 1), offsets (4, 0, 5, 0), row length 7."""
    if lengths and max(lengths) > capacity:
        raise ValueError(f"a segment of {max(lengths)} tokens does not fit rows of {capacity}")
    fill: list[int] = []
    rows, offsets = [0] * len(lengths), [0] * len(lengths)
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):  # stable: ties keep order
        row = next((r for r, used in enumerate(fill) if used + lengths[i] <= capacity), len(fill))
        if row == len(fill):
            fill.append(0)
        rows[i], offsets[i] = row, fill[row]
        fill[row] += lengths[i]
    return Layout(tuple(rows), tuple(offsets), tuple(fill))


def one_pair_per_row(lengths: list[int]) -> Layout:
    """Pair i alone in row i, the rows padded to the longest in one batched call."""
    n = len(lengths)
    return Layout(tuple(range(n)), (0,) * n, tuple(lengths))


def layout_cost(layout: Layout, hidden_size: int) -> float:
    """Backbone work of the packed rows (module docstring's units): one call of Nr rows, each at
    the padded width Lp, ``Nr * (6h Lp + Lp²)``."""
    width = layout.row_length
    return layout.num_rows * (6 * hidden_size * width + width**2)


def plain_cost(batch: PreferenceBatch, hidden_size: int) -> float:
    """``layout_cost`` of the plain forward: 2B rows of L; without padding the attention is
    causal (SDPA skips half the pairs), with padding a mask makes it compute all L²."""
    rows, length = batch.input_ids.shape
    causal = 0.5 if bool(batch.attention_mask.all()) else 1.0
    return rows * (6 * hidden_size * length + causal * length**2)


def choose_layout(lengths: list[int], hidden_size: int, padding_free: bool = True) -> Layout:
    """Padding-free: the cheapest (``layout_cost``) first-fit-decreasing layout over the
    capacities ``max(longest, ceil(total / k))``, k = 1 .. B (k = B: the longest segment, never
    more work than one pair per row: no more rows, none wider); ties go to the narrower rows.
    Else one pair per row. Example, lengths [6, 5, 3, 2], h = 4: capacity 16 (one row) costs
    24 * 16 + 256 = 640, 8 (two rows: 6 + 2, 5 + 3) 2 * (24 * 8 + 64) = 512, 6 (three rows:
    6, 5, 3 + 2) 3 * (24 * 6 + 36) = 540: two rows of 8."""
    if not (padding_free and lengths):
        return one_pair_per_row(lengths)
    total, longest = sum(lengths), max(lengths)
    capacities = sorted({max(longest, -(-total // k)) for k in range(1, len(lengths) + 1)})
    layouts = [first_fit_decreasing(lengths, c) for c in capacities]  # narrowest first
    return min(layouts, key=lambda layout: layout_cost(layout, hidden_size))


def pack_pairs(batch: PreferenceBatch, layout: Layout | None = None) -> PackedPairs:
    """The packed rows of ``batch`` in ``layout`` (default: one pair per row); see the module
    docstring. Raises ValueError when the batch cannot be packed (``pair_spans`` says why)."""
    spans = pair_spans(batch)
    if isinstance(spans, str):
        raise ValueError(f"pack_pairs: {spans}")
    p, c, r = spans  # (B,) each
    n = p + c + r
    layout = layout or one_pair_per_row(n.tolist())
    device, num_pairs = batch.input_ids.device, batch.num_pairs
    lp = max(layout.row_length, 1)
    base = torch.tensor(layout.rows, device=device) * lp + torch.tensor(
        layout.offsets, device=device
    )

    # One entry per real token: its pair, its place in the segment, where it comes from.
    pair = torch.repeat_interleave(torch.arange(num_pairs, device=device), n)  # (N,)
    local = torch.arange(pair.numel(), device=device) - torch.repeat_interleave(n.cumsum(0) - n, n)
    from_chosen_row = local < (p + c)[pair]
    source_pos = torch.where(from_chosen_row, local, local - c[pair])
    source_row = torch.where(from_chosen_row, pair, pair + num_pairs)
    kind = torch.where(local < p[pair], 0, torch.where(from_chosen_row, 1, 2))  # prompt/chosen/rej
    dest = base[pair] + local

    def scatter(values: torch.Tensor, fill: int) -> torch.Tensor:
        out = torch.full((layout.num_rows * lp,), fill, dtype=torch.long, device=device)
        return out.index_put_((dest,), values.long()).view(layout.num_rows, lp)

    weights = scatter(torch.where(kind == 0, 2, 1), 0)  # prompt tokens stand for two
    segment, kind = scatter(pair, -1), scatter(kind, 0)  # segment -1: padding
    q = torch.arange(lp, device=device)
    causal = q.unsqueeze(-1) >= q.unsqueeze(-2)  # (Lp, Lp): key k <= query q
    same = segment.unsqueeze(-1) == segment.unsqueeze(-2)  # padding sees padding: no empty row
    hides = (kind == 2).unsqueeze(-1) & (kind == 1).unsqueeze(-2)  # rejected query, chosen key

    mask = batch.completion_mask[:, 1:].bool()
    t = torch.arange(mask.shape[1], device=device).unsqueeze(0)  # (1, L-1)
    chosen_q = t.expand(num_pairs, -1)  # chosen state t is segment position t
    rejected_q = torch.where(t >= p.unsqueeze(1), t + c.unsqueeze(1), t)
    flat = torch.cat([base, base]).unsqueeze(1) + torch.cat([chosen_q, rejected_q])  # (2B, L-1)
    return PackedPairs(
        input_ids=scatter(batch.input_ids[source_row, source_pos], 0),
        position_ids=scatter(source_pos, 0),
        allowed=(causal & same & ~hides).unsqueeze(1),
        hidden_index=flat[mask],
        mask=mask,
        targets=batch.input_ids[:, 1:][mask],
        token_weights=weights,
    )
