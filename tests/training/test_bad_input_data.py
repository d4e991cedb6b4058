"""A catalogue of bad input data (issue 12, "Reliability"): every case ends in one message that
names the file, the row's own line (JSON lines) or data row (CSV, parquet, a JSON array) and the
field, exits non-zero with no traceback and writes no model; ``--skip-invalid`` skips malformed
lines too, and reports each by its line; counts are the file's.

Runs go through ``training.fit.main`` on the tiny assets (``conftest.py``); a failing run stops
while reading its data, before any model is loaded, and a run that trains does one step.
"""

from __future__ import annotations

import csv
import gzip
import json
import logging
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dpo_core.rows import (
    BAD_GZIP,
    BAD_JSON,
    MISSING_FIELD,
    NOT_OBJECT,
    NOT_UTF8,
    UNKNOWN_ROLE,
    UNREADABLE,
    WRONG_TYPE,
    DataError,
    validate_row,
)
from tests.training.conftest import base_args, fit_subprocess, preference_rows
from training.base.config import DataConfig
from training.fit import main
from training.inputs.data_module import split_heldout
from training.inputs.model_loading import load_tokenizer
from training.inputs.prepared import prepare_source
from training.inputs.prepared_parts import check_prepared
from training.inputs.sources import read_source


def checked_source(path, tiny_assets, tmp_path, *, skip_invalid: bool):
    """``path`` prepared as a run prepares it (Arrow, its own cache) and checked."""
    cfg = DataConfig(dataset_cache_dir=str(tmp_path / "data-cache"), skip_invalid=skip_invalid)
    prepared = prepare_source(path, "train", load_tokenizer(str(tiny_assets.model_dir)), cfg)
    return check_prepared(prepared, skip_invalid=skip_invalid)


NUM_LINES = 40
FRACTION = 0.05  # the default --eval-fraction: 2 of 40 rows held out
MSG = {"role": "user", "content": "Describe the cat."}
ROBOT = {"role": "robot", "content": " It is kind."}


def jsonl_lines(n: int = NUM_LINES) -> list[str]:
    """``n`` lines of valid explicit rows, as text."""
    return [json.dumps(r) for r in preference_rows(n)]


def write_lines(path, lines: list[str | bytes]):
    """One line each (text or raw bytes), newline-terminated."""
    path.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))
    return path


def heldout_lines(n: int, seed: int = 0) -> list[int]:
    """The 1-based lines of an ``n``-line file that the default split holds out (no blank
    lines), from the split itself."""
    _, held = split_heldout(list(range(n)), FRACTION, seed)
    return [i + 1 for i in held]


def fit_fails(tiny_assets, tmp_path, data, capsys, **flags) -> str:
    """Run ``training.fit.main`` on ``data``; assert it fails cleanly; return its error line."""
    out = tmp_path / "out"
    argv = base_args(tiny_assets, out, dataset=data, eval_fraction=FRACTION, **flags)
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert not (out / "model").exists() and not (out / "checkpoints").exists()
    (line,) = [x for x in err.splitlines() if x.startswith("error: ")]
    return line


def fit_trains(tiny_assets, tmp_path, data, caplog, **flags) -> str:
    """Run one training step on ``data``; assert it wrote its model; return the log."""
    out = tmp_path / "out"
    argv = base_args(tiny_assets, out, dataset=data, eval_fraction=FRACTION, max_steps=1, **flags)
    with caplog.at_level(logging.INFO):
        assert main(argv) == 0
    assert (out / "model" / "model.safetensors").exists()
    return caplog.text


# --- row numbers are the file's --------------------------------------------------------------


def test_a_bad_training_row_is_named_by_its_file_line_and_field(tiny_assets, tmp_path, capsys):
    lines = jsonl_lines()
    lines[2] = ""  # a blank line: from line 4 on, row n of the file is on line n + 1
    _, held = split_heldout(list(range(NUM_LINES - 1)), FRACTION, 0)
    bad_line = next(n for n in range(20, NUM_LINES + 1) if n - 2 not in held)  # a training row
    lines[bad_line - 1] = json.dumps({"prompt": "p", "chosen": ["a", "b"], "rejected": " r"})
    data = write_lines(tmp_path / "prefs.jsonl", lines)

    message = fit_fails(tiny_assets, tmp_path, data, capsys)
    assert message == (
        f"error: {data}, line {bad_line}, field 'chosen': message 0 is a str, expected a "
        "{'role', 'content'} dict"
    )


def test_a_bad_held_out_row_is_named_by_its_file_line(tiny_assets, tmp_path, capsys):
    bad_line = heldout_lines(NUM_LINES)[0]
    lines = jsonl_lines()
    lines[bad_line - 1] = json.dumps({"prompt": "p", "chosen": " a"})
    data = write_lines(tmp_path / "prefs.jsonl", lines)

    message = fit_fails(tiny_assets, tmp_path, data, capsys)
    assert message.startswith(f"error: {data}, line {bad_line}, field 'rejected': missing")
    assert "held-out" not in message


