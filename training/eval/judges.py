"""Judges: a verdict in [0, 1] for each sampled completion; the win rate is their mean.

``--judge`` picks one:

- ``rule``: the embedded task's exact rule (``training.embedded.synthetic.judge``): 1 for a positive
  completion, 0 for a negative one, 1/2 for a tie. ``auto`` means this on the embedded default.
- ``module:function``: any callable ``function(prompt: str, completion: str) -> float`` in
  [0, 1], used as the verdict directly (``training.embedded.synthetic:judge`` is the rule above).
- ``implicit``: DPO's implicit reward ``β log π(y|x)/π_ref(y|x)`` of the **trained** policy (the
  same judge for the samples of both policies). ``auto`` means this on other data.
- a directory or hub id of an ``AutoModelForSequenceClassification`` reward model: its logit
  (one label) or the probability of its last label (several, e.g. a sentiment classifier).
- ``none``: no judge (win rate not measured).

Reward judges (``implicit`` and reward models) compare: a sample wins (1) when its reward is
above that of the held-out pair's ``chosen`` completion (``--win-against rejected``: the
rejected one), ties 1/2, else 0.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from dpo_core.evaluation import implicit_reward, win_scores
from training.embedded import synthetic
from training.eval.scoring import CompletionScores, ModelView


@dataclass
class Candidates:
    """Sampled completions of N prompts, and the held-out completions they are compared with.

    Attributes:
        prompts, completions: decoded texts (special tokens skipped), N each.
        prompt_ids, completion_ids: the same as token ids.
        baseline_ids, baselines: per prompt, the held-out pair's chosen (or rejected) completion.
    """

    prompts: list[str]
    completions: list[str]
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    baseline_ids: list[list[int]]
    baselines: list[str]


class ScoreJudge:
    """A callable ``fn(prompt, completion) -> float`` in [0, 1], used as the verdict itself."""

    def __init__(self, fn: Callable[[str, str], float], name: str) -> None:
        self.fn, self.name = fn, name

    def __call__(self, c: Candidates) -> list[float]:
        verdicts = [float(self.fn(p, y)) for p, y in zip(c.prompts, c.completions, strict=True)]
        bad = [v for v in verdicts if not 0.0 <= v <= 1.0]
        if bad:
            raise ValueError(f"judge {self.name} returned {bad[0]}, outside [0, 1]")
        return verdicts


class RewardJudge:
    """A reward function of (prompt, completion); the verdict is a win against the baseline."""

    def __init__(self, rewards: Callable[[Candidates, bool], torch.Tensor], name: str) -> None:
        self.rewards, self.name = rewards, name

    def __call__(self, c: Candidates) -> list[float]:
        ours, theirs = self.rewards(c, False), self.rewards(c, True)
        return win_scores(ours, theirs).tolist()


def implicit_judge(
    after: ModelView, reference: ModelView, beta: float, scores: CompletionScores
) -> RewardJudge:
    """``β log π_after(y|x)/π_ref(y|x)`` of the samples and of the baselines, on token ids
    (``scores`` remembers what the KL estimate already scored)."""

    def rewards(c: Candidates, baseline: bool) -> torch.Tensor:
        ids = c.baseline_ids if baseline else c.completion_ids
        pi = scores(after, c.prompt_ids, ids, desc="judge: policy")
        ref = scores(reference, c.prompt_ids, ids, desc="judge: reference")
        return implicit_reward(pi, ref, beta)

    return RewardJudge(rewards, "implicit DPO reward of the trained policy")


def reward_model_judge(path: str, device: torch.device, batch_size: int = 16) -> RewardJudge:
    """A sequence-classification reward model on ``prompt + completion`` text."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForSequenceClassification.from_pretrained(path).to(device).eval()
    model.config.pad_token_id = tokenizer.pad_token_id

    def texts_reward(texts: Sequence[str]) -> torch.Tensor:
        out = []
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(
                list(texts[start : start + batch_size]),
                return_tensors="pt",
                padding=True,
                truncation=True,
            )
            with torch.no_grad():
                logits = model(**enc.to(device)).logits.float()
            out.append(logits[:, 0] if logits.shape[1] == 1 else logits.softmax(-1)[:, -1])
        return torch.cat(out).cpu()

    def rewards(c: Candidates, baseline: bool) -> torch.Tensor:
        ys = c.baselines if baseline else c.completions
        return texts_reward([p + y for p, y in zip(c.prompts, ys, strict=True)])

    return RewardJudge(rewards, f"reward model {path}")


def load_callable(spec: str) -> Callable[[str, str], float]:
    """``"package.module:function"`` -> the function."""
    module_name, _, attr = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(
            f"--judge {spec!r}: cannot import {attr!r} from {module_name}: {err}"
        ) from err
    if not callable(fn):
        raise ValueError(f"--judge {spec!r} is not callable")
    return fn


def make_judge(
    spec: str,
    *,
    embedded: bool,
    rule: Callable[[str, str], float] | None,
    after: ModelView,
    reference: ModelView,
    beta: float,
    scores: CompletionScores | None,
) -> ScoreJudge | RewardJudge | None:
    """The judge ``spec`` names (see the module docstring); None for ``none``."""
    if spec == "auto":
        spec = "rule" if embedded else "implicit"
    if spec == "none":
        return None
    if spec == "rule":
        return ScoreJudge(
            rule if rule is not None else synthetic.judge, "the synthetic task's rule"
        )
    if spec == "implicit":
        return implicit_judge(after, reference, beta, scores)
    if ":" in spec and not Path(spec).exists():
        return ScoreJudge(load_callable(spec), spec)
    return reward_model_judge(spec, after.device)
