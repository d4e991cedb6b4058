"""Tests for dpo_core.rows: JSONL in and out, row shapes, trl's prompt split, located errors."""

from __future__ import annotations

import gzip
import json

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from dpo_core import rows as R
from dpo_core.rows import (
    DataError,
    detect_format,
    extract_prompt,
    read_jsonl,
    validate_row,
    validate_rows,
    write_jsonl,
)
from tests.conftest import HH_RLHF_FILE, load_hh_rows

MSG_U = {"role": "user", "content": "Hi?"}
MSG_A = {"role": "assistant", "content": "Hello."}
MSG_B = {"role": "assistant", "content": "Go away."}


# --- read_jsonl --------------------------------------------------------------------------------


def write(path, data: bytes, gz: bool = False):
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(data)
    return path


def test_read_jsonl_plain_and_gz_blank_lines_and_bom(tmp_path):
    lines = [{"chosen": "a", "rejected": "b"}, {"chosen": "ü", "rejected": "é"}]
    text = (
        "\ufeff"
        + json.dumps(lines[0])
        + "\n\n   \n"
        + json.dumps(lines[1], ensure_ascii=False)
        + "\n"
    )
    plain = write(tmp_path / "x.jsonl", text.encode("utf-8"))
    packed = write(tmp_path / "x.jsonl.gz", text.encode("utf-8"), gz=True)
    assert read_jsonl(plain) == lines
    assert read_jsonl(packed) == lines


@pytest.mark.parametrize("name", ["x.jsonl", "x.jsonl.gz"])
def test_write_jsonl_reads_back(tmp_path, name):
    rows = [{"prompt": "ü", "chosen": " a", "rejected": " b"}, {"chosen": [MSG_U, MSG_A]}]
    write_jsonl(iter(rows), tmp_path / name)
    assert read_jsonl(tmp_path / name) == rows


def test_read_jsonl_reads_the_real_gz_file():
    rows = read_jsonl(HH_RLHF_FILE)
    assert rows[:5] == load_hh_rows(5)
    assert all(detect_format(r) == R.IMPLICIT for r in rows)


@pytest.mark.parametrize(
    ("data", "reason", "needle"),
    [
        (b'{"chosen": "a", "rejected": "b"}\n{"chosen": "\xff\xfe"}\n', R.NOT_UTF8, "b'\\xff'"),
        # '}' is character 16 of the line, where JSON expects a property name after the comma
        (b'{"chosen": "a", "rejected": "b"}\n{"chosen": "a",}\n', R.BAD_JSON, "column 16"),
        (b'{"chosen": "a", "rejected": "b"}\n["a", "b"]\n', R.NOT_OBJECT, "got list"),
    ],
)
@pytest.mark.parametrize("gz", [False, True])
def test_read_jsonl_names_file_and_line(tmp_path, data, reason, needle, gz):
    path = write(tmp_path / ("bad.jsonl.gz" if gz else "bad.jsonl"), data, gz=gz)
    with pytest.raises(DataError) as e:
        read_jsonl(path)
    assert e.value.reason == reason and e.value.line == 2
    assert str(e.value).startswith(f"{path}, line 2: ")
    assert needle in str(e.value)


def test_read_jsonl_corrupt_gzip(tmp_path):
    path = write(tmp_path / "bad.jsonl.gz", b"this is not gzip")
    with pytest.raises(DataError, match="bad.jsonl.gz") as e:
        read_jsonl(path)
    assert e.value.reason == R.BAD_GZIP


# --- shapes --------------------------------------------------------------------------------------


def test_detect_format_four_shapes():
    assert detect_format({"prompt": "p", "chosen": "a", "rejected": "b"}) == R.EXPLICIT
    assert detect_format({"chosen": "p a", "rejected": "p b"}) == R.IMPLICIT
    assert (
        detect_format({"prompt": [MSG_U], "chosen": [MSG_A], "rejected": [MSG_B]})
        == R.CONVERSATIONAL
    )
    assert (
        detect_format({"chosen": [MSG_U, MSG_A], "rejected": [MSG_U, MSG_B]})
        == R.CONVERSATIONAL_IMPLICIT
    )


# --- trl's prompt split ------------------------------------------------------------------------


