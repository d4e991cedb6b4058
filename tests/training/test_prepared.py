"""Preparation at scale (``training.inputs.prepared``): the cache of tokenized sources, its key,
sources of every kind, column mapping, and several processes giving the same tokens."""

from __future__ import annotations

import csv
import dataclasses
import gzip
import json
import logging

import datasets
import pytest

from dpo_core.data import tokenize_rows
from dpo_core.rows import DataError, write_jsonl
from tests.conftest import load_hh_rows
from tests.training.conftest import base_args, fit, preference_rows
from training.base.config import DataConfig
from training.inputs import prepared as prepared_module
from training.inputs.features import FeatureRows, pair_length, pair_lengths, token_fingerprint
from training.inputs.model_loading import load_tokenizer
from training.inputs.prepared import prepare_source
from training.inputs.prepared_parts import check_prepared, tokenized_part


@pytest.fixture
def tokenizer(tiny_assets):
    return load_tokenizer(str(tiny_assets.model_dir))


def data_cfg(tmp_path, **changes) -> DataConfig:
    return dataclasses.replace(DataConfig(dataset_cache_dir=str(tmp_path / "cache")), **changes)


def features(source, tokenizer, cfg, split="train") -> FeatureRows:
    checked = check_prepared(prepare_source(source, split, tokenizer, cfg), skip_invalid=False)
    return tokenized_part(checked, range(checked.num_valid), "train", skip_invalid=False)[0]


