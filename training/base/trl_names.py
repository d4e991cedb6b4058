"""trl's and transformers' option names, as a trl user types them, mapped onto ``FitConfig``.

Most of our fields already carry trl's name (``learning_rate``, ``beta``, ``max_steps``, ...).
The rest of trl's ``DPOConfig`` / transformers' ``TrainingArguments`` / trl's ``ModelConfig`` and
``ScriptArguments`` names fall into three kinds, each a table here:

- ``RENAMES``: the same setting under another name (``per_device_train_batch_size`` is
  ``batch_size``): a flag or YAML key of either name sets the field;
- ``CONVERTED``: a setting spelled another way (``bf16: true`` is ``precision: bf16-mixed``,
  ``save_strategy: "no"`` is ``save_every_n_steps: 0``): a function turns trl's value into ours,
  or refuses a value with no counterpart here;
- ``NO_COUNTERPART``: trl's other names: refused with one line naming the key (and why, where
  that helps), so that a trl YAML file never runs with a setting silently dropped.

The command line (``training.base.cli``) takes every name with hyphens or underscores.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# trl name -> our field, same value.
RENAMES: dict[str, str] = {
    "per_device_train_batch_size": "batch_size",
    "per_device_eval_batch_size": "eval_batch_size",
    "save_steps": "save_every_n_steps",
    "eval_steps": "eval_every_n_steps",
    "use_peft": "lora",
    "model_name_or_path": "model",
    "dataset_name": "dataset",
    "dataset_train_split": "split",
    "dataset_test_split": "eval_split",
    "dataloader_num_workers": "num_workers",
    "activation_checkpointing": "gradient_checkpointing",  # transformers 5's new name
}


def _text(value: Any) -> str:
    """A text option's value, lower case; YAML's unquoted ``no`` (read as false) is ``no``."""
    text = str(value).strip().lower()
    return "no" if text == "false" else text


def _precision(name: str, when_true: str) -> Callable[[bool], dict[str, Any]]:
    def convert(value: bool) -> dict[str, Any]:
        # False leaves --precision alone: trl YAML files write bf16: false next to fp16: true
        return {"precision": when_true} if value else {}

    convert.__doc__ = f"``{name}: true`` is ``precision: {when_true}``; false changes nothing."
    return convert


def _accepted(name: str, **meaning: dict[str, Any]) -> Callable[[str], dict[str, Any]]:
    """A converter for a text option: ``meaning[value]`` is what that value sets here."""

    def convert(value: str) -> dict[str, Any]:
        key = _text(value)
        if key not in meaning:
            allowed = ", ".join(meaning)
            raise ValueError(f"{name} {value!r} has no counterpart here (only {allowed})")
        return meaning[key]

    return convert


def _only(name: str, value_here: bool, why: str) -> Callable[[bool], dict[str, Any]]:
    """A trl switch this trainer always has in one position: that value is accepted."""

    def convert(value: bool) -> dict[str, Any]:
        if bool(value) != value_here:
            raise ValueError(f"{name} {value} has no counterpart here: {why}")
        return {}

    return convert


def _resume(value: str) -> dict[str, Any]:
    key = _text(value)
    if key in ("true", "1", "yes"):
        return {"resume": True}
    if key in ("no", "0", "none", ""):
        return {}
    raise ValueError(
        f"resume_from_checkpoint {value!r}: a run resumes from its own "
        "output_dir/checkpoints/last.ckpt: give --output-dir and --resume"
    )


@dataclass(frozen=True)
class Converted:
    """A trl option whose value ``convert`` turns into our fields' values (``{field: value}``);
    ``kind`` is the type its value is read as (``bool`` for a switch, ``str`` else)."""

    kind: type
    convert: Callable[[Any], dict[str, Any]]
    help: str


CONVERTED: dict[str, Converted] = {
    "bf16": Converted(bool, _precision("bf16", "bf16-mixed"), "true = --precision bf16-mixed."),
    "fp16": Converted(bool, _precision("fp16", "16-mixed"), "true = --precision 16-mixed."),
    "use_cpu": Converted(
        bool, lambda v: {"accelerator": "cpu"} if v else {}, "true = --accelerator cpu."
    ),
    "train_sampling_strategy": Converted(
        str,
        _accepted(
            "train_sampling_strategy",
            random={"shuffle": True},
            sequential={"shuffle": False},
            group_by_length={"group_by_length": True},
        ),
        "random = --shuffle, sequential = --no-shuffle, group_by_length = --group-by-length.",
    ),
    "save_strategy": Converted(
        str,
        _accepted("save_strategy", steps={}, no={"save_every_n_steps": 0}),
        'steps (every --save-steps), or "no" = --save-every-n-steps 0.',
    ),
    "eval_strategy": Converted(
        str,
        _accepted("eval_strategy", steps={}, no={}),
        "steps (every --eval-steps) or no (unset --eval-steps: once, at the end).",
    ),
    "logging_strategy": Converted(
        str, _accepted("logging_strategy", steps={}), "steps (every --logging-steps)."
    ),
    "optim": Converted(
        str,
        _accepted("optim", adamw_torch={}, adamw_torch_fused={}),
        "adamw_torch or adamw_torch_fused: AdamW, fused where the device allows (trl's default).",
    ),
    "resume_from_checkpoint": Converted(
        str, _resume, "true = --resume (from output_dir/checkpoints/last.ckpt)."
    ),
    "disable_dropout": Converted(
        bool,
        _only("disable_dropout", True, "dropout is always off, as trl's default"),
        "true only (dropout is always off, as trl's default).",
    ),
    "push_to_hub": Converted(
        bool,
        _only("push_to_hub", False, "nothing is uploaded; model/ holds a model card to push"),
        "false only: nothing is uploaded.",
    ),
    "do_train": Converted(bool, _only("do_train", True, "a run trains"), "true only."),
    "do_eval": Converted(bool, lambda v: {}, "accepted: held-out rows are always evaluated."),
    "remove_unused_columns": Converted(
        bool, lambda v: {}, "accepted: only the prompt/chosen/rejected columns are read."
    ),
}

# trl's names with no counterpart, and why where a reason helps.
WHY_NOT: dict[str, str] = {
    "save_total_limit": "a run keeps one checkpoint, checkpoints/last.ckpt, for --resume",
    "load_best_model_at_end": "model/ is the last step's model",
    "metric_for_best_model": "model/ is the last step's model",
    "use_liger_kernel": "the LM head is already chunked (dpo_core.lm_head)",
    "sync_ref_model": "TR-DPO (a moving reference) is not implemented",
    "deepspeed": "use --strategy deepspeed (Lightning's)",
    "fsdp": "use --strategy fsdp (Lightning's)",
    "load_in_8bit": "4-bit only (--load-in-4bit)",
    "hub_model_id": "nothing is uploaded",
    "hub_token": "nothing is uploaded",
    "model_revision": "give a local directory or a hub id at its default revision",
    "lr_scheduler_kwargs": "the schedules take no extra arguments here",
    "logging_dir": "loggers write under --output-dir",
}

# Every other name of trl 1.16's DPOConfig, ModelConfig and ScriptArguments and transformers
# 5's TrainingArguments (the ones above and our own fields' names excepted).
_TRL_FIELDS = """
model_init_kwargs pad_to_multiple_of precompute_ref_batch_size activation_offloading
ref_model_mixup_alpha ref_model_sync_steps pad_token torch_empty_cache_steps
lora_target_parameters lora_modules_to_save lora_task_type use_rslora use_dora
use_bnb_nested_quant bnb_4bit_quant_storage dataset_config dataset_streaming ignore_bias_buffers
optim_args optim_target_modules average_tokens_across_devices label_smoothing_factor
bf16_full_eval fp16_full_eval tf32 activation_checkpointing_kwargs gradient_checkpointing_kwargs
torch_compile torch_compile_backend torch_compile_mode liger_kernel_config use_cache
neftune_noise_alpha auto_find_batch_size logging_first_step log_on_each_node
logging_nan_inf_filter include_num_input_tokens_seen log_level log_level_replica disable_tqdm
project trackio_space_id trackio_bucket_id trackio_static_space_id eval_delay
prediction_loss_only eval_on_start eval_do_concat_batches eval_use_gather_object
eval_accumulation_steps include_for_metrics batch_eval_metrics save_only_model save_on_each_node
enable_jit_checkpoint hub_private_repo hub_strategy hub_always_push hub_revision
greater_is_better ignore_data_skip restore_callback_states_from_checkpoint full_determinism
data_seed accelerator_config parallelism_config dataloader_drop_last dataloader_pin_memory
dataloader_persistent_workers dataloader_prefetch_factor dataloader_multiprocessing_context
dataloader_in_order label_names length_column_name ddp_find_unused_parameters ddp_bucket_cap_mb
ddp_broadcast_buffers ddp_static_graph ddp_backend ddp_timeout fsdp_config debug
skip_memory_metrics do_predict local_rank
""".split()  # noqa: SIM905 - the names as words, easier to read than a list
NO_COUNTERPART: frozenset[str] = frozenset(_TRL_FIELDS) | frozenset(WHY_NOT)


def no_counterpart_message(name: str) -> str:
    """One line for a trl name this trainer has no setting for."""
    why = WHY_NOT.get(name)
    text = f"{name} (trl's) has no counterpart here"
    return f"{text}: {why}" if why else f"{text}; --help lists the options"


def trl_fields(name: str, value: Any) -> dict[str, Any]:
    """``{our field: value}`` that trl's option ``name`` set to ``value`` means here: a rename,
    a converted value, or a ``ValueError`` naming the key (no counterpart, or a value with
    none). ``name`` may be spelled with hyphens. A name that is not trl's: ``KeyError``."""
    key = name.replace("-", "_")
    if key in RENAMES:
        return {RENAMES[key]: value}
    if key in CONVERTED:
        return CONVERTED[key].convert(value)
    if key in NO_COUNTERPART:
        raise ValueError(no_counterpart_message(key))
    raise KeyError(name)


def aliases_of(field_name: str) -> list[str]:
    """trl's other names for our field ``field_name`` (``batch_size`` ->
    ``[per_device_train_batch_size]``)."""
    return [trl for trl, ours in RENAMES.items() if ours == field_name]
