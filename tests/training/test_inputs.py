"""Runs on inputs given by path: a local jsonl file with a local model directory, and the real
hh-rlhf file (implicit-prompt dialogues, .jsonl.gz) as ``--dataset``."""

from __future__ import annotations

import json
import math

import yaml

from tests.conftest import HH_RLHF_FILE
from tests.training.conftest import base_args, read_metrics
from training.fit import main

FEW_SAMPLES = {"num_prompts": 2, "max_new_tokens": 8}  # the evaluation's sampling, kept short


def test_local_jsonl_and_local_model_directory(tiny_assets, tmp_path):
    argv = base_args(
        tiny_assets, tmp_path, evaluate=True, eval_fraction=0.25, max_steps=2, **FEW_SAMPLES
    )
    assert main(argv) == 0

    resolved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert resolved["model"]["model"] == str(tiny_assets.model_dir)
    assert resolved["data"]["dataset"] == str(tiny_assets.data_file)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["n_pairs"] == 8  # 25% of the 32 rows held out
    # Before training the policy is its reference: rewards exactly 0.
    assert report["before"]["reward_margin"] == 0
    assert report["after"]["reward_margin"] != 0
    assert (tmp_path / "model" / "model.safetensors").exists()


def test_hh_rlhf_file_as_dataset(tiny_assets, tmp_path):
    argv = base_args(
        tiny_assets,
        tmp_path,
        dataset=HH_RLHF_FILE,
        max_rows=8,
        max_length=128,
        max_steps=2,
        evaluate=True,
        **FEW_SAMPLES,
        eval_fraction=0.002,  # 4 of the file's 2,312 rows
    )
    assert main(argv) == 0
    steps = read_metrics(tmp_path)
    assert [r["step"] for r in steps] == [1, 2]
    assert all(math.isfinite(r["loss"]) and r["num_tokens"] > 0 for r in steps)
    report = json.loads((tmp_path / "eval.json").read_text())
    assert 0 < report["n_pairs"] <= 4
    assert math.isfinite(report["after"]["reward_margin"])
    # Prompts of 128 tokens or more are dropped (as trl does) and the drop is reported.
    text = (tmp_path / "report.md").read_text()
    dropped = [
        line[2:].split(":")[0] for line in text.split("## Rows left out")[1].splitlines()[2:]
    ]
    assert dropped and set(dropped) <= {
        "train/prompt_fills_max_length",
        "heldout/prompt_fills_max_length",
    }