def test_extract_prompt_hand_examples():
    """Worked by hand from trl's loop (du:622-627):

    - "the sky is blue"/"the sky is bright": first difference at index 12 ('l' vs 'r'); the
      character before is 'b', not a space -> split 12.
    - "Hi there you"/"Hi there me": difference at 9 ('y' vs 'm'); index 8 is a space -> split 8,
      so the completions keep their leading space.
    - "abc"/"abcdef": no difference in the first 3; the loop ends with idx = 2 -> split 2.
    - messages: the first message is shared, the second differs -> split 1.
    """
    assert extract_prompt("the sky is blue", "the sky is bright") == (
        "the sky is b",
        "lue",
        "right",
    )
    assert extract_prompt("Hi there you", "Hi there me") == ("Hi there", " you", " me")
    assert extract_prompt("abc", "abcdef") == ("ab", "c", "cdef")
    assert extract_prompt([MSG_U, MSG_A], [MSG_U, MSG_B]) == ([MSG_U], [MSG_A], [MSG_B])
    assert extract_prompt([MSG_U, MSG_A], [MSG_U, MSG_A, MSG_U, MSG_B]) == (
        [MSG_U],
        [MSG_A],
        [MSG_A, MSG_U, MSG_B],
    )


# Short texts over a small alphabet with spaces, so shared prefixes, spaces before the split and
# one-is-a-prefix-of-the-other cases all occur often.
texts = st.text(alphabet="ab ", min_size=1, max_size=8)


@settings(max_examples=400, deadline=None)
@given(prefix=st.text(alphabet="ab ", max_size=40), a=texts, b=texts)
def test_common_prefix_bisection_equals_the_element_loop(prefix, a, b):
    """Strings are bisected on slices; the answer is the first index where they differ."""
    a, b = prefix + a, prefix + b
    n = min(len(a), len(b))
    expected = next((i for i in range(n) if a[i] != b[i]), n)
    assert R.common_prefix(a, b) == expected == R.common_prefix(list(a), list(b))


@settings(max_examples=400, deadline=None)
@given(prefix=texts, chosen=texts, rejected=texts)
def test_extract_prompt_matches_trl_on_every_valid_row(prefix, chosen, rejected):
    """On every row validate_row accepts, the split equals trl.extract_prompt's."""
    from trl.data_utils import extract_prompt as trl_extract

    row = {"chosen": prefix + chosen, "rejected": prefix + rejected}
    try:
        validate_row(row, source="hyp", index=0)
    except DataError as e:
        # Both texts are non-empty, so the only refusals are pairs without a preference or
        # without a shared prompt; assume() discards them (a bare return would count as a pass).
        assert e.reason in (R.IDENTICAL_COMPLETIONS, R.EMPTY_PROMPT), e
        assume(False)
    want = trl_extract(row)
    assert extract_prompt(row["chosen"], row["rejected"]) == (
        want["prompt"],
        want["chosen"],
        want["rejected"],
    )


def test_trl_wraps_around_when_the_first_characters_differ():
    """trl's ``chosen[idx - 1]`` at idx 0 reads the *last* character: when that is a space, trl
    returns ``chosen[:-1]`` as the prompt. We reject such a row (no shared prefix) instead."""
    from trl.data_utils import extract_prompt as trl_extract

    row = {"chosen": "yes ", "rejected": "no "}
    assert trl_extract(row) == {"prompt": "yes", "chosen": " ", "rejected": " "}
    with pytest.raises(DataError, match="implicit prompt") as e:
        validate_row(row, source="s", index=0)
    assert e.value.reason == R.EMPTY_PROMPT


# --- validate_row: every error names source, row and field -------------------------------------


