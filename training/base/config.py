"""The training configuration: one dataclass per concern, each field with its single default.

Field names follow trl's ``DPOConfig`` / transformers' ``TrainingArguments`` where those have the
concept (beta, loss_type, loss_weights, label_smoothing, max_length, truncation_mode,
precompute_ref_log_probs, learning_rate, gradient_accumulation_steps, max_steps,
num_train_epochs, warmup_steps, weight_decay, max_grad_norm, seed). Every field becomes a
command-line flag of ``python -m training.fit`` (``max_steps`` -> ``--max-steps``) and a key of
the YAML file (``--config``); see ``training.base.cli``. The ``help`` text of each field is its
one-line documentation. ``DPOConfig`` extends the objective as ``dpo_core.settings`` declares it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from dpo_core.collate import check_truncation_mode
from dpo_core.logp_types import CHUNK_SIZE, KEEP_PROBS_BYTES
from dpo_core.settings import LossSettings
from training.base.field_checks import check_fields, flag

# The names a choice field accepts (checked by ``check_fields``).
DTYPE_NAMES = ("float32", "bfloat16", "float16")
# transformers' get_scheduler names that ``training.run.schedules`` computes.
LR_SCHEDULER_TYPES = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "constant",
    "constant_with_warmup",
)
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
# --report-to: the loggers a run can write to (training.run.loggers), or none of them.
REPORT_TO = ("csv", "tensorboard", "wandb", "mlflow", "none")
# Lightning 2's precision names (lightning.fabric.connector._PRECISION_INPUT_STR) and aliases.
PRECISIONS = (
    "32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true",
    "transformer-engine", "transformer-engine-float16", "32", "bf16", "16", "64",
)  # fmt: skip
# Lightning's StrategyRegistry names that train on CPU or GPU, and "auto".
STRATEGIES = (
    "auto", "ddp", "ddp_spawn", "ddp_fork", "ddp_notebook",
    "ddp_find_unused_parameters_false", "ddp_find_unused_parameters_true",
    "ddp_spawn_find_unused_parameters_false", "ddp_spawn_find_unused_parameters_true",
    "ddp_fork_find_unused_parameters_false", "ddp_fork_find_unused_parameters_true",
    "ddp_notebook_find_unused_parameters_false", "ddp_notebook_find_unused_parameters_true",
    "deepspeed", "deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_2_offload",
    "deepspeed_stage_3", "deepspeed_stage_3_offload", "deepspeed_stage_3_offload_nvme",
    "fsdp", "fsdp_cpu_offload",
)  # fmt: skip


def _f(default, help: str, **checks):  # noqa: A002 - "help" mirrors argparse
    """A dataclass field with a one-line help text (used by the CLI and --print-config) and its
    allowed values, checked by ``training.base.field_checks``: bounds ``ge``, ``gt``, ``le``,
    ``lt``, ``also`` (values allowed outside the bounds, such as -1) and ``choices``."""
    meta = {"help": help, **checks}
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    """Which causal LM to train and how to load it."""

    model: str | None = _f(
        None, "Hub id or local directory of a causal LM; unset = embedded default."
    )
    ref_model: str | None = _f(
        None, "Reference model (hub id or directory); unset = a frozen copy of the policy."
    )
    adapter: str | None = _f(
        None, "Start from this LoRA adapter directory (trained further; implies --lora)."
    )
    trust_remote_code: bool = _f(False, "Allow custom modelling code from the model directory.")
    dtype: str = _f("float32", "Weights dtype.", choices=DTYPE_NAMES)
    attn_implementation: str | None = _f(
        None, "Attention kernel (sdpa, eager, ...); unset = default."
    )
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward to save memory.")


@dataclass
class DataConfig:
    """Where the preference rows come from and how they become tokens."""

    dataset: str | None = _f(
        None,
        "Hub id, local .jsonl/.json/.parquet/.csv file (also .gz), a save_to_disk directory or a "
        "directory of split files; unset = embedded default.",
    )
    split: str = _f("train", "Split of --dataset to train on.")
    eval_dataset: str | None = _f(None, "Held-out file or hub id; unset = eval_split or a slice.")
    eval_split: str | None = _f(None, "Split of --dataset to evaluate on (e.g. test).")
    eval_fraction: float = _f(
        0.05, "Held-out share of the rows read when no eval set is given.", ge=0, lt=1
    )
    eval_max_pairs: int | None = _f(
        64, "At most this many held-out pairs (the first of an eval set); none = no cap.", ge=1
    )
    max_length: int | None = _f(
        1024, "Truncate prompt+completion to this many tokens (trl's).", ge=1
    )
    truncation_mode: str = _f("keep_start", "As trl.", choices=("keep_start", "keep_end"))
    skip_invalid: bool = _f(False, "Skip malformed rows (counted and reported) instead of failing.")
    shuffle: bool = _f(True, "Shuffle training rows each epoch (off = trl's sequential sampler).")
    group_by_length: bool = _f(
        False, "Batch pairs of similar token counts together (less padding; changes the order)."
    )
    max_rows: int | None = _f(
        None,
        "Use only the first N rows of --dataset (the held-out share is taken from them).",
        ge=1,
    )
    prompt_column: str = _f("prompt", "Column (or JSON key) of --dataset holding the prompt.")
    chosen_column: str = _f("chosen", "Column (or JSON key) holding the chosen completion.")
    rejected_column: str = _f("rejected", "Column (or JSON key) holding the rejected completion.")
    dataset_num_proc: int | None = _f(
        None, "Processes that tokenize the rows (trl's); unset = the usable CPU cores.", ge=1
    )
    dataset_cache_dir: str | None = _f(
        None,
        "Where tokenized data sets are cached; unset = $DPO_DATA_CACHE or ~/.cache/dpo/data.",
    )


@dataclass
class DPOConfig(LossSettings):
    """The preference objective (dpo_core.losses)."""

    # The objective's fields (beta, loss_type, ... reference_free) and their checks are
    # dpo_core.settings.LossSettings'; these come after them.
    precompute_ref_log_probs: bool | None = _f(
        None,
        "Compute reference log-probs once before training, cached on disk. Unset: on when the "
        "run reads every training row at least once (then it saves reference forwards), else off.",
    )
    logps_chunk_size: int = _f(
        CHUNK_SIZE, "Completion tokens projected to the vocabulary at a time.", ge=1
    )
    logps_keep_probs_mb: int = _f(
        KEEP_PROBS_BYTES // 2**20,
        "Keep the head's softmax for backward up to this size (MiB); 0 = recompute it.",
        ge=0,
    )
    prompt_sharing: bool = _f(
        True,
        "Forward each prompt once per pair (prompt+chosen+rejected in one row): faster, equal "
        "up to float32 rounding of the attention sums (dpo_core.packing).",
    )
    padding_free: bool = _f(
        True,
        "With prompt sharing, lay several pairs end to end in a row under a block mask, so no "
        "padding is computed (dpo_core.pair_layout); used where it saves work.",
    )

    def option_name(self, field_name: str) -> str:
        """Errors name the flag a user typed."""
        return flag(field_name)


@dataclass
class OptimConfig:
    """AdamW and a learning-rate schedule with linear warm-up, as transformers' Trainer."""

    learning_rate: float = _f(1e-6, "Peak learning rate (trl's DPOConfig default).", gt=0)
    weight_decay: float = _f(0.0, "AdamW weight decay (not applied to biases and norms).", ge=0)
    adam_beta1: float = _f(0.9, "AdamW beta1.", ge=0, lt=1)
    adam_beta2: float = _f(0.999, "AdamW beta2.", ge=0, lt=1)
    adam_epsilon: float = _f(1e-8, "AdamW epsilon.", gt=0)
    max_grad_norm: float = _f(1.0, "Clip the total gradient norm to this (0 = off).", ge=0)
    warmup_steps: int = _f(0, "Linear warm-up steps.", ge=0)
    warmup_ratio: float = _f(
        0.0, "Warm-up as a share of all steps (used when warmup_steps is 0).", ge=0, le=1
    )
    lr_scheduler_type: str = _f(
        "linear",
        "Schedule after the warm-up, as transformers' get_scheduler computes it (constant: no "
        "warm-up; constant_with_warmup: with one).",
        choices=LR_SCHEDULER_TYPES,
    )


