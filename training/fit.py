"""``python -m training.fit``: train a causal LM with DPO, then evaluate before vs after.

With no arguments it runs the embedded default on CPU (a small Llama-style model, a tokenizer
trained offline and a generated preference task, all built and cached locally). Point it at
your own model and data with ``--model`` and ``--dataset``; ``--help`` lists every option,
``--print-config`` shows the resolved configuration.

    python -m training.fit
    python -m training.fit --model ./my-model --dataset prefs.jsonl --lora --max-steps 200
    python -m training.fit --config run.yaml --beta 0.2 --loss-type sigmoid sft --loss-weights 1 0.2
"""

from __future__ import annotations

import logging
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from dpo_core.rows import DataError
from training.inputs.data_module import PreferenceDataModule
from training.inputs.model_loading import build_reference, load_policy
from training.inputs.precompute import attach_precomputed_reference, resolve_precompute
from training.inputs.prepare import RunInputs, prepare_inputs
from training.run.callbacks import AtomicCheckpointIO, StepProgressBar, StepTimer
from training.run.cli import config_to_yaml, resolve_config
from training.run.config import FitConfig
from training.run.metrics_csv import read_rows as metrics_csv_rows
from training.run.metrics_csv import restore_earlier_rows
from training.run.module import DPOModule
from training.run.outputs import evaluate_run, save_outputs
from training.run.quiet import quiet_foreign_warnings

log = logging.getLogger("training.fit")


@dataclass
class FitResult:
    """Where a finished run put its outputs, and its headline numbers.

    ``before`` / ``after`` are the held-out metrics with trl's ``eval_*`` names, from the same
    pass as the evaluation (``evaluation``, written to eval.json); empty without one.
    """

    output_dir: Path
    model_dir: Path
    before: dict[str, float]
    after: dict[str, float]
    last_step: dict[str, float]
    seconds_per_step: float
    history: list[dict[str, float]]
    policy: object = None
    reference: object = None  # the dpo_core.reference source trained against (None: precomputed)
    evaluation: object = None  # training.eval.before_after.Evaluation, when evaluated
    report: object = None  # training.eval.report.ReportPaths: eval.json, report.md, plots
    step_seconds: list[float] = field(default_factory=list)  # each optimizer step's wall time


def total_optimizer_steps(cfg: FitConfig, n_train: int) -> int:
    """``max_steps`` if set, else epochs x ceil(batches per device / accumulation)."""
    if cfg.trainer.max_steps > 0:
        return cfg.trainer.max_steps
    per_step = cfg.trainer.pairs_per_batch
    batches = math.ceil(n_train / per_step)
    return cfg.trainer.num_train_epochs * math.ceil(
        batches / cfg.trainer.gradient_accumulation_steps
    )


def epochs_needed(cfg: FitConfig, n_train: int, total_steps: int) -> int:
    """Epochs that ``total_steps`` optimizer steps span (shown by the progress bar)."""
    per_step = cfg.trainer.pairs_per_batch
    steps_per_epoch = math.ceil(
        math.ceil(n_train / per_step) / cfg.trainer.gradient_accumulation_steps
    )
    return max(1, math.ceil(total_steps / max(1, steps_per_epoch)))


def make_trainer(
    cfg: FitConfig,
    total_steps: int,
    epochs: int,
    timer: StepTimer,
    extra_callbacks: list[L.Callback] | None = None,
) -> L.Trainer:
    """The Lightning Trainer: loggers, checkpoints, clipping, accumulation, strategy."""
    out = Path(cfg.trainer.output_dir)
    # every step on disk, so that an interrupted run's file holds all the steps it finished
    loggers = [CSVLogger(save_dir=str(out), name="logs", version="", flush_logs_every_n_steps=1)]
    try:
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(save_dir=str(out), name="tensorboard", version=""))
    except (ImportError, ModuleNotFoundError):
        pass
    callbacks: list[L.Callback] = [timer, StepProgressBar(total_steps), *(extra_callbacks or [])]
    if cfg.trainer.save_every_n_steps > 0:  # 0 = no checkpoints (e.g. parity runs)
        callbacks.append(
            ModelCheckpoint(
                dirpath=out / "checkpoints",
                every_n_train_steps=cfg.trainer.save_every_n_steps,
                save_last=True,
                save_top_k=0,
            )
        )
    return L.Trainer(
        max_steps=total_steps,
        max_epochs=epochs,
        accumulate_grad_batches=cfg.trainer.gradient_accumulation_steps,
        gradient_clip_val=cfg.optim.max_grad_norm or None,
        gradient_clip_algorithm="norm",
        accelerator=cfg.trainer.accelerator,
        devices=cfg.trainer.devices,
        strategy=cfg.trainer.strategy,
        precision=cfg.trainer.precision,
        logger=loggers,
        callbacks=callbacks,
        enable_checkpointing=cfg.trainer.save_every_n_steps > 0,
        plugins=[AtomicCheckpointIO()],
        use_distributed_sampler=False,  # the data module shards rows itself, in order
        log_every_n_steps=1,
        num_sanity_val_steps=0,
        val_check_interval=cfg.trainer.eval_every_n_steps,
        check_val_every_n_epoch=None if cfg.trainer.eval_every_n_steps else 1,
        limit_val_batches=1.0 if cfg.trainer.eval_every_n_steps else 0,
        enable_model_summary=False,
        default_root_dir=str(out),
    )


