"""Parity cases: one training run, fully specified, that both trl and our code perform.

A ``ParityCase`` holds every setting that changes a number: the model (a tiny architecture built
locally or a local checkpoint), the data, the DPO objective (a ``dpo_core.settings.LossSettings``,
whose names are trl's, so both sides take it unchanged), the optimizer and the schedule. ``cases_from_args`` turns the ``python -m parity`` options into cases, and
``comparable`` says where trl 1.16 has no such setting, so the report can say so instead of
comparing.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from dpo_core.collate import check_truncation_mode

# The loss types, and those that read label_smoothing or allow an f-divergence, are trl 1.16's
# (tests/dpo_core/test_losses_trl.py checks them against trl).
from dpo_core.losses import (  # noqa: F401 (LOSS_TYPES: the command line's choices)
    F_DIVERGENCE_LOSS_TYPES,
    LOSS_TYPES,
    TRL_LABEL_SMOOTHING_LOSS_TYPES,
)
from dpo_core.settings import LossSettings
from parity.sides.zoo import ZOO

ARCHS = ("llama", "qwen2", "gpt2", "mistral")
"""The tiny architectures of ``--arch all`` (parity.sides.models.tiny_config)."""
PRECISIONS = ("32-true", "bf16-mixed")
DEVICES = ("cpu", "cuda")
DATA_SHAPES = ("explicit", "conversational", "implicit", "hh-rlhf", "hh-rlhf-chat")


def all_archs() -> tuple[str, ...]:
    """Every ``--arch``: ``ARCHS``, then the other families of the zoo (``parity.sides.zoo``)."""
    return (*ARCHS, *(family for family in ZOO if family not in ARCHS))


@dataclass
class ParityCase:
    """One run, identical on both sides: same initial weights, data order and optimizer."""

    name: str
    """Label used in the table and the JSON report."""
    arch: str = "llama"
    """Tiny architecture built locally: one of ``ARCHS`` or a family of
    ``parity.sides.zoo.ZOO``; ignored when ``model_path`` is set."""
    model_path: str | None = None
    """A local Hugging Face causal-LM directory used as the policy (its tokenizer too)."""
    dataset_path: str | None = None
    """A local preference file (.jsonl/.json/.parquet/.csv); None generates ``data``."""
    data: str = "explicit"
    """Generated data when ``dataset_path`` is None: one of ``DATA_SHAPES``."""
    num_rows: int | None = None
    """Rows to generate or keep; None means steps x batch_size x grad_accum (one epoch)."""
    loss: LossSettings = field(default_factory=LossSettings)
    """The objective: loss types, weights, beta and every other knob, with trl's names."""
    steps: int = 20
    """Optimizer steps."""
    batch_size: int = 4
    """Pairs per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    learning_rate: float = 1e-3
    """Peak learning rate (large so the weights visibly move in a few steps)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping threshold (the logged grad_norm is taken before clipping)."""
    warmup_steps: int = 0
    """Linear warmup steps before the linear decay to 0."""
    lora: bool = False
    """Train a LoRA adapter instead of the full weights."""
    lora_r: int = 8
    """LoRA rank."""
    lora_alpha: int = 16
    """LoRA scaling numerator (scale = alpha / r)."""
    lora_target_modules: list[str] | str = "all-linear"
    """peft ``target_modules``."""
    load_in_4bit: bool = False
    """Load policy and reference as bitsandbytes NF4 (needs ``lora``)."""
    precompute_ref: bool = False
    """Compute the reference log-probs once before training."""
    prompt_sharing: bool = False
    """Ours forwards each prompt once per pair (``dpo_core.packing``; on by default in
    ``training.fit``). Off here: parity compares the plain path, which sums every number in the
    order trl does; sharing reorders the attention's float32 sums (tests/dpo_core/test_packing.py
    holds it to the plain path)."""
    max_length: int | None = 1024
    """Truncation length of prompt + completion; None keeps everything."""
    truncation_mode: str = "keep_start"
    """``keep_start`` or ``keep_end``."""
    precision: str = "32-true"
    """``32-true``: float32 throughout. ``bf16-mixed``: float32 weights, optimizer and loss, the
    matrix products under bf16 autocast: trl with ``bf16=True``, ours under Lightning's
    ``bf16-mixed`` (the same ``torch.autocast`` region: every forward)."""
    device: str = "cpu"
    """``cpu`` or ``cuda`` (both sides on the first GPU)."""
    seed: int = 42
    """Seed of the models, the reference perturbation, the generated data and the trainer."""
    vocab_size: int = 1000
    """Size of the tokenizer trained on the data when no ``model_path`` is given."""

    def __post_init__(self) -> None:
        # The objective's fields were checked when ``loss`` was made (dpo_core.settings).
        if self.model_path is None and self.arch not in all_archs():
            raise ValueError(f"case {self.name!r}: arch {self.arch!r} not in {all_archs()}")
        if self.dataset_path is None and self.data not in DATA_SHAPES:
            raise ValueError(f"case {self.name!r}: data {self.data!r} not in {DATA_SHAPES}")
        check_truncation_mode(self.truncation_mode, f"case {self.name!r}: truncation_mode")
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"case {self.name!r}: precision {self.precision!r} not in {PRECISIONS}"
            )
        if self.device not in DEVICES:
            raise ValueError(f"case {self.name!r}: device {self.device!r} not in {DEVICES}")
        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"case {self.name!r}: {name} must be >= 1, got {getattr(self, name)}"
                )
        if self.load_in_4bit and not self.lora:
            raise ValueError(f"case {self.name!r}: 4-bit weights can only be trained through LoRA")

    @property
    def rows_needed(self) -> int:
        """Rows for one epoch: ``num_rows`` or steps x batch_size x grad_accum."""
        return self.num_rows or self.steps * self.batch_size * self.grad_accum

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ParityCase:
        """The case ``dataclasses.asdict`` made ``data`` from (the benchmark's spec file)."""
        return cls(**{**data, "loss": LossSettings(**data["loss"])})


def comparable(case: ParityCase) -> tuple[bool, str]:
    """Whether trl 1.16 can run this case at all, and if not, why (shown in the table).

    Settings trl 1.16 has no equivalent for are reported, not compared: cDPO (trl ignores
    ``label_smoothing`` for sigmoid), reference-free training (no ``reference_free`` field), the
    combinations trl's ``DPOTrainer.__init__`` rejects, and ``sft`` with WPO weighting, which
    trl 1.16 accepts but crashes on at the first step.
    """
    s = case.loss
    losses = set(s.loss_type)
    if s.reference_free:
        return False, "trl 1.16 has no reference-free mode (no reference_free field)"
    if "sigmoid" in losses and s.label_smoothing > 0:
        return False, "cDPO: trl 1.16 ignores label_smoothing for sigmoid"
    if "exo_pair" in losses and s.label_smoothing == 0:
        return False, "trl 1.16 rejects exo_pair with label_smoothing 0"
    if s.f_divergence_type != "reverse_kl" and not losses <= F_DIVERGENCE_LOSS_TYPES:
        unsupported = sorted(losses - F_DIVERGENCE_LOSS_TYPES)
        return False, f"trl 1.16 has no {s.f_divergence_type} for {unsupported}"
    if s.use_weighting and losses & {"aot", "aot_unpaired"}:
        return False, "trl 1.16 has no WPO weighting for aot / aot_unpaired"
    if s.use_weighting and "sft" in losses:
        # dpo_trainer.py:1502 expands a scalar, then 1526 multiplies it in place: RuntimeError.
        return False, "trl 1.16 crashes on sft with use_weighting (in-place on an expanded tensor)"
    targets = case.lora_target_modules
    if case.lora and "lm_head" in (targets if isinstance(targets, list) else [targets]):
        return False, "trl 1.16 rejects a LoRA adapter on lm_head"
    return True, ""


def default_label_smoothing(loss_types: list[str]) -> float:
    """A label smoothing every loss in ``loss_types`` accepts in trl 1.16.

    exo_pair needs epsilon > 0 (the EXO paper recommends 1e-3); robust and aot exercise their
    smoothing branch with 0.1 (robust needs epsilon in [0, 0.5)); every other loss gets 0.
    """
    if "exo_pair" in loss_types:
        return 1e-3
    if set(loss_types) & TRL_LABEL_SMOOTHING_LOSS_TYPES:
        return 0.1
    return 0.0


def case_name(case: ParityCase) -> str:
    """A readable name: model, loss types, then every setting that differs from its default."""
    model = case.model_path.rstrip("/").split("/")[-1] if case.model_path else case.arch
    loss_types = case.loss.loss_type
    parts = [model, "+".join(loss_types)]
    skip = {"name", "arch", "model_path", "loss_type", "label_smoothing"}
    for name, value, default in _settings(case):
        if name in skip or value == default:
            continue
        if name == "dataset_path":
            value = value.rstrip("/").split("/")[-1]
        parts.append(name if value is True else f"{name}={value}")
    if case.loss.label_smoothing != default_label_smoothing(loss_types):
        parts.append(f"label_smoothing={case.loss.label_smoothing}")
    return "-".join(str(p).replace(" ", "") for p in parts)


def _settings(case: ParityCase) -> Iterator[tuple[str, Any, Any]]:
    """(name, value, default) of every setting of ``case``, the objective's in place of ``loss``."""
    defaults = ParityCase(name="")
    for f in dataclasses.fields(ParityCase):
        if f.name != "loss":
            yield f.name, getattr(case, f.name), getattr(defaults, f.name)
            continue
        for g in dataclasses.fields(LossSettings):
            yield g.name, getattr(case.loss, g.name), getattr(defaults.loss, g.name)


def cases_from_args(args: argparse.Namespace) -> list[ParityCase]:
    """The cases the command line asks for: one per architecture x loss-type group.

    ``--loss-type all`` gives one case per loss type in ``LOSS_TYPES``; several names without
    ``all`` give one case that sums them (with ``--loss-weights``). ``--arch all`` gives one case
    per tiny architecture. ``--label-smoothing`` unset means ``default_label_smoothing``.
    ``--load-in-4bit`` implies ``--lora`` (QLoRA).
    """
    loss_groups = [[t] for t in LOSS_TYPES] if "all" in args.loss_type else [args.loss_type]
    archs = [None] if args.model else (list(ARCHS) if "all" in args.arch else args.arch)
    cases = []
    for arch in archs:
        for losses in loss_groups:
            case = ParityCase(
                name="",
                arch=arch or "llama",
                model_path=args.model,
                dataset_path=args.dataset,
                data=args.data,
                num_rows=args.num_rows,
                loss=loss_settings(args, losses),
                steps=args.steps,
                batch_size=args.batch_size,
                grad_accum=args.grad_accum,
                learning_rate=args.learning_rate,
                lora=args.lora or args.load_in_4bit,
                lora_r=args.lora_r,
                lora_alpha=args.lora_alpha,
                lora_target_modules=_target_modules(args.lora_target_modules),
                load_in_4bit=args.load_in_4bit,
                precompute_ref=args.precompute_ref,
                prompt_sharing=args.prompt_sharing,
                max_length=None if args.max_length == 0 else args.max_length,
                truncation_mode=args.truncation_mode,
                precision=args.precision,
                device=args.device,
                seed=args.seed,
            )
            case.name = case_name(case)
            cases.append(case)
    return cases


def loss_settings(args: argparse.Namespace, loss_types: list[str]) -> LossSettings:
    """The objective the command line asks for, with ``loss_types``: each ``LossSettings`` field
    its flag set (an unset flag is None), the others their defaults; an unset
    ``--label-smoothing`` is ``default_label_smoothing``."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(LossSettings)}
    given = {name: value for name, value in given.items() if value is not None}
    given["loss_type"] = list(loss_types)
    given.setdefault("label_smoothing", default_label_smoothing(loss_types))
    return LossSettings(**given)


def _target_modules(values: list[str]) -> list[str] | str:
    """``all-linear`` stays a string (peft's shorthand); anything else is a list of names."""
    return "all-linear" if values == ["all-linear"] else list(values)
