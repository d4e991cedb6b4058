"""Held-out pairs scored once per model (``training.eval.heldout``), and the held-out set's size
(``training.inputs.prepare``): the default, the cap, and ``--max-rows`` before the split."""

from __future__ import annotations

import json
import logging
import math

import lightning as L
import pytest
import torch

import training.eval.heldout as heldout
from tests.training.conftest import NUM_ROWS, base_args, fit
from training.base.cli import resolve_config
from training.eval.before_after import score_heldout_pairs
from training.eval.loading import build_models
from training.inputs.data_module import PreferenceDataModule
from training.inputs.model_loading import build_reference, load_policy
from training.inputs.prepare import prepare_inputs
from training.run.module import DPOModule

NO_SAMPLES = {"evaluate": True, "eval_fraction": 0.25, "num_prompts": 0, "eval_batch_size": 3}
HELD_OUT = NUM_ROWS // 4  # 8 pairs, in batches of 3: 3 batches
BATCHES = 3


@pytest.fixture
def count_passes(monkeypatch):
    """Counts the evaluation's held-out forwards and Lightning validation steps."""
    calls = {"token_logps": 0, "validation_step": 0}
    real = heldout.sequence_logps  # one call = one forward over a held-out batch

    def counted(*args, **kwargs):
        calls["token_logps"] += 1
        return real(*args, **kwargs)

    def validation_step(self, batch, batch_idx):
        calls["validation_step"] += 1

    monkeypatch.setattr(heldout, "sequence_logps", counted)
    monkeypatch.setattr(DPOModule, "validation_step", validation_step)
    return calls


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_each_model_scores_the_held_out_pairs_once(tiny_assets, tmp_path, count_passes, lora):
    """Before training the policy is the reference (adapters off, or the frozen copy): one pass
    for both, one for the trained policy; no Lightning validation besides."""
    result = fit(base_args(tiny_assets, tmp_path, lora=lora, max_steps=2, **NO_SAMPLES))
    assert count_passes == {"token_logps": 2 * BATCHES, "validation_step": 0}
    for side in (result.before, result.after):
        assert {"eval_loss", "eval_rewards/accuracies", "eval_logps/chosen"} <= set(side)
    assert result.before["eval_rewards/margins"] == 0  # the policy is its own reference
    assert result.before["eval_loss"] == pytest.approx(math.log(2))
    assert result.after == result.evaluation.after.trl_metrics
    assert result.before == result.evaluation.validation()["before"]
    report = (tmp_path / "report.md").read_text()
    assert "| eval_rewards/margins | 0.0000 |" in report


def test_a_separate_reference_model_is_scored_once_too(tiny_assets, tmp_path, count_passes):
    """--ref-model: reference, before and after are three models, three passes."""
    argv = base_args(tiny_assets, tmp_path, ref_model=tiny_assets.model_dir, **NO_SAMPLES)
    fit(argv)
    assert count_passes == {"token_logps": 3 * BATCHES, "validation_step": 0}


def test_a_precomputed_reference_is_not_scored_again(tiny_assets, tmp_path, count_passes):
    """--ref-model with precomputed reference log-probs: before and after only."""
    argv = base_args(tiny_assets, tmp_path, ref_model=tiny_assets.model_dir, **NO_SAMPLES)
    result = fit([*argv, "--precompute-ref-log-probs"])
    assert count_passes["token_logps"] == 2 * BATCHES
    assert result.evaluation.before.pairs.preference_accuracy == 0.5  # same weights: ties


def test_trl_metrics_are_what_lightning_validation_computes(tiny_assets, tmp_path):
    """The evaluation's ``eval_*`` numbers equal a Lightning ``validate`` of the training module
    on the same held-out rows (the two per-batch reductions agree; float32 epoch sums in
    Lightning against float64 here, over 8 pairs: well within 1e-6 relative)."""
    argv = base_args(tiny_assets, tmp_path, lora=True, **NO_SAMPLES)
    cfg, _ = resolve_config([*argv, "--learning-rate", "0.01"])
    inputs = prepare_inputs(cfg)
    policy = load_policy(inputs.model_path, cfg)
    for p in policy.parameters():  # move the adapters off zero: rewards are not all 0
        if p.requires_grad:
            p.data.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    reference = build_reference(policy, cfg)
    module = DPOModule(policy, reference, cfg, total_steps=1)
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    data = PreferenceDataModule(inputs.data, inputs.tokenizer, cfg)
    lightning = trainer.validate(module, dataloaders=data.val_dataloader(), verbose=False)[0]
    models = build_models(policy, cfg, inputs.model_path)
    ours = score_heldout_pairs(models, inputs, cfg)["after"].trl_metrics
    assert set(ours) == set(lightning)
    assert ours["eval_rewards/margins"] != 0
    for key, value in lightning.items():
        assert ours[key] == pytest.approx(float(value), rel=1e-6, abs=1e-7), key