def test_rows_read_counts_the_files_rows(tiny_assets, tmp_path, caplog):
    data = write_lines(tmp_path / "prefs.jsonl", jsonl_lines())
    n_held = len(heldout_lines(NUM_LINES))

    log = fit_trains(tiny_assets, tmp_path, data, caplog)
    kept = f"{NUM_LINES - n_held} train, {n_held} held-out"
    assert f"{data}: {NUM_LINES} rows read, {NUM_LINES} kept ({kept})" in log
    assert f"held-out: {n_held} pairs (5% of the {NUM_LINES} rows read" in log


def test_a_chosen_list_of_strings_blames_chosen():
    row = {"prompt": "Describe the cat.", "chosen": [" kind", " warm"], "rejected": " cold"}
    with pytest.raises(DataError) as err:
        validate_row(row, source="prefs.jsonl", index=0)
    assert (err.value.field, err.value.reason) == ("chosen", WRONG_TYPE)


def write_format(path, rows: list[dict]) -> None:
    """``rows`` as a CSV (header + one record a line), parquet or JSON array file."""
    if path.suffix == ".csv":
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=["prompt", "chosen", "rejected"])
            writer.writeheader()
            writer.writerows(rows)
    elif path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text(json.dumps(rows, indent=1))


@pytest.mark.parametrize("name", ["prefs.csv", "prefs.parquet", "prefs.json"])
def test_csv_parquet_and_json_array_rows_are_numbered_from_one(tiny_assets, tmp_path, name):
    rows = preference_rows(12)
    bad_row = 7
    rows[bad_row - 1] = {**rows[bad_row - 1], "chosen": ""}
    path = tmp_path / name
    write_format(path, rows)

    with pytest.raises(DataError) as err:
        checked_source(path, tiny_assets, tmp_path, skip_invalid=False)
    where = f"row {bad_row} (line {bad_row + 1})" if name.endswith(".csv") else f"row {bad_row}"
    assert str(err.value).startswith(f"{path}, {where}, field 'chosen': is empty")
    assert err.value.row == bad_row


# --- unreadable files: one message, the path and the cause --------------------------------------


def test_a_malformed_json_array_ends_in_one_message(tiny_assets, tmp_path):
    rows = [json.dumps(r) for r in preference_rows(6)]
    rows[3] = rows[3].replace('"chosen":', '"chosen"')  # a missing colon, on the file's line 5
    text = "[\n" + ",\n".join(rows) + "\n]\n"
    data = tmp_path / "prefs.json"
    data.write_text(text)
    with pytest.raises(json.JSONDecodeError) as parsed:
        json.loads(text)
    assert parsed.value.lineno == 5
    out = tmp_path / "out"

    done = fit_subprocess(base_args(tiny_assets, out, dataset=data))
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    errors = [x for x in done.stderr.splitlines() if x.startswith("error: ")]
    assert errors == [
        f"error: {data}, line 5: malformed JSON at column {parsed.value.colno}: Expecting ':' "
        "delimiter (read as one JSON document: its first line is not JSON by itself)"
    ]
    assert not (out / "model").exists()


@pytest.mark.parametrize(
    ("name", "content", "reason", "cause"),
    [
        ("prefs.parquet", b"PAR1 not a parquet file", UNREADABLE, "ArrowInvalid"),
        ("prefs.json.gz", b"not gzip", UNREADABLE, "BadGzipFile"),
        ("prefs.jsonl.gz", b"not gzip", BAD_GZIP, "not a readable gzip stream"),
        ("prefs.txt", b"text", UNREADABLE, "unsupported file type '.txt'"),
    ],
)
def test_an_unreadable_file_ends_in_one_message_naming_it(
    tiny_assets, tmp_path, capsys, name, content, reason, cause
):
    data = tmp_path / name
    data.write_bytes(content)
    with pytest.raises(DataError) as err:
        read_source(data)
    assert str(err.value).startswith(f"{data}: ") and cause in str(err.value)
    assert err.value.reason == reason

    message = fit_fails(tiny_assets, tmp_path, data, capsys)
    assert message == f"error: {err.value}"


# --- --skip-invalid -------------------------------------------------------------------------


TRUNCATED = '{"prompt": "p", "chosen": " a", "rejected": '  # a line cut short


def skippable_file(tmp_path):
    """A 40-line JSONL file with a malformed JSON line, a non-UTF-8 line, a line that is not an
    object and a row missing a field; returns it and {line: reason} of the bad lines."""
    lines: list[str | bytes] = list(jsonl_lines())
    bad = {5: BAD_JSON, 12: NOT_UTF8, 17: NOT_OBJECT, 20: MISSING_FIELD}
    lines[4] = TRUNCATED
    lines[11] = b'{"prompt": "caf\xe9", "chosen": " a", "rejected": " b"}'  # Latin-1
    lines[16] = '["p", " a", " b"]'
    lines[19] = json.dumps({"prompt": "p", "chosen": " a"})
    return write_lines(tmp_path / "prefs.jsonl", lines), bad


