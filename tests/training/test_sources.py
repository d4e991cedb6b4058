"""Preference files in every supported format read to the same rows; bad files are named."""

from __future__ import annotations

import csv
import gzip
import io
import json
import tracemalloc

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dpo_core.rows import BAD_JSON, DataError, Place, write_jsonl
from training.inputs import json_document
from training.inputs.raw_sources import LINE, ROW, ROW_JSON, open_raw
from training.inputs.sources import consume_file, load_rows, read_source

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


# --- streaming: rows in the memory of one row, the same rows, places and errors ---------------


def big_rows(n: int) -> list[dict]:
    return [{"prompt": f"q{i}", "chosen": " yes" * 30, "rejected": " no" * 30} for i in range(n)]


@pytest.mark.parametrize("name", ["big.json", "big.json.gz", "big.csv", "big.csv.gz"])
def test_a_large_file_is_read_in_bounded_memory(tmp_path, monkeypatch, name):
    monkeypatch.setattr(json_document, "CHUNK_BYTES", 1 << 16)
    rows = big_rows(20_000)
    path = tmp_path / name
    opener = gzip.open if name.endswith(".gz") else open
    with opener(path, "wt", newline="", encoding="utf-8") as f:
        if ".csv" in name:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        else:
            json.dump(rows, f)
    text_bytes = sum(len(json.dumps(r)) for r in rows)  # about 6 MB of rows
    seen = []

    def count(entries):
        for row, place in entries:
            if place.row in (1, len(rows)):
                seen.append((row, place.row))
        return place.row

    tracemalloc.start()
    try:
        (last, skipped) = consume_file(path, count)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (last, skipped) == (len(rows), [])
    assert seen == [(rows[0], 1), (rows[-1], len(rows))]
    # a whole read holds the text and every row (several times text_bytes); a stream holds a
    # chunk (64 KiB here) and the row being read
    assert peak < text_bytes / 10, (peak, text_bytes)


def test_a_first_line_array_then_more_lines_is_read_again_as_json_lines(tmp_path):
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(EXPLICIT[:2]) + "\n" + json.dumps(EXPLICIT[2]) + "\n")
    runs = []

    def keep(entries):
        runs.append([])
        for row, place in entries:
            runs[-1].append((row, str(place)))
        return runs[-1]

    got, skipped = consume_file(path, keep, skip_invalid=True)
    assert runs[0] == [(EXPLICIT[0], "row 1"), (EXPLICIT[1], "row 2")]  # until it turned out
    assert got == runs[1] == [(EXPLICIT[2], "line 2")]
    assert [str(e) for e in skipped] == [f"{path}, line 1: expected a JSON object, got list"]
    with pytest.raises(DataError, match=r"mixed.json, line 1: expected a JSON object, got list"):
        read_source(path)


@pytest.mark.parametrize("name", ["a.json", "a.json.gz", "lines.json", "a.csv", "a.csv.gz"])
def test_the_arrow_rows_are_the_rows_read_with_their_places(tmp_path, name):
    rows = big_rows(2500)  # more than one Arrow batch
    if ".csv" in name:  # bytes that are not UTF-8 in one record, kept by surrogateescape
        rows[1234] = {**rows[1234], "chosen": "caf\udcff"}
    path = tmp_path / name
    opener = gzip.open if name.endswith(".gz") else open
    with opener(path, "wb") as f:
        if ".csv" in name:
            text = io.StringIO(newline="")
            writer = csv.DictWriter(text, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
            f.write(text.getvalue().encode("utf-8", "surrogateescape"))
        elif name == "lines.json":
            f.write("".join(json.dumps(r) + "\n" for r in rows).encode())
        else:
            f.write(json.dumps(rows).encode())
    read = read_source(path, skip_invalid=True, max_rows=2000)
    raw = open_raw(path, "train", work_dir=tmp_path / "work", skip_invalid=True, max_rows=2000)
    got = raw.dataset.to_list()
    assert [json.loads(r[ROW_JSON]) for r in got] == read.rows
    assert [Place(line=r[LINE], row=r[ROW]) for r in got] == read.places
    assert raw.num_read == read.num_read
    assert [str(e) for e in raw.skipped] == [str(e) for e in read.skipped]
    if ".csv" in name:  # the record of row 1235 (line 1236) skipped, its field named
        assert [str(e) for e in read.skipped] == [
            f"{path}, row 1235 (line 1236), field 'chosen': bytes that are not valid UTF-8"
        ]
        assert read.num_read == 2001
    else:
        assert read.rows == rows[:2000] and read.num_read == 2000
