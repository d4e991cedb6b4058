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

import sys

from training.base.cli import answer_help, config_to_yaml, resolve_config

if __name__ == "__main__":  # --help answers before Lightning, transformers and peft load
    answer_help(sys.argv[1:])

import logging
import math
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L

from training.base.config import FitConfig, changed_fields
from training.base.errors import RunError, report_failure
from training.inputs.data_module import PreferenceDataModule
from training.inputs.logits_guard import check_run_models
from training.inputs.model_checks import check_accelerator, check_model_source
from training.inputs.model_loading import build_reference, load_policy
from training.inputs.precompute import attach_precomputed_reference, resolve_precompute
from training.inputs.prepare import RunInputs, apply_embedded_recipe, prepare_inputs
from training.run.callbacks import (
    PREVIOUS_NAME,
    AtomicCheckpointIO,
    MemoryReport,
    StepCheckpoint,
    StepProgressBar,
    StepTimer,
)
from training.run.loggers import make_loggers
from training.run.module import DPOModule
from training.run.nan_stop import NonFiniteStop, stop_message
from training.run.outputs import (
    check_output_dir,
    evaluate_run,
    print_summary,
    publish_metrics,
    save_outputs,
    write_atomic,
)
from training.run.ownership import claim_output_dir, output_lock
from training.run.quiet import quiet_foreign_warnings
from training.run.resume import ResumePlan, plan_resume, run_record
from training.run.sharded_checkpoint import remove_checkpoint
from training.run.sharding import check_strategy, gathered, is_sharded, lightning_strategy
from training.run.signals import Interrupted, SignalStop, exit_code, take_over_signals
from training.run.threads import apply_thread_layout

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


def steps_per_epoch(cfg: FitConfig, n_train: int) -> int:
    """Optimizer steps in one epoch: ceil(batches per process / accumulation), a batch being
    ``batch_size`` pairs on each of devices x num_nodes processes."""
    batches = math.ceil(n_train / cfg.trainer.pairs_per_batch)
    return math.ceil(batches / cfg.trainer.gradient_accumulation_steps)


def total_optimizer_steps(cfg: FitConfig, n_train: int) -> int:
    """``max_steps`` if set, else transformers' ``Trainer.set_initial_training_values`` rule:
    ceil(num_train_epochs x steps per epoch) (3.0 epochs: 3 whole ones; 1.5 epochs of 8 steps:
    12 steps; the same float product, so the same ceiling)."""
    if cfg.trainer.max_steps > 0:
        return cfg.trainer.max_steps
    return math.ceil(cfg.trainer.num_train_epochs * steps_per_epoch(cfg, n_train))


def epochs_note(cfg: FitConfig, n_train: int, total: int) -> str | None:
    """What a fractional ``--num-train-epochs`` trains, in a line (None when it does not apply:
    ``--max-steps`` set, or a whole number of epochs)."""
    epochs = cfg.trainer.num_train_epochs
    if cfg.trainer.max_steps > 0 or float(epochs).is_integer():
        return None
    per_epoch = steps_per_epoch(cfg, n_train)
    return (
        f"--num-train-epochs {epochs}: {total} optimizer steps = ceil({epochs} x {per_epoch} "
        "steps an epoch), as transformers' Trainer counts; the last epoch stops part way"
    )


def epochs_needed(cfg: FitConfig, n_train: int, total_steps: int) -> int:
    """Epochs that ``total_steps`` optimizer steps span (shown by the progress bar)."""
    return max(1, math.ceil(total_steps / max(1, steps_per_epoch(cfg, n_train))))