def test_skip_invalid_skips_malformed_lines_and_reports_each_line(tiny_assets, tmp_path, caplog):
    data, bad = skippable_file(tmp_path)
    n_valid = NUM_LINES - len(bad)
    _, held = split_heldout(list(range(n_valid)), FRACTION, 0)

    log = fit_trains(tiny_assets, tmp_path, data, caplog, skip_invalid=True)
    kept = f"{n_valid - len(held)} train, {len(held)} held-out"
    assert f"{data}: {NUM_LINES} rows read, {n_valid} kept ({kept}); skipped {len(bad)}" in log
    for line, reason in bad.items():
        assert f"  skipped {data}, line {line}" in log, reason
    assert f"  skipped {data}, line 20, field 'rejected': missing" in log
    assert f"of the {n_valid} valid rows of the {NUM_LINES} read" in log


def test_without_skip_invalid_a_malformed_line_stops_the_run(tiny_assets, tmp_path, capsys):
    data, _ = skippable_file(tmp_path)
    with pytest.raises(json.JSONDecodeError) as parsed:
        json.loads(TRUNCATED)
    message = fit_fails(tiny_assets, tmp_path, data, capsys)
    assert message == (
        f"error: {data}, line 5: malformed JSON at column {parsed.value.colno}: Expecting value"
    )


def test_skip_invalid_reports_skipped_rows_of_every_reason_by_line(tiny_assets, tmp_path):
    data, bad = skippable_file(tmp_path)
    checked = checked_source(data, tiny_assets, tmp_path, skip_invalid=True)
    assert [(e.line, e.reason) for e in checked.skipped] == sorted(bad.items())
    assert checked.num_read == NUM_LINES and checked.num_valid == NUM_LINES - len(bad)
    lines = checked.prepared.records.select_columns(["line"])[checked.valid.tolist()]["line"]
    assert lines == [n for n in range(1, NUM_LINES + 1) if n not in bad]


# --- message roles and row shapes ---------------------------------------------------------------


def conversational_lines(n: int) -> list[str]:
    """``n`` conversational rows (the tiny tokenizer has a chat template)."""
    return [
        json.dumps(
            {
                "prompt": [{"role": "user", "content": r["prompt"]}],
                "chosen": [{"role": "assistant", "content": r["chosen"]}],
                "rejected": [{"role": "assistant", "content": r["rejected"]}],
            }
        )
        for r in preference_rows(n)
    ]


def test_an_unknown_message_role_is_an_error(tiny_assets, tmp_path, capsys):
    lines = conversational_lines(NUM_LINES)
    row = json.loads(lines[8])
    lines[8] = json.dumps({**row, "chosen": [ROBOT]})
    data = write_lines(tmp_path / "chat.jsonl", lines)

    message = fit_fails(tiny_assets, tmp_path, data, capsys)
    assert message == (
        f"error: {data}, line 9, field 'chosen': message 0 has role 'robot'; expected one of "
        "'system', 'user', 'assistant', 'tool'"
    )
    with pytest.raises(DataError) as err:
        validate_row({**row, "prompt": [{**MSG, "role": "human"}]}, source="s", index=0)
    assert (err.value.field, err.value.reason) == ("prompt", UNKNOWN_ROLE)


def test_mixed_row_shapes_are_noted_with_counts_per_shape(tiny_assets, tmp_path, caplog):
    explicit = jsonl_lines(30)
    implicit = [
        json.dumps({"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]})
        for r in preference_rows(6, seed=1)
    ]
    chat = conversational_lines(4)
    data = write_lines(tmp_path / "mixed.jsonl", explicit + implicit + chat)

    log = fit_trains(tiny_assets, tmp_path, data, caplog)
    assert (
        f"note: {data} mixes row shapes: 30 explicit (first at line 1), 6 implicit (first at "
        f"line 31), 4 conversational (first at line 37)."
    ) in log
    total = len(explicit) + len(implicit) + len(chat)
    assert f"{data}: {total} rows read, {total} kept" in log


def test_unreadable_data_set_directory_names_it_and_the_cause(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    directory = tmp_path / "prefs"
    directory.mkdir()
    (directory / "train.json").write_text('[{"prompt": "p", "chosen": " a", "rejected" " b"}]')
    with pytest.raises(ValueError, match=re.escape(f"could not load dataset '{directory}'")) as err:
        read_source(directory)
    assert "caused by" in str(err.value)


def test_a_gzipped_jsonl_line_that_is_not_utf8_is_skipped_by_line(tmp_path):
    path = tmp_path / "prefs.jsonl.gz"
    lines = jsonl_lines(5)
    with gzip.open(path, "wb") as f:
        f.write(b"".join(x.encode() + b"\n" for x in lines[:3]) + b"\xff\n" + lines[3].encode())
    with pytest.raises(DataError, match=r"prefs.jsonl.gz, line 4: bytes b'\\xff'"):
        read_source(path)
    read = read_source(path, skip_invalid=True)
    assert [p.line for p in read.places] == [1, 2, 3, 5] and read.skipped[0].line == 4
    assert read.skipped[0].reason == NOT_UTF8
