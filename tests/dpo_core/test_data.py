"""Tests for dpo_core.data: formatting (prompt, EOS), tokenization and trl's length filter.

Token-for-token agreement with trl itself is in test_tokenization_parity.py; these tests pin the
rules on hand-made rows with the offline tokenizer.
"""

from __future__ import annotations

import logging

import pytest

from dpo_core import rows as R
from dpo_core.data import (
    PROMPT_FILLS_MAX_LENGTH,
    TokenizedRows,
    common_prefix_length,
    format_row,
    tokenize_row,
    tokenize_rows,
)

EOS = "</s>"
MSG_U = {"role": "user", "content": "What color is the sky?"}
MSG_A = {"role": "assistant", "content": "It is blue."}
MSG_B = {"role": "assistant", "content": "It is green."}


def ids(tok, text: str) -> list[int]:
    return tok(text=text)["input_ids"]


def chat_ids(tok, messages, gen: bool = False) -> list[int]:
    return tok.apply_chat_template(
        messages, add_generation_prompt=gen, tokenize=True, return_dict=True
    )["input_ids"]


# --- format_row ----------------------------------------------------------------------------------


def test_format_row_appends_eos_once_and_keeps_other_keys():
    row = {"prompt": "Q:", "chosen": " yes", "rejected": f" no{EOS}", "ref_chosen_logps": -1.5}
    out = format_row(row, eos_token=EOS)
    assert out == {
        "prompt": "Q:",
        "chosen": f" yes{EOS}",
        "rejected": f" no{EOS}",
        "ref_chosen_logps": -1.5,
    }
    assert row["chosen"] == " yes"  # the input is not modified
    assert format_row(out, eos_token=EOS) == out  # idempotent


def test_format_row_extracts_an_implicit_prompt_before_adding_eos():
    out = format_row({"chosen": "the sky is blue", "rejected": "the sky is bright"}, eos_token=EOS)
    assert out == {"prompt": "the sky is b", "chosen": f"lue{EOS}", "rejected": f"right{EOS}"}


def test_format_row_conversations_get_no_eos():
    explicit = {"prompt": [MSG_U], "chosen": [MSG_A], "rejected": [MSG_B]}
    assert format_row(explicit, eos_token=EOS) == explicit
    implicit = {"chosen": [MSG_U, MSG_A], "rejected": [MSG_U, MSG_B]}
    assert format_row(implicit, eos_token=EOS) == explicit


def test_format_row_validates_with_source_and_index():
    with pytest.raises(R.DataError, match=r"^hh, row 4, field 'rejected': "):
        format_row({"chosen": "x"}, eos_token=EOS, source="hh", index=4)


def test_format_row_needs_an_eos_token_for_text():
    with pytest.raises(ValueError, match="eos_token"):
        format_row({"prompt": "p", "chosen": "a", "rejected": "b"}, eos_token=None)


# --- tokenize_row --------------------------------------------------------------------------------


