"""Judges: how each kind turns completions into verdicts, and how ``--judge`` picks one."""

from __future__ import annotations

import pytest
import torch

from training.eval.judges import Candidates, RewardJudge, ScoreJudge, load_callable, make_judge
from training.eval.scoring import ModelView


def candidates(completions: list[str], baselines: list[str]) -> Candidates:
    n = len(completions)
    return Candidates(["p"] * n, completions, [[1]] * n, [[2]] * n, [[3]] * n, baselines)


def test_score_judge_returns_the_callables_scores_and_checks_the_range():
    c = candidates([" lovely", " awful"], ["", ""])
    assert ScoreJudge(lambda p, y: 1.0 if "lovely" in y else 0.0, "x")(c) == [1.0, 0.0]
    with pytest.raises(ValueError, match="outside"):
        ScoreJudge(lambda p, y: 2.0, "x")(c)


def test_reward_judge_wins_ties_and_losses_against_the_baseline():
    """Reward = length: the samples are longer, as long, and shorter than the baselines."""

    def rewards(c: Candidates, baseline: bool) -> torch.Tensor:
        return torch.tensor([float(len(y)) for y in (c.baselines if baseline else c.completions)])

    c = candidates(["aaa", "bb", "c"], ["a", "bb", "ccc"])
    assert RewardJudge(rewards, "length")(c) == [1.0, 0.5, 0.0]


def test_make_judge_resolves_auto_rule_callable_and_none():
    kw = dict(after=None, reference=None, beta=0.1, scores=None)
    assert make_judge("none", embedded=True, rule=None, **kw) is None
    auto = make_judge("auto", embedded=True, rule=None, **kw)
    assert isinstance(auto, ScoreJudge) and auto(candidates([" superb"], [""])) == [1.0]
    called = make_judge("training.embedded.synthetic:judge", embedded=False, rule=None, **kw)
    assert called(candidates([" dreadful"], [""])) == [0.0]


def test_load_callable_errors_name_the_spec():
    with pytest.raises(ValueError, match="no_such_module"):
        load_callable("no_such_module:f")
    with pytest.raises(ValueError, match="VERSION.*not callable"):
        load_callable("training.embedded.assets:VERSION")


def test_a_reward_model_directory_is_a_reward_judge(tiny_assets, tmp_path):
    """A sequence-classification model with one label: its logit on prompt + completion is the
    reward, and a sample wins when its reward beats the baseline's."""
    from transformers import AutoConfig, AutoTokenizer, LlamaForSequenceClassification

    config = AutoConfig.from_pretrained(tiny_assets.model_dir, num_labels=1)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config).eval()
    model.save_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tiny_assets.model_dir)
    tokenizer.save_pretrained(tmp_path)

    on_cpu = ModelView(model)  # where the judge runs: the trained policy's device
    judge = make_judge(
        str(tmp_path),
        embedded=False,
        rule=None,
        after=on_cpu,
        reference=None,
        beta=0.1,
        scores=None,
    )
    c = candidates(
        [" It is kind.", " It is cruel.", " same"], [" It is cruel.", " It is kind.", " same"]
    )
    with torch.no_grad():
        reward = {
            y: model(**tokenizer("p" + y, return_tensors="pt")).logits[0, 0].item()
            for y in (" It is kind.", " It is cruel.", " same")
        }
    first = 1.0 if reward[" It is kind."] > reward[" It is cruel."] else 0.0
    assert judge(c) == [first, 1.0 - first, 0.5]