def make_trainer(
    cfg: FitConfig,
    total_steps: int,
    epochs: int,
    timer: StepTimer,
    extra_callbacks: list[L.Callback] | None = None,
    earlier_rows: list[dict] | None = None,
    signals: SignalStop | None = None,
) -> L.Trainer:
    """The Lightning Trainer: loggers, checkpoints, clipping, accumulation, strategy.
    ``earlier_rows``: the metrics rows a resumed run continues (``training.run.metrics_csv``);
    ``signals``: the run's SIGTERM / SIGINT handling (``training.run.signals``)."""
    out = Path(cfg.trainer.output_dir)
    # metrics.csv gets every step on disk (an interrupted run's file holds all it finished),
    # then each logger --report-to names (training.run.loggers)
    loggers = make_loggers(cfg, earlier_rows)
    signals = signals or SignalStop()
    callbacks: list[L.Callback] = [timer, StepProgressBar(total_steps), MemoryReport()]
    callbacks += extra_callbacks or []
    # every = 0: no checkpoints (e.g. parity runs), except the one a signal's stop writes
    every = cfg.trainer.save_every_n_steps
    callbacks += [signals, StepCheckpoint(out / "checkpoints", every, signals)]
    trainer = L.Trainer(
        max_steps=total_steps,
        max_epochs=epochs,
        accumulate_grad_batches=cfg.trainer.gradient_accumulation_steps,
        gradient_clip_val=cfg.optim.max_grad_norm or None,
        gradient_clip_algorithm="norm",
        accelerator=cfg.trainer.accelerator,
        devices=cfg.trainer.devices,
        num_nodes=cfg.trainer.num_nodes,
        strategy=lightning_strategy(cfg),
        precision=cfg.trainer.precision,
        logger=loggers,
        callbacks=callbacks,
        enable_checkpointing=True,
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
    take_over_signals(trainer)
    return trainer


def check_world_size(trainer: L.Trainer, cfg: FitConfig) -> None:
    """The step count, epochs and learning-rate schedule were sized for ``--devices`` x
    ``--num-nodes`` processes (``TrainerConfig.world_size``); a ``RunError`` if Lightning runs
    another number (``--devices -1`` on several GPUs). Under torchrun or SLURM, Lightning itself
    refuses a ``--devices`` / ``--num-nodes`` that disagrees with the launcher's world size."""
    if trainer.world_size != cfg.trainer.world_size:
        raise RunError(
            f"Lightning runs {trainer.world_size} processes, but --devices {cfg.trainer.devices} "
            f"x --num-nodes {cfg.trainer.num_nodes} = {cfg.trainer.world_size}, which the step "
            "count and learning-rate schedule assume: give --devices as the number per machine"
        )


def train(
    cfg: FitConfig,
    inputs: RunInputs,
    callbacks: list[L.Callback] | None = None,
    signals: SignalStop | None = None,
) -> FitResult:
    """Build policy, reference and Lightning objects from ``inputs``; fit; save; evaluate.

    ``callbacks`` are extra Lightning callbacks for the training run (e.g. a benchmark's meter).
    A ``--resume`` is checked against the checkpoint's config and data before the model loads.
    ``signals``: the run's SIGTERM / SIGINT handling; a stop raises ``Interrupted`` with what was
    kept (``training.run.signals``).
    """
    signals = signals or SignalStop()
    out = Path(cfg.trainer.output_dir)
    total = total_optimizer_steps(cfg, len(inputs.data.train))
    if note := epochs_note(cfg, len(inputs.data.train), total):
        log.info("%s", note)
    cfg = resolve_precompute(cfg, len(inputs.data.train), total)
    record = run_record(cfg, inputs)
    plan = plan_resume(cfg, record)
    policy = load_policy(inputs.model_path, cfg)
    if cfg.dpo.precompute_ref_log_probs:
        reference = attach_precomputed_reference(policy, inputs, cfg)
    else:
        reference = build_reference(policy, cfg)
    check_run_models(policy, reference, cfg)
    data = PreferenceDataModule(inputs.data, inputs.tokenizer, cfg)
    module = DPOModule(policy, reference, cfg, total, record, resume_changes=len(plan.changes))
    timer = StepTimer()
    epochs = epochs_needed(cfg, len(inputs.data.train), total)
    trainer = make_trainer(cfg, total, epochs, timer, callbacks, plan.earlier_rows, signals)
    check_world_size(trainer, cfg)
    if not is_sharded(cfg):  # a sharded reference is placed by fully_shard, shard by shard
        module.reference_to(trainer.strategy.root_device)
    with signals.deferred():
        fit_module(trainer, module, data, plan, cfg)
    last_step = check_trained(module, plan, total) or module.last_logged
    if is_sharded(cfg):  # every process gathers; rank 0 saves and evaluates an ordinary model
        policy = gathered(
            policy, lambda: load_policy(inputs.model_path, cfg), trainer.is_global_zero
        )
        reference = None  # the evaluation loads the starting model itself
    evaluation = report = None
    before: dict[str, float] = {}
    after: dict[str, float] = {}
    if trainer.is_global_zero:
        with signals.deferred():  # model/ is written whole, or not at all
            save_outputs(cfg, policy, inputs, plan.config_note())
        signals.check("after the last step (model/ is saved; the evaluation did not run)")
        if cfg.trainer.evaluate and inputs.data.heldout:
            signals.phase = "during the evaluation (model/ is saved)"
            evaluation, report = evaluate_run(cfg, inputs, policy, reference)
            before, after = evaluation.before.trl_metrics, evaluation.after.trl_metrics
    return FitResult(
        out,
        out / "model",
        before,
        after,
        last_step,
        timer.median(),
        module.history,
        policy,
        reference,
        evaluation,
        report,
        step_seconds=list(timer.durations),
    )


def fit_module(
    trainer: L.Trainer, module: DPOModule, data, plan: ResumePlan, cfg: FitConfig
) -> None:
    """``trainer.fit``, from ``plan``'s checkpoint when resuming. A non-finite stop becomes a
    ``RunError`` saying which checkpoint is kept (``training.run.nan_stop``); a finished run
    keeps ``last.ckpt`` alone; a signal's stop also writes config.yaml; however training ends,
    ``metrics.csv`` gets every step logged."""
    checkpoint = str(plan.checkpoint) if plan.checkpoint else None
    out = Path(cfg.trainer.output_dir)
    try:
        trainer.fit(module, datamodule=data, ckpt_path=checkpoint)
        if trainer.is_global_zero:  # only a stopped run may need the one before last.ckpt
            remove_checkpoint(out / "checkpoints" / PREVIOUS_NAME)  # a file, or sharded
    except NonFiniteStop as stop:
        raise RunError(stop_message(stop, cfg, trainer.is_global_zero)) from stop
    except Interrupted:
        if trainer.is_global_zero:  # what the resume needs besides the checkpoint
            write_atomic(out / "config.yaml", plan.config_note() + config_to_yaml(cfg))
        raise
    finally:
        if trainer.is_global_zero:
            try:
                publish_metrics(Path(cfg.trainer.output_dir))
            except RunError as err:  # do not hide the failure that ended training
                log.error("%s", err)


def check_trained(module: DPOModule, plan: ResumePlan, total: int) -> dict[str, float]:
    """A run that trained no step: fine when nothing was asked (``--resume`` of a checkpoint
    already at the last step: the outputs are written again from it; returns its last metrics
    row for the summary), else a ``RunError`` saying why. Returns {} when steps were trained."""
    if module.history:
        return {}
    if plan.checkpoint is not None and plan.step == total:
        log.info("nothing to train: %s is at step %d of %d", plan.checkpoint, plan.step, total)
        rows = [r for r in plan.earlier_rows or [] if r.get("loss") not in (None, "")]
        return {k: float(v) for k, v in rows[-1].items() if v not in (None, "")} if rows else {}
    if plan.checkpoint is not None and plan.step > total:
        raise RunError(
            f"--resume: {plan.checkpoint} is at step {plan.step}, past the {total} steps asked "
            "(--max-steps / --num-train-epochs): nothing was trained"
        )
    if plan.checkpoint is not None:  # e.g. a checkpoint saved after its epoch loop had ended
        raise RunError(
            f"--resume: {plan.checkpoint} (step {plan.step}) trained none of the {total - plan.step} "
            "steps left: Lightning found its loop finished; start again with --overwrite-output-dir"
        )
    raise RunError(f"trained 0 of {total} optimizer steps: no training batch was produced")


def check_before_loading(cfg: FitConfig) -> None:
    """What can fail without loading anything, checked first: the model paths exist and look
    like models, a GPU is visible if asked for (nothing is written if not), the strategy can run
    (``training.run.sharding.check_strategy``), then the output
    directory is writable (``RunError`` otherwise)."""
    for flag, name in (("--model", cfg.model.model), ("--ref-model", cfg.model.ref_model)):
        if name:
            check_model_source(name, flag)
    adapter = cfg.model.adapter
    if adapter and not Path(adapter).expanduser().exists():
        raise RunError(f"--adapter {adapter}: no such directory")
    check_accelerator(cfg.trainer.accelerator)
    check_strategy(cfg)
    check_output_dir(cfg.trainer.output_dir)


def run(
    cfg: FitConfig, explicit: set[str] | None = None, signals: SignalStop | None = None
) -> FitResult:
    """The whole job for a resolved config. On the embedded default, the fields the user did not
    set (``explicit``: names set by flag or YAML; None: those that differ from their defaults)
    take the embedded task's recipe. The output
    directory is locked for the run and must not hold another run (``training.run.ownership``).
    """
    if cfg.model.model is None and cfg.data.dataset is None:
        explicit = changed_fields(cfg) if explicit is None else explicit
        cfg = apply_embedded_recipe(cfg, explicit)
    check_before_loading(cfg)
    apply_thread_layout(cfg)
    with output_lock(Path(cfg.trainer.output_dir)):
        claim_output_dir(cfg)
        L.seed_everything(cfg.trainer.seed, verbose=False)
        inputs = prepare_inputs(cfg)
        result = train(cfg, inputs, signals=signals)
    print_summary(result)
    return result


def stopped_message(stop: Interrupted, cfg: FitConfig, argv: list[str]) -> str:
    """The one line of a run stopped by a signal: what happened, what is kept, what to run."""
    out = Path(cfg.trainer.output_dir)
    last = out / "checkpoints" / "last.ckpt"
    args = argv if "--resume" in argv else [*argv, "--resume"]
    command = shlex.join(["python", "-m", "training.fit", *args])
    if stop.step is not None and last.exists():  # a file, or a sharded directory
        kept = f"{last} (step {stop.step}), config.yaml and metrics.csv written, no model/"
        return f"stopped by {stop.name} {stop.when}: {kept}; resume with: {command}"
    if last.exists():
        return f"stopped by {stop.name} {stop.when}; resume from {last} with: {command}"
    again = shlex.join(["python", "-m", "training.fit", *argv])
    return f"stopped by {stop.name} {stop.when}: nothing to resume; start again with: {again}"


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
    signals = SignalStop()
    try:
        with signals.installed():
            run(cfg, explicit=args.explicit, signals=signals)
    except Interrupted as stop:
        argv = sys.argv[1:] if argv is None else list(argv)
        print(f"\n{stopped_message(stop, cfg, argv)}", file=sys.stderr)
        return exit_code(stop.signum)
    except Exception as err:
        return report_failure(err, getattr(args, "debug", False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