def test_common_prefix_length():
    assert common_prefix_length([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix_length([1, 2], [1, 2, 3]) == 2
    assert common_prefix_length([], [1]) == 0
    assert common_prefix_length([7], [1]) == 0


def test_tokenize_row_text_without_merge(tiny_tokenizer):
    """A completion starting with a space does not merge with the prompt (byte-level BPE splits
    words before spaces), so prompt_ids is all of tok(prompt): BOS first, EOS last in each
    completion."""
    tok = tiny_tokenizer
    row = {"prompt": "Human: Hi\n\nAssistant:", "chosen": " Hello there", "rejected": " Go away"}
    out = tokenize_row(row, tok)
    assert out["prompt_ids"] == ids(tok, row["prompt"])
    assert out["prompt_ids"][0] == tok.bos_token_id
    assert out["prompt_ids"] + out["chosen_ids"] == ids(tok, row["prompt"] + row["chosen"] + EOS)
    assert out["prompt_ids"] + out["rejected_ids"] == ids(
        tok, row["prompt"] + row["rejected"] + EOS
    )
    assert out["chosen_ids"][-1] == out["rejected_ids"][-1] == tok.eos_token_id


def test_tokenize_row_merge_moves_the_split_back(tiny_tokenizer):
    """ "Human" is one token of the trained vocabulary, so the prompt "Hu" + completion "man"
    tokenizes jointly as [BOS, "Human", ...]: the prompt keeps only BOS, the completion starts at
    the merged token."""
    tok = tiny_tokenizer
    human = ids(tok, "Human")
    assert len(human) == 2  # [BOS, "Human"]: the merge this test relies on
    out = tokenize_row({"prompt": "Hu", "chosen": "man", "rejected": "go"}, tok)
    assert len(ids(tok, "Hu")) > 2
    assert out["prompt_ids"] == [tok.bos_token_id]
    assert out["chosen_ids"] == ids(tok, "Human" + EOS)[1:]
    assert out["rejected_ids"] == ids(tok, "Hugo" + EOS)[1:]


def test_tokenize_row_conversational(tiny_tokenizer):
    """prompt: the template with the generation prompt; completions: the whole conversation,
    without it, cut after the prompt's tokens. The template's EOS ends each completion."""
    tok = tiny_tokenizer
    out = tokenize_row({"prompt": [MSG_U], "chosen": [MSG_A], "rejected": [MSG_B]}, tok)
    prompt = chat_ids(tok, [MSG_U], gen=True)
    assert out["prompt_ids"] == prompt
    assert out["prompt_ids"].count(tok.bos_token_id) == 1
    assert prompt + out["chosen_ids"] == chat_ids(tok, [MSG_U, MSG_A])
    assert prompt + out["rejected_ids"] == chat_ids(tok, [MSG_U, MSG_B])
    assert tok.eos_token_id in out["chosen_ids"]
    implicit = tokenize_row({"chosen": [MSG_U, MSG_A], "rejected": [MSG_U, MSG_B]}, tok)
    assert implicit == out


def test_tokenize_row_passes_chat_template_kwargs(tiny_tokenizer):
    """A row's ``chat_template_kwargs`` reach the template (trl dpo:1079): a template variable
    set per row changes the ids."""
    tok = tiny_tokenizer
    template = (
        "{{ bos_token }}{{ tag }}{% for m in messages %}{{ m['content'] + eos_token }}{% endfor %}"
    )
    row = {
        "prompt": [MSG_U],
        "chosen": [MSG_A],
        "rejected": [MSG_B],
        "chat_template_kwargs": {"chat_template": template, "tag": "Human:"},
    }
    out = tokenize_row(row, tok)
    assert out["prompt_ids"] + out["chosen_ids"] == ids(
        tok, "Human:" + MSG_U["content"] + EOS + MSG_A["content"] + EOS
    )


def test_tokenize_row_error_names_row(tiny_tokenizer):
    with pytest.raises(R.DataError, match=r"^f.jsonl, row 9, field 'chosen': is empty"):
        tokenize_row(
            {"prompt": "p", "chosen": "", "rejected": "b"},
            tiny_tokenizer,
            source="f.jsonl",
            index=9,
        )


# --- tokenize_rows -------------------------------------------------------------------------------


def rows_with_prompt_lengths(tok, lengths: list[int]) -> list[dict]:
    """Explicit rows whose tokenized prompt has exactly each of ``lengths`` tokens (BOS + n-1
    single-character tokens "\\n", which byte-level BPE does not merge with the words around it
    in this vocabulary; checked below)."""
    rows = []
    for n in lengths:
        prompt = "Q" + "\n" * (n - 2)
        assert len(ids(tok, prompt)) == n
        rows.append({"prompt": prompt, "chosen": " yes", "rejected": " no"})
    return rows


def test_tokenize_rows_drops_prompts_that_fill_max_length(tiny_tokenizer, caplog):
    """max_length 8: prompts of 7 tokens stay, of 8 and 9 tokens go (trl keeps len < max_length)."""
    tok = tiny_tokenizer
    rows = rows_with_prompt_lengths(tok, [7, 8, 3, 9])
    with caplog.at_level(logging.INFO, logger="dpo_core.data"):
        out = tokenize_rows(rows, tok, max_length=8, source="synthetic")
    assert [r["index"] for r in out.rows] == [0, 2]
    assert out.dropped == {PROMPT_FILLS_MAX_LENGTH: [1, 3]}
    assert out.counts == {PROMPT_FILLS_MAX_LENGTH: 2}
    assert out.num_input == 4
    assert [r["prompt_ids"] for r in out.rows] == [
        ids(tok, rows[0]["prompt"]),
        ids(tok, rows[2]["prompt"]),
    ]
    assert "synthetic: 4 rows read, 2 kept; dropped 2 prompt_fills_max_length" in caplog.text
    assert any(r.levelno == logging.WARNING for r in caplog.records)


def test_tokenize_rows_keep_end_and_no_limit_drop_nothing(tiny_tokenizer):
    rows = rows_with_prompt_lengths(tiny_tokenizer, [7, 8, 9])
    for kwargs in ({"max_length": 8, "truncation_mode": "keep_end"}, {"max_length": None}):
        out = tokenize_rows(rows, tiny_tokenizer, **kwargs)
        assert [r["index"] for r in out.rows] == [0, 1, 2] and out.dropped == {}


def test_tokenize_rows_passes_precomputed_reference_logps(tiny_tokenizer):
    rows = [
        {
            "prompt": "p",
            "chosen": " a",
            "rejected": " b",
            "ref_chosen_logps": -3.25,
            "ref_rejected_logps": -4.5,
        }
    ]
    (out,) = tokenize_rows(rows, tiny_tokenizer).rows
    assert (out["ref_chosen_logps"], out["ref_rejected_logps"], out["index"]) == (-3.25, -4.5, 0)


def test_tokenize_rows_raises_on_the_first_invalid_row(tiny_tokenizer):
    rows = [
        {"prompt": "p", "chosen": " a", "rejected": " b"},
        {"prompt": "p", "chosen": " a", "rejected": " a"},
    ]
    with pytest.raises(R.DataError, match=r"^train.jsonl, row 1, field 'rejected': is identical"):
        tokenize_rows(rows, tiny_tokenizer, source="train.jsonl")


def test_tokenize_rows_skip_invalid_counts_every_reason(tiny_tokenizer, caplog):
    good = {"prompt": "p", "chosen": " a", "rejected": " b"}
    rows = [
        good,
        {"prompt": "p", "chosen": " a"},  # 1 missing_field
        {"prompt": "p", "chosen": " a", "rejected": 3},  # 2 wrong_type
        good,
        {"prompt": "p", "chosen": "", "rejected": " b"},  # 4 empty_completion
        {"prompt": "p", "chosen": " a", "rejected": " a"},  # 5 identical_completions
        {"chosen": "red", "rejected": "blue"},  # 6 empty_prompt
        {"prompt": "p", "chosen": " b", "rejected": " c"},
        {"prompt": "p", "rejected": " c"},  # 8 missing_field
        rows_with_prompt_lengths(tiny_tokenizer, [5])[0],  # 9 prompt fills max_length
    ]
    with caplog.at_level(logging.WARNING, logger="dpo_core.data"):
        out = tokenize_rows(rows, tiny_tokenizer, max_length=5, source="mixed", skip_invalid=True)
    assert [r["index"] for r in out.rows] == [0, 3, 7]
    assert out.dropped == {
        R.MISSING_FIELD: [1, 8],
        R.WRONG_TYPE: [2],
        R.EMPTY_COMPLETION: [4],
        R.IDENTICAL_COMPLETIONS: [5],
        R.EMPTY_PROMPT: [6],
        PROMPT_FILLS_MAX_LENGTH: [9],
    }
    assert sum(out.counts.values()) + len(out.rows) == out.num_input == len(rows)
    assert (
        "mixed, row 1, field 'rejected'" in caplog.text
    )  # the first error of each reason is shown
    assert "mixed, row 6, field 'prompt'" in caplog.text
    assert "dropped 2 missing_field" in caplog.text


def test_tokenize_rows_rejects_bad_settings(tiny_tokenizer):
    with pytest.raises(ValueError, match="truncation_mode"):
        tokenize_rows([], tiny_tokenizer, truncation_mode="keep_middle")
    with pytest.raises(ValueError, match="max_length"):
        tokenize_rows([], tiny_tokenizer, max_length=0)


def test_tokenized_rows_summary():
    out = TokenizedRows(rows=[{}], num_input=3, dropped={"a": [0], "b": [2]})
    assert out.summary("src") == "src: 3 rows read, 1 kept; dropped 1 a, 1 b"


def test_tokenize_rows_counts_boundary_merges_on_real_rows(tiny_tokenizer, hh_rows):
    """hh-rlhf pairs often diverge inside a word ("Assistant: O" + "h" / "K"), so some prompts lose
    their last token to the completion; every row still reassembles to tok(prompt + completion)."""
    tok = tiny_tokenizer
    out = tokenize_rows(hh_rows[:60], tok, max_length=None)
    assert out.num_boundary_merges > 0
    for r in out.rows:
        f = format_row(hh_rows[r["index"]], eos_token=EOS)
        assert r["prompt_ids"] + r["chosen_ids"] == ids(tok, f["prompt"] + f["chosen"])
        assert r["prompt_ids"] + r["rejected_ids"] == ids(tok, f["prompt"] + f["rejected"])