def held_out_count(tiny_assets, tmp_path, caplog, **flags) -> tuple[int, int, str]:
    """(train rows, held-out rows, the "held-out:" log line) of a run's inputs."""
    cfg, _ = resolve_config(base_args(tiny_assets, tmp_path, **flags))
    with caplog.at_level(logging.INFO, logger="training.inputs.prepare"):
        inputs = prepare_inputs(cfg)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("held-out:"))
    return len(inputs.data.train), len(inputs.data.heldout), line


def test_held_out_default_is_the_fraction_of_the_rows_read(tiny_assets, tmp_path, caplog):
    n_train, n_held, line = held_out_count(tiny_assets, tmp_path, caplog, eval_fraction=0.25)
    assert (n_train, n_held) == (24, 8)
    assert line == (
        "held-out: 8 pairs (25% of the 32 rows read, at most 64; --eval-fraction, "
        "--eval-max-pairs to change)"
    )


def test_max_rows_applies_before_the_split(tiny_assets, tmp_path, caplog):
    """--max-rows 20 with 25% held out: 5 held-out pairs from the 20 rows, 15 to train on."""
    n_train, n_held, line = held_out_count(
        tiny_assets, tmp_path, caplog, eval_fraction=0.25, max_rows=20
    )
    assert (n_train, n_held) == (15, 5)
    assert "25% of the 20 rows read" in line


def test_eval_max_pairs_caps_the_split_and_the_rest_trains(tiny_assets, tmp_path, caplog):
    n_train, n_held, _ = held_out_count(
        tiny_assets, tmp_path, caplog, eval_fraction=0.25, eval_max_pairs=3
    )
    assert (n_train, n_held) == (29, 3)


def test_eval_max_pairs_takes_the_first_pairs_of_an_eval_file(tiny_assets, tmp_path, caplog):
    eval_file = tmp_path / "heldout.jsonl"
    eval_file.write_text(tiny_assets.data_file.read_text())
    n_train, n_held, line = held_out_count(
        tiny_assets, tmp_path, caplog, eval_dataset=eval_file, eval_max_pairs=5
    )
    assert (n_train, n_held) == (32, 5)
    assert line.startswith(f"held-out: 5 pairs (the first 5 of 32 in {eval_file}, at most 5;")
    cfg, _ = resolve_config(
        base_args(tiny_assets, tmp_path, eval_dataset=eval_file, eval_max_pairs="none")
    )
    assert len(prepare_inputs(cfg).data.heldout) == 32


def test_eval_max_pairs_must_be_positive(tiny_assets, tmp_path):
    with pytest.raises(ValueError, match="--eval-max-pairs must be >= 1"):
        resolve_config(base_args(tiny_assets, tmp_path, eval_max_pairs=0))


def test_eval_json_counts_the_capped_pairs(tiny_assets, tmp_path):
    fit(base_args(tiny_assets, tmp_path, max_steps=1, eval_max_pairs=4, **NO_SAMPLES))
    assert json.loads((tmp_path / "eval.json").read_text())["n_pairs"] == 4


def test_samples_and_baselines_are_scored_once_per_model(tiny_assets, tmp_path, monkeypatch):
    """With the implicit judge, P prompts: before's samples under the reference (= before) and
    the trained policy, the baselines under both, after's samples under both: at most 6P
    sequences (the KL estimate and the judge share them; the baselines are judged for both
    policies' samples), none twice under one model (11P before)."""
    import training.eval.scoring as scoring

    scored = []
    real = scoring.score_completions

    def counted(view, prompt_ids, completion_ids, *args, **kwargs):
        model = (id(view.model), view.adapters_off)
        scored.extend((model, tuple(p), tuple(c)) for p, c in zip(prompt_ids, completion_ids))
        return real(view, prompt_ids, completion_ids, *args, **kwargs)

    monkeypatch.setattr(scoring, "score_completions", counted)
    flags = {**NO_SAMPLES, "num_prompts": 3, "max_new_tokens": 3, "judge": "implicit"}
    result = fit(base_args(tiny_assets, tmp_path, max_steps=1, **flags))
    assert result.evaluation.n_prompts == 3
    assert len(scored) == len(set(scored)) <= 6 * 3
    assert result.evaluation.before.kl == 0.0