@dataclass
class LoraConfig:
    """LoRA adapters (peft); the reference is then the model with its adapters switched off."""

    lora: bool = _f(False, "Train LoRA adapters instead of all weights.")
    lora_r: int = _f(16, "LoRA rank.", ge=1)
    lora_alpha: int = _f(32, "LoRA alpha (scale = alpha / r).", ge=1)
    lora_dropout: float = _f(0.0, "Dropout on the LoRA input.", ge=0, lt=1)
    lora_target_modules: list[str] = _f(["all-linear"], "Modules to adapt (peft names).")
    merge_adapter: bool = _f(False, "Also save the adapter merged into the base weights.")
    load_in_4bit: bool = _f(
        False, "QLoRA: load the base in bitsandbytes NF4 4-bit (implies --lora)."
    )
    bnb_4bit_compute_dtype: str = _f(
        "float32", "Compute dtype of the 4-bit layers.", choices=DTYPE_NAMES
    )
    bnb_4bit_quant_type: str = _f("nf4", "4-bit data type.", choices=("nf4", "fp4"))
    qlora_adapter_dtype: str = _f(
        "bfloat16",
        "dtype of the LoRA weights on a 4-bit base (bf16: QLoRA paper, as trl 1.16).",
        choices=DTYPE_NAMES,
    )