def as_lists(rows) -> list[dict]:
    return [{k: f[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for f in rows]


def test_tokens_are_those_of_tokenize_rows_and_whole_set_passes_agree(tokenizer, tmp_path):
    rows = load_hh_rows(40)
    write_jsonl(rows, tmp_path / "hh.jsonl")
    got = features(tmp_path / "hh.jsonl", tokenizer, data_cfg(tmp_path, max_length=64))
    want = tokenize_rows(rows, tokenizer, max_length=64).rows
    assert as_lists(got) == as_lists(want)
    assert [f["index"] for f in got] == list(range(len(got)))
    assert pair_lengths(got, 64) == [pair_length(f, 64) for f in want]
    assert token_fingerprint(got) == token_fingerprint(want)


def test_a_rerun_reads_the_cache_and_each_setting_that_changes_tokens_recomputes(
    tokenizer, tmp_path, caplog
):
    write_jsonl(preference_rows(12), tmp_path / "p.jsonl")
    cfg = data_cfg(tmp_path)
    with caplog.at_level(logging.INFO):
        first = as_lists(features(tmp_path / "p.jsonl", tokenizer, cfg))
        caplog.clear()
        assert as_lists(features(tmp_path / "p.jsonl", tokenizer, cfg)) == first
    assert "read from the cache" in caplog.text and str(tmp_path / "cache") in caplog.text

    changes = [
        {"max_length": 8},
        {"truncation_mode": "keep_end"},
        {"prompt_column": "question"},
    ]
    for change in changes:
        caplog.clear()
        with caplog.at_level(logging.INFO):
            features(tmp_path / "p.jsonl", tokenizer, data_cfg(tmp_path, **change))
        assert "rows tokenized in" in caplog.text, change


def test_changed_content_or_tokenizer_is_recomputed(tokenizer, tmp_path, caplog):
    path = tmp_path / "p.jsonl"
    write_jsonl(preference_rows(12), path)
    cfg = data_cfg(tmp_path)
    first = as_lists(features(path, tokenizer, cfg))
    write_jsonl(preference_rows(12, seed=1), path)
    assert as_lists(features(path, tokenizer, cfg)) != first
    tokenizer.chat_template = "{{ messages }}"  # a changed chat template: another tokenizer
    with caplog.at_level(logging.INFO):
        features(path, tokenizer, cfg)
    assert "rows tokenized in" in caplog.text


def test_a_truncated_cache_entry_is_noted_and_prepared_again(tokenizer, tmp_path, caplog):
    write_jsonl(preference_rows(12), tmp_path / "p.jsonl")
    cfg = data_cfg(tmp_path)
    first = as_lists(features(tmp_path / "p.jsonl", tokenizer, cfg))
    (shard,) = (tmp_path / "cache").glob("*/records.arrow")
    shard.write_bytes(shard.read_bytes()[:-100])
    with caplog.at_level(logging.INFO):
        assert as_lists(features(tmp_path / "p.jsonl", tokenizer, cfg)) == first
    notes = [r.getMessage() for r in caplog.records if "preparing" in r.getMessage()]
    assert len(notes) == 1 and "records.arrow has" in notes[0]


def test_two_processes_give_the_tokens_of_one(tokenizer, tmp_path, monkeypatch):
    write_jsonl(preference_rows(16), tmp_path / "p.jsonl")
    one = as_lists(features(tmp_path / "p.jsonl", tokenizer, data_cfg(tmp_path / "a")))
    monkeypatch.setattr(prepared_module, "ROWS_PER_PROCESS", 4)
    cfg = data_cfg(tmp_path / "b", dataset_num_proc=2)
    assert as_lists(features(tmp_path / "p.jsonl", tokenizer, cfg)) == one
    assert len(list((tmp_path / "b" / "cache").glob("*/records_*.arrow"))) == 2
    assert as_lists(features(tmp_path / "p.jsonl", tokenizer, cfg)) == one  # from the cache


def test_saved_datasets_split_directories_and_gzipped_csv_read_the_same(tokenizer, tmp_path):
    rows = preference_rows(10)
    write_jsonl(rows, tmp_path / "p.jsonl")
    want = as_lists(features(tmp_path / "p.jsonl", tokenizer, data_cfg(tmp_path)))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    whole = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:4])})
    whole["test"] = datasets.Dataset.from_list(rows)
    whole.save_to_disk(str(tmp_path / "saved_dict"))
    (tmp_path / "splits").mkdir()
    write_jsonl(rows, tmp_path / "splits" / "test.jsonl")
    write_jsonl(rows[:3], tmp_path / "splits" / "train.jsonl")
    with gzip.open(tmp_path / "p.csv.gz", "wt", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    cfg = data_cfg(tmp_path)
    assert as_lists(features(tmp_path / "saved", tokenizer, cfg)) == want
    assert as_lists(features(tmp_path / "saved_dict", tokenizer, cfg, split="test")) == want
    assert as_lists(features(tmp_path / "splits", tokenizer, cfg, split="test")) == want
    assert as_lists(features(tmp_path / "p.csv.gz", tokenizer, cfg)) == want
    with pytest.raises(ValueError, match=r"saved_dict.*split 'validation'.*no split"):
        features(tmp_path / "saved_dict", tokenizer, cfg, split="validation")


def test_columns_of_other_names_are_mapped_and_named_in_errors(tiny_assets, tokenizer, tmp_path):
    renamed = [
        {"question": r["prompt"], "response_j": r["chosen"], "response_k": r["rejected"]}
        for r in preference_rows(12)
    ]
    write_jsonl(renamed, tmp_path / "se.jsonl")
    columns = {"prompt_column": "question", "chosen_column": "response_j"}
    cfg = data_cfg(tmp_path, rejected_column="response_k", **columns)
    write_jsonl(preference_rows(12), tmp_path / "p.jsonl")
    want = as_lists(features(tmp_path / "p.jsonl", tokenizer, data_cfg(tmp_path)))
    assert as_lists(features(tmp_path / "se.jsonl", tokenizer, cfg)) == want
    run = fit(
        base_args(
            tiny_assets,
            tmp_path / "run",
            dataset=tmp_path / "se.jsonl",
            **columns,
            rejected_column="response_k",
            max_steps=1,
        )
    )
    assert run is not None

    del renamed[3]["response_j"]
    write_jsonl(renamed, tmp_path / "se.jsonl")
    with pytest.raises(DataError, match=r"se.jsonl, line 4, field 'response_j \(--chosen-column\)"):
        features(tmp_path / "se.jsonl", tokenizer, cfg)
    datasets.Dataset.from_list(renamed[:3]).save_to_disk(str(tmp_path / "se_saved"))
    with pytest.raises(DataError, match=r"no column 'answer' \(--chosen-column\); its columns"):
        features(tmp_path / "se_saved", tokenizer, data_cfg(tmp_path, chosen_column="answer"))


def test_the_rows_read_skipped_by_a_cached_run_still_stop_a_run_without_skip_invalid(
    tokenizer, tmp_path
):
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in preference_rows(6)) + "\n{oops\n")
    cfg = data_cfg(tmp_path, skip_invalid=True)
    checked = check_prepared(prepare_source(path, "train", tokenizer, cfg), skip_invalid=True)
    assert checked.num_valid == 6 and [e.line for e in checked.skipped] == [7]
    again = prepare_source(path, "train", tokenizer, data_cfg(tmp_path))
    with pytest.raises(DataError, match=r"p.jsonl, line 7: malformed JSON"):
        check_prepared(again, skip_invalid=False)


@pytest.mark.parametrize("name", ["p.json", "p.json.gz", "p.csv"])
def test_a_streamed_json_or_csv_source_is_cached_by_its_bytes(tokenizer, tmp_path, caplog, name):
    rows = preference_rows(12)
    write_jsonl(rows, tmp_path / "p.jsonl")
    path = tmp_path / name

    def write(indent):
        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "wt", newline="", encoding="utf-8") as f:
            if name.endswith(".csv"):
                writer = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator=indent)
                writer.writeheader()
                writer.writerows(rows)
            else:
                f.write(json.dumps(rows, indent=len(indent)))

    cfg = data_cfg(tmp_path)
    write("\n")
    first = prepare_source(path, "train", tokenizer, cfg)
    assert as_lists(features(path, tokenizer, cfg)) == as_lists(
        features(tmp_path / "p.jsonl", tokenizer, cfg)
    )
    with caplog.at_level(logging.INFO):
        again = prepare_source(path, "train", tokenizer, cfg)
    assert "read from the cache" in caplog.text and again.location == first.location
    write("\r\n")  # the same rows in other bytes: another entry
    caplog.clear()
    with caplog.at_level(logging.INFO):
        other = prepare_source(path, "train", tokenizer, cfg)
    assert "rows tokenized in" in caplog.text and other.location != first.location
