"""The before-vs-after evaluation: run by ``training.fit`` and by ``python -m training.evaluate``
on the tiny model, its eval.json, report.md and plots, and the KL estimate of a model against
itself."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from dpo_core.evaluation import sequence_kl
from tests.training.conftest import BAD, GOOD, base_args, fit
from tests.training.test_plots import assert_png
from training.eval.sampling import SamplingSettings, sample_completions
from training.eval.scoring import ModelView, score_completions
from training.evaluate import main as evaluate_main
from training.inputs.model_loading import load_tokenizer

HEADLINE = ("preference_accuracy", "reward_margin", "win_rate", "kl")
# Few, short samples: the evaluation's paths all run, in seconds.
EVAL = {
    "evaluate": True,
    "eval_fraction": 0.25,
    "max_steps": 2,
    "learning_rate": 5e-3,
    "num_prompts": 4,
    "max_new_tokens": 6,
    "num_examples": 2,
}
KIND_JUDGE = "tests.training.test_evaluate:kind_judge"


def kind_judge(prompt: str, completion: str) -> float:
    """The tiny data's rule: 1 if more kind words than unkind ones, 0 if fewer, 1/2 on a tie."""
    words = completion.lower().split()
    good = sum(w.strip(".") in GOOD for w in words)
    bad = sum(w.strip(".") in BAD for w in words)
    return 1.0 if good > bad else 0.0 if bad > good else 0.5


