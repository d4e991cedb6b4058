"""What a finished run leaves in ``--output-dir`` and prints.

::

    <output-dir>/
      model/            save_pretrained: full weights, or the LoRA adapter; the tokenizer
      model-merged/     with --merge-adapter: adapter merged into the base weights
      config.yaml       the resolved config
      metrics.csv       per-step metrics, trl's names (from Lightning's CSVLogger)
      checkpoints/      Lightning checkpoints (atomic), for --resume
      eval.json         before / after evaluation (``training.evaluate``; not with --no-evaluate)
      report.md, *.png  the evaluation's report and plots (``training.eval.report``)
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from training.run.cli import config_to_yaml
from training.run.config import FitConfig

SUMMARY_KEYS = (
    # trl's names: rewards/accuracies is trl's strict ">" (a tie counts 0), not the evaluation's
    # preference accuracy (a tie counts 1/2, dpo_core.evaluation).
    ("eval_rewards/accuracies", "rewards/accuracies"),
    ("eval_rewards/margins", "rewards/margins"),
    ("eval_rewards/chosen", "rewards/chosen"),
    ("eval_rewards/rejected", "rewards/rejected"),
    ("eval_logps/chosen", "logps/chosen"),
    ("eval_logps/rejected", "logps/rejected"),
    ("eval_loss", "loss"),
)


def save_model(cfg: FitConfig, policy: torch.nn.Module, tokenizer, model_path: str) -> Path:
    """``save_pretrained`` the policy (or its adapter) and tokenizer to ``<out>/model``; with
    ``--merge-adapter`` also the merged full model to ``<out>/model-merged`` (the base is
    reloaded unquantized, so a QLoRA adapter merges into full-precision weights)."""
    out = Path(cfg.trainer.output_dir)
    model_dir = out / "model"
    policy.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    if cfg.lora.lora and cfg.lora.merge_adapter:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(
            model_path, trust_remote_code=cfg.model.trust_remote_code
        )
        merged = PeftModel.from_pretrained(base, model_dir).merge_and_unload()
        merged.save_pretrained(out / "model-merged")
        tokenizer.save_pretrained(out / "model-merged")
    return model_dir


def save_outputs(cfg: FitConfig, policy, inputs) -> None:
    """Model, tokenizer, resolved config and the flat metrics CSV (rank zero only)."""
    out = Path(cfg.trainer.output_dir)
    save_model(cfg, policy, inputs.tokenizer, inputs.model_path)
    (out / "config.yaml").write_text(config_to_yaml(cfg))
    csv = out / "logs" / "metrics.csv"
    if csv.exists():
        shutil.copyfile(csv, out / "metrics.csv")


def evaluate_run(cfg: FitConfig, inputs, policy, reference):
    """Evaluate the trained ``policy`` against the starting model (``training.evaluate``) and
    write eval.json, report.md and the plots. ``reference``: the training's reference source,
    whose frozen model is reused. Returns (Evaluation, ReportPaths)."""
    from training.eval.before_after import evaluate
    from training.eval.loading import build_models
    from training.eval.report import write_report

    live = getattr(reference, "model", None)
    models = build_models(policy, cfg, inputs.model_path, live_copy=live)
    evaluation = evaluate(models, inputs, cfg)
    out = Path(cfg.trainer.output_dir)
    paths = write_report(
        out,
        evaluation,
        metrics_csv=out / "metrics.csv",
        num_examples=cfg.eval.num_examples,
        validation=evaluation.validation(),
        dropped_rows=inputs.data.dropped,
    )
    return evaluation, paths


def validation_table(before: dict, after: dict) -> str:
    """A before/after table of the held-out metrics the training loop logs (trl's ``eval_*``)."""
    lines = [f"{'held-out metric':<22}{'before':>12}{'after':>12}", "-" * 46]
    for key, label in SUMMARY_KEYS:
        if key in before or key in after:
            b, a = before.get(key, float("nan")), after.get(key, float("nan"))
            lines.append(f"{label:<22}{b:>12.4f}{a:>12.4f}")
    return "\n".join(lines)


def print_summary(result) -> None:
    """The before/after table and a one-line summary with where the outputs are."""
    print()
    if result.evaluation is not None:
        from training.eval.report import evaluation_table

        print(evaluation_table(result.evaluation.to_json()))
    else:
        print(validation_table(result.before, result.after))
    step = result.last_step
    print(
        f"\ndone: loss {step.get('loss', float('nan')):.4f}, "
        f"rewards/accuracies {step.get('rewards/accuracies', float('nan')):.2f}, "
        f"{result.seconds_per_step:.3f} s/step; model in {result.model_dir}, "
        f"metrics in {result.output_dir / 'metrics.csv'}"
    )
    if result.evaluation is not None:
        print(f"evaluation: {result.evaluation.seconds:.0f} s")
    if result.report is not None:
        print(f"report: {result.report.report_md}\neval.json: {result.report.eval_json}")
        for plot in result.report.plots:
            print(f"plot: {plot}")
