"""What a finished run leaves in ``--output-dir`` and prints.

::

    <output-dir>/
      model/            save_pretrained: full weights, or the LoRA adapter; the tokenizer; a
                        model card, README.md (training.run.model_card)
      model-merged/     with --merge-adapter: adapter merged into the base weights
      config.yaml       the resolved config
      metrics.csv       per-step metrics, trl's names (logs/metrics.csv, copied when a run ends)
      logs/metrics.csv  the same, written every step (training.run.metrics_csv)
      checkpoints/      last.ckpt (atomic) for --resume; while training (or after a stop)
                        also previous.ckpt, the one it replaced
      run.lock          while a run writes here: its pid and host (training.run.ownership)
      eval.json         before / after evaluation (``training.evaluate``; not with --no-evaluate)
      report.md, *.png  the evaluation's report and plots (``training.eval.report``)
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from training.base.cli import config_to_yaml
from training.base.config import FitConfig
from training.base.errors import RunError, replaced_atomically, write_failure, writing
from training.eval.before_after import evaluate
from training.eval.loading import build_models
from training.eval.report import evaluation_table, write_report
from training.run.model_card import write_model_cards

# The folders a run writes into, under --output-dir (each checked when it already exists).
OUTPUT_SUBDIRS = ("checkpoints", "logs", "tensorboard", "model")


def check_output_dir(output_dir: str | Path) -> Path:
    """Create ``output_dir`` and prove it (and its existing sub-folders) writable by writing a
    probe file, before anything is loaded: a read-only or full place fails in a second with a
    ``RunError`` naming it, not after the model and data are loaded."""
    out = Path(output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise RunError(f"--output-dir {out}: exists and is not a directory") from None
    except OSError as err:
        raise write_failure(out, err, "creating --output-dir") from err
    for folder in [out, *(out / d for d in OUTPUT_SUBDIRS if (out / d).is_dir())]:
        _probe_write(folder)
    return out


def _probe_write(folder: Path) -> None:
    """Write, sync and remove a small file in ``folder``; a ``RunError`` if that fails."""
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-check.")
    except OSError as err:
        raise _not_writable(folder, err) from err
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(b"ok")
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        raise _not_writable(folder, err) from err
    finally:
        Path(probe).unlink(missing_ok=True)


def _not_writable(folder: Path, err: OSError) -> RunError:
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return RunError(f"--output-dir {folder}: not writable ({err.strerror.lower()})")
    return write_failure(folder, err, "checking that --output-dir is writable")


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
        # why: peft takes ~1.3 s to import (bitsandbytes with it); only adapter runs need it
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(
            model_path, trust_remote_code=cfg.model.trust_remote_code
        )
        merged = PeftModel.from_pretrained(base, model_dir).merge_and_unload()
        merged.save_pretrained(out / "model-merged")
        tokenizer.save_pretrained(out / "model-merged")
    return model_dir


def save_outputs(cfg: FitConfig, policy, inputs, config_note: str = "") -> None:
    """Model, tokenizer, resolved config, the flat metrics CSV and the model card (rank zero
    only). A failed write (a full disk) is a ``RunError`` naming the file; the checkpoints are
    not touched.
    ``config_note``: YAML comment lines put at the top of config.yaml (a resume's changes)."""
    out = Path(cfg.trainer.output_dir)
    try:
        save_model(cfg, policy, inputs.tokenizer, inputs.model_path)
    except Exception as err:  # safetensors, torch or the OS: whichever layer hit the disk
        raise write_failure(out / "model", err, "saving the trained model") from err
    write_atomic(out / "config.yaml", config_note + config_to_yaml(cfg))
    publish_metrics(out)
    write_model_cards(cfg, inputs)  # written again with the before/after table (evaluate_run)


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: a full disk leaves the
    old file whole and raises a ``RunError`` naming ``path``."""
    with writing(path, f"writing {path.name}"), replaced_atomically(path) as tmp:
        tmp.write_text(text)


def publish_metrics(out: Path) -> None:
    """Copy ``logs/metrics.csv`` (written every step) to ``<out>/metrics.csv``, atomically:
    called when a run ends, successfully or not, so the flat file never loses a step."""
    csv = out / "logs" / "metrics.csv"
    if not csv.is_file():
        return
    target = out / "metrics.csv"
    with writing(target, "copying logs/metrics.csv"), replaced_atomically(target) as tmp:
        shutil.copyfile(csv, tmp)


def evaluate_run(cfg: FitConfig, inputs, policy, reference):
    """Evaluate the trained ``policy`` against the starting model (``training.evaluate``) and
    write eval.json, report.md and the plots. ``reference``: the training's reference source,
    whose frozen model is reused. Returns (Evaluation, ReportPaths)."""
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
    write_model_cards(cfg, inputs, evaluation.to_json())
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
    """The before/after table (when the run was evaluated) and a one-line summary with where
    the outputs are (always)."""
    if result.evaluation is not None:
        print("\n" + evaluation_table(result.evaluation.to_json()))
    elif result.before or result.after:
        print("\n" + validation_table(result.before, result.after))
    step = result.last_step
    print(
        f"\ndone: loss {step.get('loss', float('nan')):.4f}, "
        f"rewards/accuracies {step.get('rewards/accuracies', float('nan')):.2f}, "
        f"{result.seconds_per_step:.3f} s/step; model in {result.model_dir}, "
        f"metrics in {result.output_dir / 'metrics.csv'}"
    )
    if result.evaluation is not None:
        print(f"evaluation: {result.evaluation.timing()}")
    if result.report is not None:
        print(f"report: {result.report.report_md}\neval.json: {result.report.eval_json}")
        for plot in result.report.plots:
            print(f"plot: {plot}")
