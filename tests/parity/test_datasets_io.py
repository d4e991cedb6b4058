"""Preference files in every supported format read to the same rows; bad rows are named."""

from __future__ import annotations

import csv
import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from parity.datasets_io import generate_rows, load_preference_rows, validate_rows, write_jsonl


def write_all_formats(rows: list[dict], directory) -> list:
    """The same rows as .jsonl, .jsonl.gz, .json (list), .json (columns), .parquet and .csv."""
    paths = [
        directory / n for n in ("a.jsonl", "a.jsonl.gz", "list.json", "cols.json", "a.parquet")
    ]
    write_jsonl(rows, paths[0])
    with gzip.open(paths[1], "wt", encoding="utf-8") as f:
        f.write(paths[0].read_text())
    paths[2].write_text(json.dumps(rows))
    paths[3].write_text(json.dumps({k: [r[k] for r in rows] for k in rows[0]}))
    pq.write_table(pa.Table.from_pylist(rows), paths[4])
    if isinstance(rows[0]["chosen"], str):
        paths.append(directory / "a.csv")
        with open(paths[-1], "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return paths


@pytest.mark.parametrize("shape", ["explicit", "implicit", "conversational"])
def test_every_format_reads_back_the_same_rows(shape, tmp_path):
    rows = generate_rows(shape, 5, seed=0)
    for path in write_all_formats(rows, tmp_path):
        assert load_preference_rows(path) == rows, path.name


def test_shapes_are_detected():
    assert validate_rows(generate_rows("explicit", 2, 0), "x") == "explicit"
    assert validate_rows(generate_rows("implicit", 2, 0), "x") == "implicit"
    assert validate_rows(generate_rows("conversational", 2, 0), "x") == "conversational-explicit"
    assert validate_rows(generate_rows("hh-rlhf", 2, 0), "x") == "implicit"


def test_generated_rows_are_deterministic_in_the_seed():
    assert generate_rows("explicit", 4, 1) == generate_rows("explicit", 4, 1)
    assert generate_rows("explicit", 4, 1) != generate_rows("explicit", 4, 2)


def test_path_with_glob_characters_is_read_literally(tmp_path):
    directory = tmp_path / "case-loss_weights=[1.0,0.5]"
    directory.mkdir()
    write_jsonl(generate_rows("explicit", 2, 0), directory / "data.jsonl")
    assert len(load_preference_rows(directory / "data.jsonl")) == 2


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "p", "chosen": "c"}, "row 1: missing field 'rejected'"),
        ({"prompt": "p", "chosen": 3, "rejected": "r"}, "row 1, field 'chosen': expected a string"),
        ({"prompt": None, "chosen": "c", "rejected": "r"}, "row 1: missing field 'prompt'"),
    ],
)
def test_bad_rows_are_named(row, message, tmp_path):
    path = tmp_path / "bad.jsonl"
    write_jsonl([{"prompt": "p", "chosen": "c", "rejected": "r"}, row], path)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")) as err:
        load_preference_rows(path)
    assert str(path) in str(err.value)


def test_bad_messages_and_files_are_named(tmp_path):
    row = {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant"}]}
    row["rejected"] = [{"role": "assistant", "content": "r"}]
    with pytest.raises(ValueError, match="row 0, field 'chosen', message 0"):
        validate_rows([row], "src")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"chosen": "a", "rejected": "b"}\n{oops\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        load_preference_rows(bad)
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(ValueError, match="unsupported file type"):
        load_preference_rows(tmp_path / "x.txt")
    with pytest.raises(FileNotFoundError):
        load_preference_rows(tmp_path / "missing.jsonl")
