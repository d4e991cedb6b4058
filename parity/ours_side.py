"""Our side of a parity case: the same files through the path users train with.

The case becomes a ``training.run.config.FitConfig`` and runs through ``training.fit.train`` (the
Lightning module, the data module, ``dpo_core.step``), not a separate copy of the math. The
settings that make it comparable with trl's run are the ones trl's side uses: the same policy,
reference and initial adapter files, the same rows in the same order (no shuffle), no held-out
split, float32, AdamW (fused) with the same schedule and clipping.
"""

from __future__ import annotations

import pathlib

import torch

from dpo_core.rows import write_jsonl
from parity.cases import ParityCase
from parity.result import TOKEN_FIELDS, RunResult
from parity.workspace import prepare_workspace, training_rows
from training.inputs.four_bit import packed_layers


def fit_config(case: ParityCase, data_file: pathlib.Path, ws, output_dir: pathlib.Path):
    """The ``FitConfig`` that trains ``case`` as trl's side does."""
    from training.run.config import (
        DataConfig,
        DPOConfig,
        FitConfig,
        LoraConfig,
        ModelConfig,
        OptimConfig,
        TrainerConfig,
    )

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
        dpo=DPOConfig(
            beta=case.beta,
            loss_type=list(case.loss_type),
            loss_weights=None if case.loss_weights is None else list(case.loss_weights),
            label_smoothing=case.label_smoothing,
            f_divergence_type=case.f_divergence_type,
            f_alpha_divergence_coef=case.f_alpha_divergence_coef,
            use_weighting=case.use_weighting,
            ld_alpha=case.ld_alpha,
            discopop_tau=case.discopop_tau,
            reference_free=case.reference_free,
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
            accelerator="cpu",
            save_every_n_steps=0,
            evaluate=False,
        ),
    )


def trained_weights(policy: torch.nn.Module, case: ParityCase) -> dict[str, torch.Tensor]:
    """Trainable weights after training, named as trl's side names them."""
    if case.lora:
        from peft import get_peft_model_state_dict

        return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(policy).items()}
    return {n: p.detach().cpu().clone() for n, p in policy.named_parameters() if p.requires_grad}


def run_ours(case: ParityCase, workdir: pathlib.Path) -> RunResult:
    """Train ``case`` with our Lightning path and collect what ``parity.compare`` compares."""
    from training.fit import train
    from training.inputs.prepare import prepare_inputs

    workdir = pathlib.Path(workdir)
    ws = prepare_workspace(case, workdir)
    rows = training_rows(case, ws)
    data_file = workdir / "ours" / "rows.jsonl"
    data_file.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(rows, data_file)
    cfg = fit_config(case, data_file, ws, workdir / "ours")
    torch.manual_seed(case.seed)
    inputs = prepare_inputs(cfg)
    token_ids = [{k: list(f[k]) for k in TOKEN_FIELDS} for f in inputs.data.train]
    result = train(cfg, inputs)
    reference_model = getattr(result.reference, "model", None)
    return RunResult(
        steps=result.history,
        token_ids=token_ids,
        final_weights=trained_weights(result.policy, case),
        dropped_rows=len(rows) - len(inputs.data.train),
        packed_4bit_layers=[
            name
            for m in (result.policy, reference_model)
            if m is not None
            for name in packed_layers(m)
        ],
    )
