"""Before vs after: both policies measured on the same held-out pairs and prompts.

For each of the two policies, *before* (the starting model) and *after* (the trained one):

- held-out pairs: preference accuracy and mean margin of the implicit reward
  ``β log π/π_ref`` (ties count 1/2: before training every reward is 0), the policy's own
  ``logp_accuracy``, and the mean log-probs of chosen and rejected completions; from the same
  pass (``training.eval.heldout``: each model scores the pairs once), trl's ``eval_*`` metrics;
- samples, one per held-out prompt (``generate`` with a seed): the sequence-level
  ``KL(π ‖ π_ref)`` estimate and the win rate under the judge (``training.eval.judges``).

``training.fit`` calls ``evaluate`` at the end of a run; ``python -m training.evaluate`` runs it
alone on a saved model.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from dpo_core.collate import PreferenceCollator
from dpo_core.evaluation import (
    PreferenceSummary,
    preference_summary,
    sequence_kl,
    sequence_kl_stderr,
)
from training.base.config import FitConfig
from training.base.settings import dpo_settings
from training.eval.heldout import HeldOutPairs
from training.eval.judges import Candidates, make_judge
from training.eval.loading import EvalModels
from training.eval.sampling import SamplingSettings, sample_completions
from training.eval.scoring import CompletionScores, ModelView
from training.inputs.prepare import RunInputs

log = logging.getLogger("training.evaluate")


@dataclass
class PolicyResult:
    """One policy's numbers, and its samples with their verdicts. ``trl_metrics``: the same
    held-out pairs as trl's ``eval_*`` metrics against the training's reference."""

    pairs: PreferenceSummary
    trl_metrics: dict[str, float] = field(default_factory=dict)
    kl: float | None = None
    kl_stderr: float | None = None  # the KL estimate's standard error (None: under 2 samples)
    win_rate: float | None = None
    completions: list[str] = field(default_factory=list)
    verdicts: list[float] = field(default_factory=list)

    def metrics(self) -> dict[str, float | None]:
        """eval.json's per-policy object: the four headline numbers (and the KL's standard
        error) first."""
        pairs = self.pairs.as_dict()
        head = {
            "preference_accuracy": pairs.pop("preference_accuracy"),
            "reward_margin": pairs.pop("reward_margin"),
            "win_rate": self.win_rate,
            "kl": self.kl,
            "kl_stderr": self.kl_stderr,
        }
        return head | pairs


@dataclass
class Evaluation:
    """Before vs after, and what they were measured on."""

    before: PolicyResult
    after: PolicyResult
    n_pairs: int
    prompts: list[str]
    judge: str | None
    settings: SamplingSettings
    beta: float
    seconds: float = 0.0  # wall time of the whole evaluation
    cpu_seconds: float = 0.0  # CPU time of this process over it (all threads)

    @property
    def n_prompts(self) -> int:
        return len(self.prompts)

    def timing(self) -> str:
        """``"25 s (CPU 32 s)"``: CPU time far above wall time x threads means threads waited
        by spinning (``training.base.openmp_waits``)."""
        return f"{self.seconds:.0f} s (CPU {self.cpu_seconds:.0f} s)"

    def validation(self) -> dict[str, dict[str, float]]:
        """trl's ``eval_*`` metrics, ``{"before": {...}, "after": {...}}``."""
        return {"before": self.before.trl_metrics, "after": self.after.trl_metrics}

    def to_json(self) -> dict:
        """``{"before": {...}, "after": {...}, "n_pairs": int, "n_prompts": int}``."""
        return {
            "before": self.before.metrics(),
            "after": self.after.metrics(),
            "n_pairs": self.n_pairs,
            "n_prompts": self.n_prompts,
        }


def distinct_prompts(features: list[dict], n: int) -> list[int]:
    """Indices of the first ``n`` held-out rows with a prompt not seen before (in order)."""
    seen, picked = set(), []
    for i, f in enumerate(features):
        key = tuple(f["prompt_ids"])
        if key not in seen and len(picked) < n:
            seen.add(key)
            picked.append(i)
    return picked


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


