"""Preference rows to token ids, token for token as trl 1.16's ``DPOTrainer`` makes them.

The path of one row (trl's ``_prepare_dataset``, dpo:1036-1142):

1. :func:`format_row`: validate (``rows.validate_row``), split an implicit prompt off
   (``rows.extract_prompt``, du:548-632), and append the EOS token *as text* to standard
   completions that do not already end with it (dpo:1056-1069). Conversations get no EOS: their
   chat template must emit it.
2. :func:`tokenize_row`: tokenize ``prompt``, ``prompt + chosen`` and ``prompt + rejected`` (plain
   string concatenation, or message-list concatenation through the chat template; du:367-403),
   then cut all three where the prompt's tokens stop being a prefix of both others (dpo:1075-1132).
   A completion without a leading space can merge with the prompt's last token; the completion
   then starts at the merged token, and the prompt loses its tail.
3. :func:`tokenize_rows`: every row, then drop, as trl does, the rows whose prompt alone fills
   ``max_length`` under ``keep_start`` truncation (dpo:1137-1140), reporting how many and why.

Reading and validating rows is ``dpo_core.rows``'s; the collator that turns these rows into a
:class:`~dpo_core.batch.PreferenceBatch` is ``dpo_core.collate.PreferenceCollator``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from dpo_core.collate import check_truncation_mode
from dpo_core.rows import (
    CONVERSATIONAL_IMPLICIT,
    EMPTY_COMPLETION,
    IMPLICIT,
    DataError,
    common_prefix,
    detect_format,
    extract_prompt,
    is_conversational_format,
    validate_row,
)

logger = logging.getLogger(__name__)

PROMPT_FILLS_MAX_LENGTH = "prompt_fills_max_length"

# Columns carried from an input row to its tokenized row untouched (trl passes them to the collator).
_PASSTHROUGH = ("ref_chosen_logps", "ref_rejected_logps")


def format_row(
    row: Mapping[str, Any], *, eos_token: str | None, source: str = "<row>", index: int = 0
) -> dict[str, Any]:
    """Validate a row and return it with an explicit ``prompt`` and, for text, EOS-terminated
    completions.

    Idempotent: a formatted row formats to itself. Keys other than prompt/chosen/rejected are kept.

    Args:
        row: any shape ``rows.detect_format`` knows.
        eos_token: the tokenizer's EOS text (``"</s>"``), appended to standard completions unless
            they already end with it. Unused for conversations.
        source, index: where the row came from, for error messages.

    Raises:
        DataError: as :func:`dpo_core.rows.validate_row`.
        ValueError: when a standard (text) row comes with ``eos_token=None``.
    """
    validate_row(row, source=source, index=index)
    fmt = detect_format(row, source=source, index=index)
    out = dict(row)
    if fmt in (IMPLICIT, CONVERSATIONAL_IMPLICIT):
        out["prompt"], out["chosen"], out["rejected"] = extract_prompt(
            row["chosen"], row["rejected"]
        )
    if not is_conversational_format(fmt):
        if not eos_token:
            raise ValueError("standard (text) rows need a tokenizer with an eos_token")
        for key in ("chosen", "rejected"):
            if not out[key].endswith(eos_token):
                out[key] = out[key] + eos_token
    return out


def common_prefix_length(ids: list[int], other_ids: list[int]) -> int:
    """Number of leading tokens the two sequences share (trl ``common_prefix_length``, du:406-428),
    found by bisection (``rows.common_prefix``)."""
    return common_prefix(ids, other_ids)


def tokenize_row(
    row: Mapping[str, Any], tokenizer: Any, *, source: str = "<row>", index: int = 0
) -> dict[str, list[int]]:
    """Token ids of one row: ``{"prompt_ids", "chosen_ids", "rejected_ids"}``, as trl stores them.

    With ``p = tok(prompt)``, ``pc = tok(prompt + chosen)``, ``pr = tok(prompt + rejected)`` and
    ``n = min(common_prefix(p, pc), common_prefix(p, pr))`` (dpo:1106-1109)::

        prompt_ids = p[:n]    chosen_ids = pc[n:]    rejected_ids = pr[n:]

    ``tok`` is ``tokenizer(text=...)`` for strings (special tokens as the tokenizer adds them, e.g.
    a BOS), and ``tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
    tools=row.get("tools"), **row.get("chat_template_kwargs", {}))`` for conversations, with
    ``add_generation_prompt=True`` for the prompt alone only.

    Args:
        row: a row in any shape; it is formatted with :func:`format_row` first.
        tokenizer: a transformers tokenizer (with a chat template for conversations).
        source, index: where the row came from, for error messages.

    Raises:
        DataError: for an invalid row, or a completion that tokenizes to nothing.
    """
    return tokenize_with_merges(row, tokenizer, source=source, index=index)[0]


def tokenize_with_merges(
    row: Mapping[str, Any], tokenizer: Any, *, source: str, index: int
) -> tuple[dict[str, list[int]], int]:
    """:func:`tokenize_row`, plus how many prompt tokens merged into the completion (0 when the
    prompt's tokens are a prefix of both prompt + completion)."""
    row = format_row(row, eos_token=tokenizer.eos_token, source=source, index=index)
    ((p, pc, pr),) = encode_formatted([row], tokenizer)
    return split_prompt(p, pc, pr, source=source, index=index)


def encode_formatted(
    rows: list[Mapping[str, Any]], tokenizer: Any
) -> list[tuple[list[int], list[int], list[int]]]:
    """``(tok(prompt), tok(prompt + chosen), tok(prompt + rejected))`` of each row already through
    :func:`format_row` (see :func:`tokenize_row`). The string rows' texts go to the tokenizer in
    one batched call (the same ids as one call per text: no padding, no truncation, each text
    encoded alone), which saves the per-call overhead that dominates on short texts."""
    out: list = [None] * len(rows)
    texts, text_rows = [], []
    for i, row in enumerate(rows):
        prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
        if isinstance(chosen, list):
            kwargs = _chat_template_kwargs(row)
            out[i] = (
                _ids(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, **kwargs)),
                _ids(tokenizer.apply_chat_template(prompt + chosen, **kwargs)),
                _ids(tokenizer.apply_chat_template(prompt + rejected, **kwargs)),
            )
        else:
            texts += [prompt, prompt + chosen, prompt + rejected]
            text_rows.append(i)
    if texts:
        encoded = tokenizer(text=texts, return_attention_mask=False, return_token_type_ids=False)
        ids = [e if type(e) is list else list(map(int, e)) for e in encoded["input_ids"]]
        for j, i in enumerate(text_rows):
            out[i] = tuple(ids[3 * j : 3 * j + 3])
    return out