@dataclass
class TrainerConfig:
    """Steps, batches, devices, outputs: the Lightning Trainer's side."""

    output_dir: str = _f("runs/dpo", "Where the model, logs, checkpoints and report go.")
    max_steps: int = _f(
        -1, "Optimizer steps to train (-1 = num_train_epochs epochs).", ge=1, also=(-1,)
    )
    num_train_epochs: float = _f(
        1.0,
        "Epochs when max_steps is -1; a fraction trains ceil(epochs x steps an epoch) steps, as "
        "transformers' Trainer.",
        gt=0,
    )
    batch_size: int = _f(
        8, "Preference pairs per device per micro-batch (per_device_train_batch_size).", ge=1
    )
    eval_batch_size: int = _f(16, "Pairs per evaluation batch.", ge=1)
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer step.", ge=1)
    seed: int = _f(42, "Seed for weights init, data order, dropout and sampling.", ge=0)
    accelerator: str = _f("auto", "Lightning accelerator.", choices=ACCELERATORS)
    devices: int = _f(1, "Devices (processes) per machine to train on.", ge=1, also=(-1,))
    num_nodes: int = _f(1, "Machines (nodes) to train on; Lightning's num_nodes.", ge=1)
    strategy: str = _f("auto", "Lightning strategy.", choices=STRATEGIES)
    threads: int | None = _f(
        None,
        "torch CPU threads per process (unset: OMP_NUM_THREADS, else usable cores / processes).",
        ge=1,
    )
    precision: str = _f("32-true", "Lightning precision.", choices=PRECISIONS)
    save_every_n_steps: int = _f(
        50, "Write a checkpoint every N optimizer steps (0 = no checkpoints).", ge=0
    )
    eval_every_n_steps: int | None = _f(
        None, "Validate every N optimizer steps (unset = at the end).", ge=1
    )
    resume: bool = _f(
        False,
        "Continue from output_dir/checkpoints/last.ckpt (refused if the config or data changed).",
    )
    resume_allow_changes: bool = _f(
        False,
        "With --resume: continue even if the config or data differ from the checkpoint's "
        "(the changes are recorded in config.yaml and metrics.csv).",
    )
    overwrite_output_dir: bool = _f(
        False,
        "Start a fresh run in an output_dir that holds another run's checkpoints or model "
        "(they are removed first); without it such a run is refused.",
    )
    evaluate: bool = _f(True, "Evaluate before vs after and write the report at the end.")
    num_workers: int = _f(0, "DataLoader workers.", ge=0)
    report_to: list[str] = _f(
        ["csv", "tensorboard"],
        "Loggers, one or several (none: metrics.csv alone, which every run writes; wandb runs "
        "offline unless WANDB_MODE=online; mlflow logs to output_dir/mlruns unless "
        "MLFLOW_TRACKING_URI is set).",
        choices=REPORT_TO,
    )
    logging_steps: int = _f(
        1,
        "Send the loggers one row every N optimizer steps, averaged over them as trl does "
        "(trl's default is 10); metrics.csv keeps every step.",
        ge=1,
    )
    run_name: str | None = _f(
        None, "The run's name in wandb and MLflow; unset = output_dir's folder name."
    )

    @property
    def world_size(self) -> int:
        """Training processes over all machines: devices per machine x machines."""
        return max(1, self.devices) * self.num_nodes

    @property
    def pairs_per_batch(self) -> int:
        """Pairs in one micro-batch over all processes (batch_size x devices x num_nodes)."""
        return self.batch_size * self.world_size


