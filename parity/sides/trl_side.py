"""The trl side of a parity case: Hugging Face trl 1.16's ``DPOTrainer`` run deterministically.

Settings (notes §4): float32 (``bf16=False``: trl turns autocast on by default), no gradient
checkpointing, a sequential sampler (the default shuffles), a log entry every step (the default
averages 10), the learning rate of the case (the default is 1e-6), AdamW fused, linear decay,
clipping at ``max_grad_norm``, dropout disabled, CPU, no saving, no reporting. The reference is
passed explicitly, loaded from its own directory: with ``ref_model=None`` trl reloads the policy
from disk, so a reference that differs would be silently ignored.
"""

from __future__ import annotations

import dataclasses
import pathlib

from datasets import Dataset
from transformers import PrinterCallback
from trl import DPOConfig, DPOTrainer

from dpo_core.settings import LossSettings
from parity.sides.cases import ParityCase
from parity.sides.models import (
    load_adapter_init,
    load_model,
    lora_config,
    nudge_one_ulp,
    trained_weights,
)
from parity.sides.result import TOKEN_FIELDS, RunResult
from parity.sides.workspace import prepare_workspace, training_rows
from training.inputs.four_bit import packed_layers


def trl_loss_args(settings: LossSettings) -> dict:
    """trl ``DPOConfig`` keyword arguments for the objective ``settings``: the same names and
    values (``LossSettings`` uses trl's), less ``reference_free``, which trl 1.16 lacks
    (``parity.sides.cases.comparable`` reports such cases instead of running them)."""
    args = dataclasses.asdict(settings)
    del args["reference_free"]
    return args


def trl_config(case: ParityCase, output_dir: pathlib.Path, **overrides):
    """The ``DPOConfig`` of ``case`` with every setting that changes a number pinned.

    ``overrides`` replace any of those settings (the benchmark runs trl at its own defaults,
    ``bf16=True, gradient_checkpointing=True``, with them).
    """
    settings = dict(
        output_dir=str(output_dir),
        seed=case.seed,
        use_cpu=case.device == "cpu",
        bf16=case.precision == "bf16-mixed",
        fp16=False,
        gradient_checkpointing=False,
        train_sampling_strategy="sequential",
        per_device_train_batch_size=case.batch_size,
        gradient_accumulation_steps=case.grad_accum,
        max_steps=case.steps,
        learning_rate=case.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=case.warmup_steps,
        optim="adamw_torch_fused",
        weight_decay=case.weight_decay,
        max_grad_norm=case.max_grad_norm,
        disable_dropout=True,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        max_length=case.max_length,
        truncation_mode=case.truncation_mode,
        precompute_ref_log_probs=case.precompute_ref,
        **trl_loss_args(case.loss),
    )
    return DPOConfig(**{**settings, **overrides})


def build_trainer(case: ParityCase, workdir: pathlib.Path, output_dir: pathlib.Path, **overrides):
    """trl's ``DPOTrainer`` for ``case``, ready to train, and the number of rows it was given.

    The policy and reference are loaded from the files ``prepare_workspace`` keeps under
    ``workdir``. With LoRA, trl wraps the policy itself (``peft_config``); the adapter is then
    overwritten with the shared initial adapter, and the explicit reference stays in use (trl
    only switches to "adapter disabled" when ``ref_model`` is None). With 4-bit weights trl casts
    the adapter to bfloat16 in ``__init__`` (QLoRA paper), so the shared adapter is loaded
    rounded to bfloat16 and trained in bfloat16. ``overrides`` go to ``trl_config``.
    """
    ws = prepare_workspace(case, pathlib.Path(workdir))
    rows = training_rows(case, ws)
    trainer = DPOTrainer(
        model=load_model(ws.policy_dir, case),
        ref_model=load_model(ws.reference_dir, case),
        args=trl_config(case, output_dir, **overrides),
        train_dataset=Dataset.from_list(rows),
        processing_class=ws.tokenizer(),
        peft_config=lora_config(case) if case.lora else None,
    )
    if len(trainer.train_dataset) == 0:
        raise ValueError(
            f"trl dropped all {len(rows)} rows: every prompt fills max_length={case.max_length}"
        )
    trainer.remove_callback(PrinterCallback)  # it prints every log dict to stdout
    if ws.adapter_init_dir is not None:
        load_adapter_init(trainer.model, ws.adapter_init_dir)
    return trainer, len(rows)


def run_trl(case: ParityCase, workdir: pathlib.Path, perturb_seed: int | None = None) -> RunResult:
    """Train ``case`` with trl's ``DPOTrainer`` and collect what ``parity.check.compare`` compares.

    ``perturb_seed``: first move every trainable weight by one ulp, up or down as this seed
    draws (``parity.sides.models.nudge_one_ulp``; after the shared adapter is loaded, right before
    training): a run of the noise floor (``parity.check.noise_floor``).
    """
    trainer, rows_given = build_trainer(case, workdir, pathlib.Path(workdir) / "trl")
    if perturb_seed is not None:
        nudge_one_ulp(trainer.accelerator.unwrap_model(trainer.model), perturb_seed)
    trainer.train()
    return RunResult(
        steps=step_metrics(trainer.state.log_history, case.steps),
        token_ids=trainer.train_dataset.select_columns(list(TOKEN_FIELDS)).to_list(),
        final_weights=trained_weights(trainer.accelerator.unwrap_model(trainer.model), case),
        dropped_rows=rows_given - len(trainer.train_dataset),
        packed_4bit_layers=[
            name
            for m in (trainer.model, trainer.ref_model)
            if m is not None
            for name in packed_layers(m)
        ],
    )


def step_metrics(log_history: list[dict], steps: int) -> list[dict[str, float]]:
    """One dict per optimizer step from ``trainer.state.log_history`` (full floats).

    The per-step entries are those holding ``loss``; the end-of-training summary (``train_loss``)
    and the bookkeeping keys ``step`` and ``epoch`` are left out.

    Raises:
        ValueError: when the log does not hold exactly one entry per step 1..steps.
    """
    entries = [e for e in log_history if "loss" in e]
    logged = [e.get("step") for e in entries]
    if logged != list(range(1, steps + 1)):
        raise ValueError(f"trl logged steps {logged}, expected 1..{steps}")
    return [
        {k: float(v) for k, v in e.items() if k not in ("step", "epoch") and _is_number(v)}
        for e in entries
    ]


def _is_number(value: object) -> bool:
    """A real number as the trainer logs them (bools excluded)."""
    return isinstance(value, int | float) and not isinstance(value, bool)