def split_prompt(
    p: list[int], pc: list[int], pr: list[int], *, source: str, index: int
) -> tuple[dict[str, list[int]], int]:
    """The ids of one row split at the prompt (:func:`tokenize_row`'s rule), and how many prompt
    tokens merged into the completion. Raises DataError for a completion with no token."""
    n = min(common_prefix_length(p, pc), common_prefix_length(p, pr))
    out = {"prompt_ids": p[:n], "chosen_ids": pc[n:], "rejected_ids": pr[n:]}
    for key in ("chosen_ids", "rejected_ids"):
        if not out[key]:
            raise DataError(
                "tokenizes to no completion tokens",
                source=source,
                index=index,
                field=key.removesuffix("_ids"),
                reason=EMPTY_COMPLETION,
            )
    return out, len(p) - n


def _chat_template_kwargs(row: Mapping[str, Any]) -> dict[str, Any]:
    """trl's ``apply_chat_template`` arguments for a row (dpo:1077-1079): tools (JSON text or a
    list) and the row's own ``chat_template_kwargs``."""
    tools = row.get("tools")
    tools = json.loads(tools) if isinstance(tools, str) else tools
    return {
        "tokenize": True,
        "return_dict": True,
        "tools": tools,
        **(row.get("chat_template_kwargs") or {}),
    }


def _ids(encoding: Mapping[str, Any]) -> list[int]:
    """The flat ``input_ids`` list of one encoded text or conversation."""
    return [int(t) for t in encoding["input_ids"]]