def sample_policy(
    name: str,
    view: ModelView,
    models: EvalModels,
    picked: list[dict],
    inputs: RunInputs,
    cfg: FitConfig,
    scores: CompletionScores,
) -> tuple[Candidates, tuple[float, float | None]]:
    """Sample one completion per prompt; the candidates for the judge, and the KL estimate with
    its standard error."""
    tok, e = inputs.tokenizer, cfg.eval
    prompt_ids = [f["prompt_ids"] for f in picked]
    settings = sampling_settings(cfg)
    samples = sample_completions(view, prompt_ids, tok, settings, desc=f"sampling ({name})")
    pi = scores(view, prompt_ids, samples, desc=f"KL: {name}")
    ref = scores(models.reference, prompt_ids, samples, desc="KL: reference")  # same: remembered
    baseline_ids = [f[f"{e.win_against}_ids"] for f in picked]
    candidates = Candidates(
        prompts=[_decode(tok, p) for p in prompt_ids],
        completions=[_decode(tok, s) for s in samples],
        prompt_ids=prompt_ids,
        completion_ids=samples,
        baseline_ids=baseline_ids,
        baselines=[_decode(tok, b) for b in baseline_ids],
    )
    return candidates, (sequence_kl(pi, ref), sequence_kl_stderr(pi, ref))


def sampling_settings(cfg: FitConfig) -> SamplingSettings:
    e = cfg.eval
    return SamplingSettings(
        max_new_tokens=e.max_new_tokens,
        temperature=e.temperature,
        top_p=e.top_p,
        batch_size=e.generation_batch_size,
        seed=cfg.trainer.seed,
    )


def score_heldout_pairs(models: EvalModels, inputs: RunInputs, cfg: FitConfig):
    """Both policies' ``PolicyResult`` on the held-out pairs, each model scored once."""
    collate = PreferenceCollator(
        pad_token_id=inputs.tokenizer.pad_token_id,
        max_length=cfg.data.max_length,
        truncation_mode=cfg.data.truncation_mode,
    )
    pairs = HeldOutPairs(
        inputs.data.heldout, collate, cfg.trainer.eval_batch_size, dpo_settings(cfg)
    )
    ref, *policies = pairs.score(models.reference, models.before, models.after)
    results = {}
    for name, scores in zip(("before", "after"), policies, strict=True):
        summary = preference_summary(
            scores.chosen, scores.rejected, ref.chosen, ref.rejected, cfg.dpo.beta
        )
        results[name] = PolicyResult(summary, trl_metrics=scores.trl_metrics())
    return results


def evaluate(models: EvalModels, inputs: RunInputs, cfg: FitConfig) -> Evaluation:
    """Measure both policies on ``inputs``' held-out pairs and prompts (module docstring)."""
    if not inputs.data.heldout:
        raise ValueError("evaluation needs held-out pairs; none were given or kept")
    start, cpu_start = time.perf_counter(), time.process_time()
    picked_rows = distinct_prompts(inputs.data.heldout, cfg.eval.num_prompts)
    picked = [inputs.data.heldout[i] for i in picked_rows]
    scores = CompletionScores(inputs.tokenizer.pad_token_id, batch_size=cfg.trainer.eval_batch_size)
    judge = make_judge(
        cfg.eval.judge,
        embedded=inputs.embedded is not None and cfg.data.dataset is None,
        rule=getattr(inputs.embedded, "judge", None),
        after=models.after,
        reference=models.reference,
        beta=cfg.dpo.beta,
        scores=scores,
    )
    log.info(
        "evaluation: %d held-out pairs, %d prompts sampled, judge: %s",
        len(inputs.data.heldout),
        len(picked),
        "none" if judge is None else judge.name,
    )
    results = score_heldout_pairs(models, inputs, cfg)
    prompts: list[str] = []
    for name, view in (("before", models.before), ("after", models.after)):
        if not picked:
            break
        candidates, (results[name].kl, results[name].kl_stderr) = sample_policy(
            name, view, models, picked, inputs, cfg, scores
        )
        prompts = candidates.prompts
        results[name].completions = candidates.completions
        if judge is not None:
            verdicts = judge(candidates)
            results[name].verdicts = verdicts
            results[name].win_rate = sum(verdicts) / len(verdicts)
    return Evaluation(
        before=results["before"],
        after=results["after"],
        n_pairs=len(inputs.data.heldout),
        prompts=prompts,
        judge=None if judge is None else judge.name,
        settings=sampling_settings(cfg),
        beta=cfg.dpo.beta,
        seconds=time.perf_counter() - start,
        cpu_seconds=time.process_time() - cpu_start,
    )
