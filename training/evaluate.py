"""``python -m training.evaluate``: the policy before training vs after, on held-out data.

``training.fit`` runs this at the end of every run (unless ``--no-evaluate``); run it alone to
evaluate a trained model directory again, with other sampling settings or another judge::

    python -m training.evaluate                                   # runs/dpo (the fit default)
    python -m training.evaluate --model-dir runs/dpo/model --num-prompts 200 --judge rule
    python -m training.evaluate --model-dir out/model --reference Qwen/Qwen2-0.5B \\
        --eval-file heldout.jsonl --judge ./my-reward-model

For each of the two policies, *before* (the starting model) and *after* (the trained one):

- held-out pairs: preference accuracy and mean margin of the implicit reward
  ``β log π/π_ref`` (ties count 1/2: before training every reward is 0), the policy's own
  ``logp_accuracy``, and the mean log-probs of chosen and rejected completions;
- samples, one per held-out prompt (``generate`` with a seed): the sequence-level
  ``KL(π ‖ π_ref)`` estimate and the win rate under the judge (``training.eval.judges``).

Writes ``eval.json``, ``report.md`` and PNG plots to the output directory (``training.eval.report``).
The models and data default to the run's ``config.yaml`` beside ``--model-dir``: the reference is
the run's ``--ref-model``, else its starting model; a LoRA adapter directory is loaded on it.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dpo_core.collate import PreferenceCollator
from dpo_core.evaluation import PreferenceSummary, preference_summary, sequence_kl
from training.eval.judges import Candidates, make_judge
from training.eval.loading import EvalModels
from training.eval.sampling import (
    ModelView,
    SamplingSettings,
    sample_completions,
    score_completions,
    score_pairs,
)
from training.inputs.prepare import RunInputs
from training.run.config import FitConfig

log = logging.getLogger("training.evaluate")


@dataclass
class PolicyResult:
    """One policy's numbers, and its samples with their verdicts."""

    pairs: PreferenceSummary
    kl: float | None = None
    win_rate: float | None = None
    completions: list[str] = field(default_factory=list)
    verdicts: list[float] = field(default_factory=list)

    def metrics(self) -> dict[str, float | None]:
        """eval.json's per-policy object: the four headline numbers first."""
        pairs = self.pairs.as_dict()
        head = {
            "preference_accuracy": pairs.pop("preference_accuracy"),
            "reward_margin": pairs.pop("reward_margin"),
            "win_rate": self.win_rate,
            "kl": self.kl,
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

    @property
    def n_prompts(self) -> int:
        return len(self.prompts)

    def to_json(self) -> dict:
        """``{"before": {...}, "after": {...}, "n_pairs": int, "n_prompts": int}``."""
        return {
            "before": self.before.metrics(),
            "after": self.after.metrics(),
            "n_pairs": self.n_pairs,
            "n_prompts": self.n_prompts,
        }


class _PairScores:
    """Held-out pair log-probs per model view, each computed once."""

    def __init__(self, inputs: RunInputs, cfg: FitConfig) -> None:
        collate = PreferenceCollator(
            pad_token_id=inputs.tokenizer.pad_token_id,
            max_length=cfg.data.max_length,
            truncation_mode=cfg.data.truncation_mode,
        )
        rows, size = inputs.data.heldout, cfg.trainer.eval_batch_size
        self.batches = [collate(rows[i : i + size]) for i in range(0, len(rows), size)]
        self.chunk = cfg.dpo.logps_chunk_size
        self.cache: list[tuple[ModelView, tuple[torch.Tensor, torch.Tensor]]] = []

    def __call__(self, view: ModelView) -> tuple[torch.Tensor, torch.Tensor]:
        for seen, scores in self.cache:
            if seen.same_as(view):
                return scores
        scores = score_pairs(view, self.batches, chunk_size=self.chunk)
        self.cache.append((view, scores))
        return scores


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
) -> tuple[Candidates, float]:
    """Sample one completion per prompt; the candidates for the judge and the KL estimate."""
    tok, e = inputs.tokenizer, cfg.eval
    prompt_ids = [f["prompt_ids"] for f in picked]
    settings = sampling_settings(cfg)
    samples = sample_completions(view, prompt_ids, tok, settings, desc=f"sampling ({name})")
    pad, batch = tok.pad_token_id, cfg.trainer.eval_batch_size
    pi = score_completions(view, prompt_ids, samples, pad, batch_size=batch, desc="KL: policy")
    ref = (
        pi
        if view.same_as(models.reference)
        else score_completions(
            models.reference, prompt_ids, samples, pad, batch_size=batch, desc="KL: reference"
        )
    )
    baseline_ids = [f[f"{e.win_against}_ids"] for f in picked]
    candidates = Candidates(
        prompts=[_decode(tok, p) for p in prompt_ids],
        completions=[_decode(tok, s) for s in samples],
        prompt_ids=prompt_ids,
        completion_ids=samples,
        baseline_ids=baseline_ids,
        baselines=[_decode(tok, b) for b in baseline_ids],
    )
    return candidates, sequence_kl(pi, ref)