BAD_ROWS = [
    # (row, field, reason, words in the message)
    ({"rejected": "b"}, "chosen", R.MISSING_FIELD, "missing"),
    ({"chosen": "a"}, "rejected", R.MISSING_FIELD, "missing"),
    ({"chosen": 3, "rejected": "b"}, "chosen", R.WRONG_TYPE, "got int"),
    ({"chosen": None, "rejected": "b"}, "chosen", R.WRONG_TYPE, "got NoneType"),
    ({"prompt": "p", "chosen": "a", "rejected": 1.5}, "rejected", R.WRONG_TYPE, "got float"),
    ({"prompt": None, "chosen": "a", "rejected": "b"}, "prompt", R.WRONG_TYPE, "got NoneType"),
    (
        {"prompt": "p", "chosen": [MSG_A], "rejected": [MSG_B]},
        "prompt",
        R.WRONG_TYPE,
        "list of messages",
    ),
    ({"prompt": [MSG_U], "chosen": [MSG_A], "rejected": "b"}, "rejected", R.WRONG_TYPE, "got str"),
    (
        {"prompt": [MSG_U], "chosen": ["hi"], "rejected": [MSG_B]},
        "chosen",
        R.WRONG_TYPE,
        "message 0 is a str",
    ),
    (
        {"prompt": [MSG_U], "chosen": [MSG_A, {"role": "user"}], "rejected": [MSG_B]},
        "chosen",
        R.WRONG_TYPE,
        "message 1: expected a string 'content', got nothing",
    ),
    (
        {"prompt": [{"role": 1, "content": "x"}], "chosen": [MSG_A], "rejected": [MSG_B]},
        "prompt",
        R.WRONG_TYPE,
        "'role', got int",
    ),
    ({"prompt": "p", "chosen": "", "rejected": "b"}, "chosen", R.EMPTY_COMPLETION, "empty"),
    (
        {"prompt": [MSG_U], "chosen": [MSG_A], "rejected": []},
        "rejected",
        R.EMPTY_COMPLETION,
        "empty",
    ),
    (
        {"prompt": "p", "chosen": "a", "rejected": "a"},
        "rejected",
        R.IDENTICAL_COMPLETIONS,
        "identical",
    ),
    ({"chosen": "same", "rejected": "same"}, "rejected", R.IDENTICAL_COMPLETIONS, "identical"),
    (
        {"prompt": [], "chosen": [MSG_A], "rejected": [MSG_B]},
        "prompt",
        R.EMPTY_PROMPT,
        "empty list",
    ),
    ({"chosen": "blue", "rejected": "red"}, "prompt", R.EMPTY_PROMPT, "shared prefix"),
    ({"chosen": " blue", "rejected": " red"}, "prompt", R.EMPTY_PROMPT, "shared prefix"),
    ({"chosen": "a", "rejected": "ab"}, "prompt", R.EMPTY_PROMPT, "shared prefix"),
    ({"chosen": [MSG_A], "rejected": [MSG_B]}, "prompt", R.EMPTY_PROMPT, "first message"),
]


@pytest.mark.parametrize(("row", "field", "reason", "words"), BAD_ROWS)
def test_validate_row_errors_name_source_row_and_field(row, field, reason, words):
    with pytest.raises(DataError) as e:
        validate_row(row, source="train.jsonl", index=17)
    assert str(e.value).startswith(f"train.jsonl, row 17, field '{field}': ")
    assert words in str(e.value)
    assert (e.value.reason, e.value.index, e.value.field, e.value.source) == (
        reason,
        17,
        field,
        "train.jsonl",
    )


def test_validate_row_rejects_a_non_dict():
    with pytest.raises(DataError, match=r"^src, row 3: expected a dict, got list") as e:
        validate_row(["a", "b"], source="src", index=3)
    assert e.value.reason == R.NOT_OBJECT


@pytest.mark.parametrize(
    "row",
    [
        {
            "prompt": "",
            "chosen": "a",
            "rejected": "b",
        },  # an explicit empty string prompt is allowed
        {"prompt": "p", "chosen": "a", "rejected": "b", "extra": 1},
        {"chosen": "Hi there you", "rejected": "Hi there me"},
        {"prompt": [MSG_U], "chosen": [MSG_A], "rejected": [MSG_B]},
        {"chosen": [MSG_U, MSG_A], "rejected": [MSG_U, MSG_B]},
    ],
)
def test_validate_row_returns_valid_rows_unchanged(row):
    before = json.loads(json.dumps(row))
    assert validate_row(row, source="s", index=0) is row
    assert row == before


# --- a whole set ---------------------------------------------------------------------------------


def test_validate_rows_returns_the_one_shape():
    assert validate_rows([{"chosen": "p a", "rejected": "p b"}] * 2, source="s") == R.IMPLICIT
    conversation = {"prompt": [MSG_U], "chosen": [MSG_A], "rejected": [MSG_B]}
    assert validate_rows([conversation], source="s") == R.CONVERSATIONAL


@pytest.mark.parametrize(
    ("second", "field"),
    [
        ({"chosen": "p a", "rejected": "p b"}, "prompt"),  # implicit after explicit
        ({"prompt": [MSG_U], "chosen": [MSG_A], "rejected": [MSG_B]}, "chosen"),  # messages
    ],
)
def test_validate_rows_rejects_mixed_shapes(second, field):
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}, second]
    with pytest.raises(DataError, match=rf"^f.jsonl, row 1, field '{field}': this row is") as e:
        validate_rows(rows, source="f.jsonl")
    assert e.value.reason == R.MIXED_SHAPES


def test_validate_rows_rejects_no_rows_and_bad_rows():
    with pytest.raises(DataError, match=r"^f.jsonl: no rows"):
        validate_rows([], source="f.jsonl")
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a"}]
    with pytest.raises(DataError, match=r"^f.jsonl, row 1, field 'rejected': missing"):
        validate_rows(rows, source="f.jsonl")