@dataclass
class TokenizedRows:
    """The result of :func:`tokenize_rows`: the kept rows and an account of the dropped ones.

    Attributes:
        rows: kept rows, in input order; each ``{"prompt_ids", "chosen_ids", "rejected_ids",
            "index"}`` plus ``ref_chosen_logps``/``ref_rejected_logps`` when the input had them.
            ``index`` is the row's position in the input.
        num_input: rows read.
        dropped: reason -> input indices of the rows left out. ``prompt_fills_max_length`` is trl's
            own filter; the other reasons are ``DataError.reason`` codes of invalid rows skipped
            under ``skip_invalid=True``.
        num_boundary_merges: kept rows whose tokenized prompt is not a prefix of prompt+completion
            (tokens merged across the boundary; trl warns once about this).
    """

    rows: list[dict[str, Any]]
    num_input: int
    dropped: dict[str, list[int]] = field(default_factory=dict)
    num_boundary_merges: int = 0

    @property
    def counts(self) -> dict[str, int]:
        """Number of rows dropped, per reason."""
        return {reason: len(indices) for reason, indices in self.dropped.items()}

    def summary(self, source: str = "<rows>") -> str:
        """One line: rows read, kept, and dropped per reason."""
        line = f"{source}: {self.num_input} rows read, {len(self.rows)} kept"
        if self.dropped:
            line += "; dropped " + ", ".join(f"{n} {reason}" for reason, n in self.counts.items())
        return line


def tokenize_rows(
    rows: Iterable[Mapping[str, Any]],
    tokenizer: Any,
    *,
    max_length: int | None = 1024,
    truncation_mode: str = "keep_start",
    source: str = "<rows>",
    skip_invalid: bool = False,
) -> TokenizedRows:
    """Tokenize every row as trl does and drop the rows trl drops, saying how many and why.

    A row is dropped when ``truncation_mode == "keep_start"`` and ``len(prompt_ids) >= max_length``:
    keep-start truncation would leave it no completion token (dpo:1137-1140). Under ``keep_end``
    nothing is dropped; the collator truncates. The summary is logged (WARNING when rows were
    dropped, INFO otherwise).

    Args:
        rows: rows of any shape ``rows.detect_format`` knows.
        tokenizer: a transformers tokenizer.
        max_length: the longest prompt + completion, or None for no limit.
        truncation_mode: ``"keep_start"`` or ``"keep_end"``.
        source: where the rows came from, for messages.
        skip_invalid: skip invalid rows (counted per reason in ``dropped``) instead of raising.

    Raises:
        DataError: for the first invalid row, unless ``skip_invalid``.
    """
    check_truncation_mode(truncation_mode)
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length must be a positive integer or None, got {max_length}")
    result = TokenizedRows(rows=[], num_input=0)
    first_error: dict[str, str] = {}
    for index, row in enumerate(rows):
        result.num_input += 1
        try:
            ids, merged = tokenize_with_merges(row, tokenizer, source=source, index=index)
        except DataError as e:
            if not skip_invalid:
                raise
            result.dropped.setdefault(e.reason, []).append(index)
            first_error.setdefault(e.reason, str(e))
            continue
        if prompt_fills_max_length(ids["prompt_ids"], max_length, truncation_mode):
            result.dropped.setdefault(PROMPT_FILLS_MAX_LENGTH, []).append(index)
            continue
        result.num_boundary_merges += merged > 0
        ids.update({key: row[key] for key in _PASSTHROUGH if key in row})
        result.rows.append({**ids, "index": index})
    _log_summary(result, source, max_length, first_error)
    return result


def prompt_fills_max_length(
    prompt_ids: list[int], max_length: int | None, truncation_mode: str
) -> bool:
    """trl's filter (dpo:1137-1140): under ``keep_start``, a prompt of ``max_length`` tokens or
    more leaves no completion token after truncation, so the row is dropped."""
    return (
        truncation_mode == "keep_start" and max_length is not None and len(prompt_ids) >= max_length
    )


def _log_summary(
    result: TokenizedRows, source: str, max_length: int | None, first_error: dict[str, str]
) -> None:
    """Log what :func:`tokenize_rows` kept and dropped, with the first error of each reason."""
    if result.num_boundary_merges:
        logger.info(
            "%s: in %d rows the prompt's last tokens merged with the completion's first; the "
            "completion starts at the merged token (as in trl)",
            source,
            result.num_boundary_merges,
        )
    if not result.dropped:
        logger.info(result.summary(source))
        return
    lines = [result.summary(source)]
    if PROMPT_FILLS_MAX_LENGTH in result.dropped:
        lines.append(f"  {PROMPT_FILLS_MAX_LENGTH}: the prompt alone has >= {max_length} tokens")
    lines += [f"  {reason}: e.g. {message}" for reason, message in first_error.items()]
    logger.warning("\n".join(lines))
