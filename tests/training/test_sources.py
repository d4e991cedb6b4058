"""Preference files in every supported format read to the same rows; bad files are named."""

from __future__ import annotations

import csv
import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dpo_core.rows import BAD_JSON, DataError, write_jsonl
from training.inputs.sources import load_rows

EXPLICIT = [{"prompt": "Why?", "chosen": " Because.", "rejected": " 42"}] * 2 + [
    {"prompt": "ü", "chosen": " a b", "rejected": " c"}
]
IMPLICIT = [{"chosen": "Q: why? Because.", "rejected": "Q: why? No."}] * 3
MESSAGES = [
    {
        "prompt": [{"role": "user", "content": f"q{i}"}],
        "chosen": [{"role": "assistant", "content": "yes"}],
        "rejected": [{"role": "assistant", "content": "no"}],
    }
    for i in range(3)
]


def write_all_formats(rows: list[dict], directory) -> list:
    """The same rows as .jsonl, .jsonl.gz, .json (list, columns, lines, gzipped), .parquet and
    .csv (text rows only)."""
    names = ("a.jsonl", "a.jsonl.gz", "list.json", "cols.json", "lines.json", "a.json.gz")
    paths = [directory / n for n in (*names, "a.parquet")]
    write_jsonl(rows, paths[0])
    write_jsonl(rows, paths[1])
    paths[2].write_text(json.dumps(rows))
    paths[3].write_text(json.dumps({k: [r[k] for r in rows] for k in rows[0]}))
    paths[4].write_text(paths[0].read_text())
    with gzip.open(paths[5], "wt", encoding="utf-8") as f:
        f.write(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), paths[6])
    if isinstance(rows[0]["chosen"], str):
        paths.append(directory / "a.csv")
        with open(paths[-1], "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return paths


@pytest.mark.parametrize(
    "rows", [EXPLICIT, IMPLICIT, MESSAGES], ids=["explicit", "implicit", "msg"]
)
def test_every_format_reads_back_the_same_rows(rows, tmp_path):
    for path in write_all_formats(rows, tmp_path):
        assert load_rows(path) == rows, path.name
        assert load_rows(str(path)) == rows, path.name


def test_path_with_glob_characters_is_read_literally(tmp_path):
    directory = tmp_path / "case-loss_weights=[1.0,0.5]"
    directory.mkdir()
    for path in write_all_formats(EXPLICIT, directory):
        assert len(load_rows(path)) == 3, path.name


def test_bad_files_are_named(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"chosen": "a", "rejected": "b"}\n{oops\n')
    with pytest.raises(DataError, match=r"bad.json, line 2: malformed JSON") as err:
        load_rows(bad)
    assert err.value.reason == BAD_JSON
    (tmp_path / "cols.json").write_text(json.dumps({"chosen": ["a", "b"], "rejected": ["c"]}))
    with pytest.raises(ValueError, match="cols.json: columns of different lengths"):
        load_rows(tmp_path / "cols.json")
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(ValueError, match="x.txt: unsupported file type '.txt'"):
        load_rows(tmp_path / "x.txt")
    with pytest.raises(FileNotFoundError, match="missing.parquet"):
        load_rows(tmp_path / "missing.parquet")