@dataclass
class EvalConfig:
    """Evaluation before vs after training (``training.evaluate``): sampling and judging."""

    num_prompts: int = _f(
        128, "Held-out prompts to sample a completion for (0 = no generation).", ge=0
    )
    max_new_tokens: int = _f(48, "Most tokens sampled per completion.", ge=1)
    temperature: float = _f(1.0, "Sampling temperature (1.0 samples pi itself: unbiased KL).", gt=0)
    top_p: float = _f(1.0, "Nucleus sampling mass (1.0 = off: unbiased KL).", gt=0, le=1)
    generation_batch_size: int = _f(64, "Prompts sampled at a time.", ge=1)
    judge: str = _f(
        "auto",
        "auto (embedded: the task's rule; else implicit), rule, implicit, none, a reward-model "
        "directory or hub id, or module:function returning a score in [0, 1].",
    )
    win_against: str = _f(
        "chosen",
        "Reward judges: a sample wins if it outscores the pair's chosen or rejected.",
        choices=("chosen", "rejected"),
    )
    num_examples: int = _f(5, "Side-by-side before/after examples in report.md.", ge=0)


GROUPS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "dpo": DPOConfig,
    "optim": OptimConfig,
    "lora": LoraConfig,
    "trainer": TrainerConfig,
    "eval": EvalConfig,
}


@dataclass
class FitConfig:
    """Everything ``python -m training.fit`` needs, one group per concern."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        check_config(self)


def check_config(cfg: FitConfig) -> None:
    """Reject wrong types, out-of-range values and inconsistent settings early, with the flag
    names a user typed (the objective's own fields are checked when ``DPOConfig`` is made:
    ``dpo_core.settings``)."""
    for group in GROUPS:
        check_fields(getattr(cfg, group))
    check_truncation_mode(cfg.data.truncation_mode, "--truncation-mode")
    o = cfg.optim
    if o.lr_scheduler_type == "constant" and (o.warmup_steps or o.warmup_ratio):
        raise ValueError(
            "--lr-scheduler-type constant has no warm-up (as transformers' get_scheduler): "
            "use constant_with_warmup, or --warmup-steps 0 and --warmup-ratio 0"
        )
    if "none" in cfg.trainer.report_to and len(cfg.trainer.report_to) > 1:
        raise ValueError(f"--report-to none cannot go with others: {cfg.trainer.report_to}")
    if cfg.lora.load_in_4bit or cfg.model.adapter:
        cfg.lora.lora = True  # 4-bit weights cannot be trained directly: QLoRA trains adapters.


def with_fields(cfg: FitConfig, changes: dict) -> FitConfig:
    """``cfg`` with fields replaced by name, whatever group holds them (checked again)."""
    groups = field_names()
    by_group: dict[str, dict] = {}
    for name, value in changes.items():
        by_group.setdefault(groups[name], {})[name] = value
    return replace(cfg, **{g: replace(getattr(cfg, g), **kw) for g, kw in by_group.items()})


def field_names() -> dict[str, str]:
    """Map every field name to its group (names are unique across groups)."""
    out: dict[str, str] = {}
    for group, cls in GROUPS.items():
        for f in fields(cls):
            assert f.name not in out, f"duplicate config field {f.name}"
            out[f.name] = group
    return out


def changed_fields(cfg: FitConfig) -> set[str]:
    """The names of the fields whose value differs from their default (a config built in
    Python: what its author set)."""
    default = FitConfig()
    return {
        f.name
        for group in GROUPS
        for f in fields(GROUPS[group])
        if getattr(getattr(cfg, group), f.name) != getattr(getattr(default, group), f.name)
    }
