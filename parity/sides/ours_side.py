"""Our side of a parity case: the same files through the path users train with.

The case becomes a ``training.base.config.FitConfig`` and runs through ``training.fit.train`` (the
Lightning module, the data module, ``dpo_core.step``), not a separate copy of the math. The
settings that make it comparable with trl's run are the ones trl's side uses: the same policy,
reference and initial adapter files, the same rows in the same order (no shuffle), no held-out
split, float32, AdamW (fused) with the same schedule and clipping.
"""

from __future__ import annotations

import dataclasses
import pathlib
from dataclasses import dataclass
from typing import Any

import torch

from dpo_core.batch import PreferenceBatch
from dpo_core.collate import PreferenceCollator
from dpo_core.rows import write_jsonl
from parity.sides import padding_free_check
from parity.sides.cases import ParityCase
from parity.sides.models import trained_weights
from parity.sides.result import TOKEN_FIELDS, RunResult
from parity.sides.workspace import prepare_workspace, training_rows
from training.base.config import (
    DataConfig,
    DPOConfig,
    FitConfig,
    LoraConfig,
    ModelConfig,
    OptimConfig,
    TrainerConfig,
    with_fields,
)
from training.fit import FitResult, train
from training.inputs.four_bit import packed_layers
from training.inputs.prepare import RunInputs, prepare_inputs


def fit_config(case: ParityCase, data_file: pathlib.Path, ws, output_dir: pathlib.Path):
    """The ``FitConfig`` that trains ``case`` as trl's side does."""
    targets = case.lora_target_modules
    return FitConfig(
        model=ModelConfig(
            model=str(ws.policy_dir),
            ref_model=str(ws.reference_dir),
            adapter=str(ws.adapter_init_dir) if ws.adapter_init_dir else None,
        ),
        data=DataConfig(
            dataset=str(data_file),
            eval_fraction=0.0,
            max_length=case.max_length,
            truncation_mode=case.truncation_mode,
            shuffle=False,
        ),
        dpo=DPOConfig(  # the case's objective, and how ours runs it
            **dataclasses.asdict(case.loss),
            precompute_ref_log_probs=case.precompute_ref,
            prompt_sharing=case.prompt_sharing,
        ),
        optim=OptimConfig(
            learning_rate=case.learning_rate,
            weight_decay=case.weight_decay,
            max_grad_norm=case.max_grad_norm,
            warmup_steps=case.warmup_steps,
        ),
        lora=LoraConfig(
            lora=case.lora,
            lora_r=case.lora_r,
            lora_alpha=case.lora_alpha,
            lora_target_modules=[targets] if isinstance(targets, str) else list(targets),
            load_in_4bit=case.load_in_4bit,
        ),
        trainer=TrainerConfig(
            output_dir=str(output_dir),
            max_steps=case.steps,
            batch_size=case.batch_size,
            gradient_accumulation_steps=case.grad_accum,
            seed=case.seed,
            accelerator=case.device,
            precision=case.precision,
            save_every_n_steps=0,
            evaluate=False,
        ),
    )


@dataclass
class OurRun:
    """One training run of a case through our path.

    Attributes:
        result: what ``training.fit.train`` returns (history, policy, reference, ...).
        inputs: the tokenized inputs it trained on.
        rows_given: rows written for it, before any were dropped.
    """

    result: FitResult
    inputs: RunInputs
    rows_given: int


def train_case(
    case: ParityCase,
    workdir: pathlib.Path,
    run_dir: pathlib.Path,
    changes: dict[str, Any] | None = None,
    callbacks: list | None = None,
) -> OurRun:
    """Train ``case`` through ``training.fit.train`` from the files ``prepare_workspace`` keeps
    under ``workdir``; the rows file and the run's outputs go to ``run_dir``.

    ``changes`` replace ``FitConfig`` fields by name (the benchmark's variants); ``callbacks``
    are extra Lightning callbacks (the benchmark's meter).
    """
    ws = prepare_workspace(case, pathlib.Path(workdir))
    rows = training_rows(case, ws)
    data_file = pathlib.Path(run_dir) / "rows.jsonl"
    data_file.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(rows, data_file)
    cfg = with_fields(fit_config(case, data_file, ws, run_dir), changes or {})
    torch.manual_seed(case.seed)
    inputs = prepare_inputs(cfg)
    return OurRun(train(cfg, inputs, callbacks=callbacks), inputs, len(rows))


def run_ours(case: ParityCase, workdir: pathlib.Path) -> RunResult:
    """Train ``case`` with our Lightning path and collect what ``parity.check.compare`` compares."""
    run = train_case(case, workdir, pathlib.Path(workdir) / "ours")
    train_rows = run.inputs.data.train
    policy, reference_model = run.result.policy, getattr(run.result.reference, "model", None)
    batches = training_batches(run, case)
    return RunResult(
        steps=run.result.history,
        token_ids=[{k: list(f[k]) for k in TOKEN_FIELDS} for f in train_rows],
        final_weights=trained_weights(policy, case),
        dropped_rows=run.rows_given - len(train_rows),
        packed_4bit_layers=[
            name for m in (policy, reference_model) if m is not None for name in packed_layers(m)
        ],
        padding_free=padding_free_check.measure(policy, batches),
    )


def training_batches(run: OurRun, case: ParityCase) -> list[PreferenceBatch]:
    """The first ``padding_free_check.MAX_BATCHES`` micro-batches of the run's training rows, in
    data order (parity runs do not shuffle), collated as training collates them."""
    collate = PreferenceCollator(
        pad_token_id=run.inputs.tokenizer.pad_token_id,
        max_length=case.max_length,
        truncation_mode=case.truncation_mode,
    )
    rows, size = run.inputs.data.train, case.batch_size
    starts = range(0, min(len(rows), padding_free_check.MAX_BATCHES * size), size)
    return [collate([rows[i] for i in range(s, min(s + size, len(rows)))]) for s in starts]