def train(
    cfg: FitConfig, inputs: RunInputs, callbacks: list[L.Callback] | None = None
) -> FitResult:
    """Build policy, reference and Lightning objects from ``inputs``; fit; save; evaluate.

    ``callbacks`` are extra Lightning callbacks for the training run (e.g. a benchmark's meter).
    """
    out = Path(cfg.trainer.output_dir)
    total = total_optimizer_steps(cfg, len(inputs.data.train))
    cfg = resolve_precompute(cfg, len(inputs.data.train), total)
    policy = load_policy(inputs.model_path, cfg)
    if cfg.dpo.precompute_ref_log_probs:
        reference = attach_precomputed_reference(policy, inputs, cfg)
    else:
        reference = build_reference(policy, cfg)
    data = PreferenceDataModule(inputs.data, inputs.tokenizer, cfg)
    module = DPOModule(policy, reference, cfg, total_steps=total)
    last = out / "checkpoints" / "last.ckpt"
    resume = cfg.trainer.resume and last.exists()
    if cfg.trainer.resume and not resume:
        log.warning("--resume: no checkpoint at %s; starting from the beginning", last)
    metrics_csv = out / "logs" / "metrics.csv"
    earlier_rows = metrics_csv_rows(metrics_csv) if resume else []  # the logger deletes the file
    timer = StepTimer()
    epochs = epochs_needed(cfg, len(inputs.data.train), total)
    trainer = make_trainer(cfg, total, epochs, timer, callbacks)
    module.reference_to(trainer.strategy.root_device)
    trainer.fit(module, datamodule=data, ckpt_path=str(last) if resume else None)
    if earlier_rows and trainer.is_global_zero:
        restore_earlier_rows(metrics_csv, earlier_rows)
    model_dir = out / "model"
    evaluation = report = None
    before: dict[str, float] = {}
    after: dict[str, float] = {}
    if trainer.is_global_zero:
        save_outputs(cfg, policy, inputs)
        if cfg.trainer.evaluate and inputs.data.heldout:
            evaluation, report = evaluate_run(cfg, inputs, policy, reference)
            before, after = evaluation.before.trl_metrics, evaluation.after.trl_metrics
    return FitResult(
        out,
        model_dir,
        before,
        after,
        module.last_logged,
        timer.median(),
        module.history,
        policy,
        reference,
        evaluation,
        report,
        step_seconds=list(timer.durations),
    )


def run(cfg: FitConfig, explicit: set[str] | None = None) -> FitResult:
    """The whole job for a resolved config. On the embedded default, the fields the user did not
    set (``explicit``: names set by flag or YAML) take the embedded task's recipe."""
    if cfg.model.model is None and cfg.data.dataset is None:
        from training.inputs.prepare import apply_embedded_recipe

        cfg = apply_embedded_recipe(cfg, explicit or set())
    L.seed_everything(cfg.trainer.seed, verbose=False)
    inputs = prepare_inputs(cfg)
    result = train(cfg, inputs)
    if result.before or result.after or result.evaluation:
        from training.run.outputs import print_summary

        print_summary(result)
    return result


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("httpx", "urllib3", "lightning.pytorch.utilities.rank_zero"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        cfg, args = resolve_config(argv)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if getattr(args, "print_config", False):
        print(config_to_yaml(cfg), end="")
        return 0
    quiet_foreign_warnings(cfg.lora.load_in_4bit)
    try:
        run(cfg, explicit=args.explicit)
    except (DataError, FloatingPointError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