def sampling_settings(cfg: FitConfig) -> SamplingSettings:
    e = cfg.eval
    return SamplingSettings(
        max_new_tokens=e.max_new_tokens,
        temperature=e.temperature,
        top_p=e.top_p,
        batch_size=e.generation_batch_size,
        seed=cfg.trainer.seed,
    )


def evaluate(models: EvalModels, inputs: RunInputs, cfg: FitConfig) -> Evaluation:
    """Measure both policies on ``inputs``' held-out pairs and prompts (module docstring)."""
    if not inputs.data.heldout:
        raise ValueError("evaluation needs held-out pairs; none were given or kept")
    pair_scores = _PairScores(inputs, cfg)
    ref_c, ref_r = pair_scores(models.reference)
    results = {}
    for name, view in (("before", models.before), ("after", models.after)):
        pi_c, pi_r = pair_scores(view)
        results[name] = PolicyResult(preference_summary(pi_c, pi_r, ref_c, ref_r, cfg.dpo.beta))
    picked_rows = distinct_prompts(inputs.data.heldout, cfg.eval.num_prompts)
    picked = [inputs.data.heldout[i] for i in picked_rows]
    judge = make_judge(
        cfg.eval.judge,
        embedded=inputs.embedded is not None and cfg.data.dataset is None,
        rule=getattr(inputs.embedded, "judge", None),
        after=models.after,
        reference=models.reference,
        beta=cfg.dpo.beta,
        pad_id=inputs.tokenizer.pad_token_id,
    )
    log.info(
        "evaluation: %d held-out pairs, %d prompts sampled, judge: %s",
        len(inputs.data.heldout),
        len(picked),
        "none" if judge is None else judge.name,
    )
    prompts: list[str] = []
    for name, view in (("before", models.before), ("after", models.after)):
        if not picked:
            break
        candidates, results[name].kl = sample_policy(name, view, models, picked, inputs, cfg)
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
    )


def build_parser() -> argparse.ArgumentParser:
    """``python -m training.evaluate``'s flags; the evaluation settings are ``EvalConfig``'s."""
    from training.run.cli import add_group_flags

    parser = argparse.ArgumentParser(
        prog="python -m training.evaluate",
        description="Evaluate a DPO-trained model against its starting model on held-out data.",
        argument_default=argparse.SUPPRESS,
    )
    add = parser.add_argument
    add("--model-dir", type=Path, default=Path("runs/dpo/model"), help="Trained model or adapter.")
    add("--reference", default=None, help="Starting / reference model (default: the run's).")
    add("--dataset", default=None, help="Preference data (default: the run's, or embedded).")
    add("--eval-file", default=None, help="Held-out preference file (overrides --dataset's split).")
    add("--eval-split", default=None, help="Split of --dataset to evaluate on.")
    add("--eval-fraction", type=float, default=None, help="Held-out share when no split is given.")
    add("--max-length", type=int, default=None, help="Truncate prompt+completion (tokens).")
    add("--output-dir", type=Path, default=None, help="Where to write (default: the run's dir).")
    add("--beta", type=float, default=None, help="β of the implicit reward (default: the run's).")
    add("--seed", type=int, default=None, help="Sampling seed (default: the run's).")
    add("--accelerator", default=None, help="cpu, gpu or auto.")
    add_group_flags(parser, "eval")
    return parser


def run_evaluation(args: argparse.Namespace, eval_fields: dict) -> tuple[Evaluation, object]:
    """Resolve config, data and models from the command line; evaluate; write the report."""
    from training.eval.loading import build_models, eval_config, load_trained, pick_device
    from training.eval.report import write_report
    from training.inputs.prepare import prepare_inputs

    if not args.model_dir.is_dir():
        raise FileNotFoundError(f"--model-dir {args.model_dir} is not a directory")
    cfg = eval_config(args, eval_fields)
    inputs = prepare_inputs(cfg)
    device = pick_device(cfg.trainer.accelerator)
    trained = load_trained(args.model_dir, inputs.model_path, cfg, device)
    models = build_models(trained, cfg, inputs.model_path)
    evaluation = evaluate(models, inputs, cfg)
    out = args.output_dir or args.model_dir.parent
    metrics = args.model_dir.parent / "metrics.csv"  # the run's training curves, if any
    paths = write_report(
        out,
        evaluation,
        metrics_csv=metrics if metrics.is_file() else None,
        num_examples=cfg.eval.num_examples,
        dropped_rows=inputs.data.dropped,
    )
    return evaluation, paths


def print_report(evaluation: Evaluation, paths) -> None:
    """The before/after table and where the files are."""
    from training.eval.report import format_table

    print()
    print(format_table(evaluation.to_json()))
    print(f"\nreport: {paths.report_md}\neval.json: {paths.eval_json}")
    for plot in paths.plots:
        print(f"plot: {plot}")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    eval_names = {f.name for f in dataclasses.fields(type(FitConfig().eval))}
    eval_fields = {k: v for k, v in vars(args).items() if k in eval_names}
    try:
        evaluation, paths = run_evaluation(args, eval_fields)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print_report(evaluation, paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
