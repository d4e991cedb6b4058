"""Parity's data: generated rows of each shape, and files checked to hold valid rows of one shape.

Reading every file format, and the errors for a missing or unsupported file, are tested in
``tests/training/test_sources.py``.
"""

from __future__ import annotations

import pytest

from dpo_core.rows import DataError, validate_rows, write_jsonl
from parity.sides.datasets_io import generate_rows, load_preference_rows


@pytest.mark.parametrize("shape", ["explicit", "implicit", "conversational"])
def test_generated_rows_read_back_from_a_file(shape, tmp_path):
    rows = generate_rows(shape, 5, seed=0)
    write_jsonl(rows, tmp_path / "a.jsonl")
    assert load_preference_rows(tmp_path / "a.jsonl") == rows


def test_shapes_are_detected():
    assert validate_rows(generate_rows("explicit", 2, 0), source="x") == "explicit"
    assert validate_rows(generate_rows("implicit", 2, 0), source="x") == "implicit"
    assert validate_rows(generate_rows("conversational", 2, 0), source="x") == "conversational"
    assert validate_rows(generate_rows("hh-rlhf", 2, 0), source="x") == "implicit"


def test_generated_rows_are_deterministic_in_the_seed():
    assert generate_rows("explicit", 4, 1) == generate_rows("explicit", 4, 1)
    assert generate_rows("explicit", 4, 1) != generate_rows("explicit", 4, 2)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "p", "chosen": "c"}, "line 2, field 'rejected': missing"),
        (
            {"prompt": "p", "chosen": 3, "rejected": "r"},
            "line 2, field 'chosen': expected a string",
        ),
        (
            {"prompt": None, "chosen": "c", "rejected": "r"},
            "line 2, field 'prompt': expected a str",
        ),
        ({"chosen": "pc", "rejected": "pr"}, "line 2, field 'prompt': this row is implicit"),
    ],
)
def test_bad_rows_are_named(row, message, tmp_path):
    path = tmp_path / "bad.jsonl"
    write_jsonl([{"prompt": "p", "chosen": "c", "rejected": "r"}, row], path)
    with pytest.raises(DataError, match=message) as err:
        load_preference_rows(path)
    assert str(err.value).startswith(f"{path}, line 2, ")  # the file's own line, not an index


def test_bad_messages_and_files_are_named(tmp_path):
    row = {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant"}]}
    row["rejected"] = [{"role": "assistant", "content": "r"}]
    with pytest.raises(DataError, match="^src, row 0, field 'chosen': message 0"):
        validate_rows([row], source="src")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"chosen": "a", "rejected": "b"}\n{oops\n')
    with pytest.raises(DataError, match="bad.jsonl, line 2: malformed JSON"):
        load_preference_rows(bad)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="empty.jsonl: no rows"):
        load_preference_rows(tmp_path / "empty.jsonl")
