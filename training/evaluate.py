"""``python -m training.evaluate``: the policy before training vs after, on held-out data.

``training.fit`` runs this at the end of every run (unless ``--no-evaluate``); run it alone to
evaluate a trained model directory again, with other sampling settings or another judge::

    python -m training.evaluate                                   # runs/dpo (the fit default)
    python -m training.evaluate --model-dir runs/dpo/model --num-prompts 200 --judge rule
    python -m training.evaluate --model-dir out/model --reference Qwen/Qwen2-0.5B \\
        --eval-file heldout.jsonl --judge ./my-reward-model

What is measured: ``training.eval.before_after``.

Writes ``eval.json``, ``report.md`` and PNG plots to the output directory (``training.eval.report``).
The models and data default to the run's ``config.yaml`` beside ``--model-dir``: the reference is
the run's ``--ref-model``, else its starting model; a LoRA adapter directory is loaded on it.
Without a ``config.yaml``, ``--reference`` (or an adapter's base) and ``--dataset`` or
``--eval-file`` must say what to evaluate against. A failure is one ``error:`` line, exit 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path

from training.base.cli import add_group_flags
from training.base.config import ACCELERATORS, FitConfig
from training.base.errors import report_failure
from training.eval.before_after import Evaluation, evaluate
from training.eval.loading import build_models, eval_config, load_trained, pick_device
from training.eval.report import evaluation_table, write_report
from training.inputs.model_checks import check_accelerator, check_trained_model_dir
from training.inputs.prepare import prepare_inputs
from training.run.outputs import check_output_dir
from training.run.quiet import quiet_foreign_warnings


def build_parser() -> argparse.ArgumentParser:
    """``python -m training.evaluate``'s flags; the evaluation settings are ``EvalConfig``'s."""
    parser = argparse.ArgumentParser(
        prog="python -m training.evaluate",
        description="Evaluate a DPO-trained model against its starting model on held-out data.",
        argument_default=argparse.SUPPRESS,
        allow_abbrev=False,
    )
    add = parser.add_argument
    add("--model-dir", type=Path, default=Path("runs/dpo/model"), help="Trained model or adapter.")
    add("--reference", default=None, help="Starting / reference model (default: the run's).")
    add("--dataset", default=None, help="Preference data (default: the run's, or embedded).")
    add("--eval-file", default=None, help="Held-out preference file (overrides --dataset's split).")
    add("--eval-split", default=None, help="Split of --dataset to evaluate on.")
    add("--eval-fraction", type=float, default=None, help="Held-out share when no split is given.")
    add(
        "--eval-max-pairs",
        type=lambda text: None if text.lower() == "none" else int(text),
        help="At most this many held-out pairs (none = no cap; default: the run's).",
    )
    add("--max-length", type=int, default=None, help="Truncate prompt+completion (tokens).")
    add("--output-dir", type=Path, default=None, help="Where to write (default: the run's dir).")
    add("--beta", type=float, default=None, help="β of the implicit reward (default: the run's).")
    add("--seed", type=int, default=None, help="Sampling seed (default: the run's).")
    add("--accelerator", default=None, choices=ACCELERATORS, help="Device to evaluate on.")
    add("--debug", action="store_true", help="On a failure, show the full traceback.")
    add_group_flags(parser, "eval")
    return parser


def run_evaluation(args: argparse.Namespace, eval_fields: dict) -> tuple[Evaluation, object]:
    """Resolve config, data and models from the command line; evaluate; write the report."""
    if not args.model_dir.is_dir():
        raise FileNotFoundError(f"--model-dir {args.model_dir} is not a directory")
    check_trained_model_dir(args.model_dir)
    cfg = eval_config(args, eval_fields)
    check_accelerator(cfg.trainer.accelerator)
    out = args.output_dir or args.model_dir.parent
    check_output_dir(out)  # a read-only place fails now, not after the evaluation
    quiet_foreign_warnings(cfg.lora.load_in_4bit)
    inputs = prepare_inputs(cfg)
    device = pick_device(cfg.trainer.accelerator)
    trained = load_trained(args.model_dir, inputs.model_path, cfg, device)
    models = build_models(trained, cfg, inputs.model_path)
    evaluation = evaluate(models, inputs, cfg)
    metrics = args.model_dir.parent / "metrics.csv"  # the run's training curves, if any
    paths = write_report(
        out,
        evaluation,
        metrics_csv=metrics if metrics.is_file() else None,
        num_examples=cfg.eval.num_examples,
        validation=evaluation.validation(),
        dropped_rows=inputs.data.dropped,
    )
    return evaluation, paths


def print_report(evaluation: Evaluation, paths) -> None:
    """The before/after table and where the files are."""
    print()
    print(evaluation_table(evaluation.to_json()))
    print(f"\nevaluation: {evaluation.timing()}")
    print(f"report: {paths.report_md}\neval.json: {paths.eval_json}")
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
    except Exception as err:
        return report_failure(err, getattr(args, "debug", False))
    print_report(evaluation, paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