@pytest.fixture(scope="module")
def evaluated_run(tiny_assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("evaluated")
    result = fit(base_args(tiny_assets, out, judge=KIND_JUDGE, **EVAL))
    return out, result


def test_eval_json_has_the_documented_shape(evaluated_run):
    out, result = evaluated_run
    report = json.loads((out / "eval.json").read_text())
    assert set(report) == {"before", "after", "n_pairs", "n_prompts"}
    assert report["n_pairs"] == 8  # 25% of the 32 rows
    assert report["n_prompts"] == 4
    for side in ("before", "after"):
        assert list(report[side])[:4] == list(HEADLINE)
        assert all(isinstance(v, float) and math.isfinite(v) for v in report[side].values())
    assert report == result.evaluation.to_json()


def test_before_training_every_pair_is_a_tie_and_kl_is_zero(evaluated_run):
    """The starting policy is the reference: rewards 0, accuracy 1/2 (ties), KL exactly 0."""
    before = json.loads((evaluated_run[0] / "eval.json").read_text())["before"]
    assert before["preference_accuracy"] == 0.5
    assert before["reward_margin"] == before["reward_chosen"] == before["reward_rejected"] == 0
    assert before["kl"] == 0.0
    assert before["kl_stderr"] == 0.0  # every sample's log-ratio is 0: no spread


def test_after_training_the_numbers_moved_and_agree_with_the_loop(evaluated_run):
    _, result = evaluated_run
    after = result.evaluation.to_json()["after"]
    assert after["reward_margin"] != 0 and after["kl"] != 0
    assert after["kl_stderr"] > 0  # 4 samples whose log-ratios differ
    # The held-out rewards of the training loop (trl's metric names) are the same numbers: the
    # same float32 per-pair values, which the loop sums in float32 per batch (StepOutput.sums)
    # and eval.json averages in float64. A float32 sum of n <= 8 same-sign terms (every margin
    # is positive after training, every logp negative) is within (n - 1) eps relative:
    # 7 * 1.19e-7 = 8.3e-7 <= 1e-6. Measured: 1.0e-7 (margin, 1.6 float32 ulp of 0.95) and
    # 7.1e-9 (logps/chosen at -67).
    assert after["reward_margin"] == pytest.approx(result.after["eval_rewards/margins"], rel=1e-6)
    assert after["logps_chosen"] == pytest.approx(result.after["eval_logps/chosen"], rel=1e-6)


def test_win_rate_is_the_mean_verdict_of_the_judge(evaluated_run):
    _, result = evaluated_run
    for side in (result.evaluation.before, result.evaluation.after):
        verdicts = [kind_judge("", c) for c in side.completions]
        assert side.verdicts == verdicts
        assert side.win_rate == pytest.approx(sum(verdicts) / len(verdicts))


def test_report_and_plots_are_written(evaluated_run):
    out, result = evaluated_run
    text = (out / "report.md").read_text()
    assert "| preference accuracy (implicit reward; a tie counts 1/2) | 0.5000 |" in text
    assert text.count("```text") == 2  # num_examples
    assert result.evaluation.after.completions[0] in text
    names = [
        "training_curves.png",
        "optimization.png",
        "heldout_curves.png",
        "before_after.png",
        "frontier.png",
    ]
    for name in names:
        assert f"]({name})" in text
        assert_png(out / name)
    assert [p.name for p in result.report.plots] == names


def test_standalone_evaluation_reproduces_the_runs_numbers(evaluated_run, tmp_path, capsys):
    """``python -m training.evaluate`` on the saved model, with the run's config.yaml: the same
    held-out rows, starting model, seed and judge, so the same eval.json."""
    out, _ = evaluated_run
    argv = ["--model-dir", str(out / "model"), "--output-dir", str(tmp_path)]
    assert evaluate_main(argv) == 0
    assert "preference accuracy" in capsys.readouterr().out
    again = json.loads((tmp_path / "eval.json").read_text())
    first = json.loads((out / "eval.json").read_text())
    assert again.keys() == first.keys()
    # Exactly equal, no tolerance: the same float32 weights (the safetensors round trip is
    # lossless), rows, seed and batch shapes through the same CPU kernels give bit-identical
    # numbers (measured: all 18 values equal). A tolerance would not buy robustness: kl (-0.049
    # here) is a difference of summed log-probs of ~30 nats (6 tokens of ~5), where one float32
    # ulp, 1.9e-6, is already 4e-5 of kl (above the old rel=1e-5), and one flipped sampled token
    # changes the completions, win rate and kl by far more than any float bound.
    for side in ("before", "after"):
        for key, value in first[side].items():
            assert again[side][key] == value, (side, key, again[side][key] - value)


def test_standalone_evaluation_of_a_lora_adapter(tiny_assets, tmp_path):
    """A LoRA run's model/ is an adapter: loaded with peft on the starting model, whose
    adapters-off self is both the before policy and the reference."""
    run = tmp_path / "run"
    fit(base_args(tiny_assets, run, lora=True, eval_fraction=0.25, max_steps=1))
    assert (run / "model" / "adapter_config.json").is_file()
    argv = ["--model-dir", str(run / "model"), "--num-prompts", "2", "--max-new-tokens", "4"]
    assert evaluate_main([*argv, "--judge", "implicit", "--output-dir", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["before"]["preference_accuracy"] == 0.5 and report["before"]["kl"] == 0.0
    assert report["after"]["reward_margin"] != 0


def test_evaluate_reports_a_missing_model_dir(tmp_path, capsys):
    assert evaluate_main(["--model-dir", str(tmp_path / "nope")]) == 1
    assert capsys.readouterr().err.startswith("error: --model-dir")


def test_sequence_kl_of_a_model_against_its_copy_is_zero(tiny_assets):
    """Samples of a model scored under it and under a separate copy: the same float32 sums,
    so the KL estimate is exactly 0; a perturbed copy gives a non-zero estimate."""
    tokenizer = load_tokenizer(str(tiny_assets.model_dir))
    model = AutoModelForCausalLM.from_pretrained(tiny_assets.model_dir)
    prompts = [tokenizer("Describe the cat.")["input_ids"], tokenizer("Describe it.")["input_ids"]]
    settings = SamplingSettings(max_new_tokens=5, seed=3)
    samples = sample_completions(ModelView(model), prompts, tokenizer, settings)
    assert samples == sample_completions(ModelView(model), prompts, tokenizer, settings)
    pad = tokenizer.pad_token_id
    policy = score_completions(ModelView(model), prompts, samples, pad)
    copied = copy.deepcopy(model)
    assert sequence_kl(policy, score_completions(ModelView(copied), prompts, samples, pad)) == 0.0
    with torch.no_grad():
        copied.lm_head.weight.mul_(1.5)
    assert sequence_kl(policy, score_completions(ModelView(copied), prompts, samples, pad)) != 0
