"""Parity cases: one training run, fully specified, that both trl and our code perform.

A ``ParityCase`` holds every setting that changes a number: the model (a tiny architecture built
locally or a local checkpoint), the data, the DPO loss and its knobs, the optimizer and the
schedule. ``cases_from_args`` turns the ``python -m parity`` options into cases, and
``comparable`` says where trl 1.16 has no such setting, so the report can say so instead of
comparing.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field

from dpo_core.collate import check_truncation_mode

# Every loss type trl 1.16 accepts (trl/trainer/dpo_trainer.py:1385-1516).
LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
)
ARCHS = ("llama", "qwen2", "gpt2", "mistral")
DATA_SHAPES = ("explicit", "conversational", "implicit", "hh-rlhf")
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")

# Loss types that read ``label_smoothing`` in trl 1.16; every other one ignores it (notes §1).
SMOOTHED_LOSSES = {"robust", "exo_pair", "aot", "aot_unpaired"}
# Loss types with an f-divergence generalisation in trl 1.16 (dpo_trainer.py:808-816).
F_DIVERGENCE_LOSSES = {
    "sigmoid",
    "sigmoid_norm",
    "hinge",
    "ipo",
    "exo_pair",
    "robust",
    "discopop",
    "sft",
}


@dataclass
class ParityCase:
    """One run, identical on both sides: same initial weights, data order and optimizer."""

    name: str
    """Label used in the table and the JSON report."""
    arch: str = "llama"
    """Tiny architecture built locally (``ARCHS``); ignored when ``model_path`` is set."""
    model_path: str | None = None
    """A local Hugging Face causal-LM directory used as the policy (its tokenizer too)."""
    dataset_path: str | None = None
    """A local preference file (.jsonl/.json/.parquet/.csv); None generates ``data``."""
    data: str = "explicit"
    """Generated data when ``dataset_path`` is None: one of ``DATA_SHAPES``."""
    num_rows: int | None = None
    """Rows to generate or keep; None means steps x batch_size x grad_accum (one epoch)."""
    loss_type: list[str] = field(default_factory=lambda: ["sigmoid"])
    """trl ``loss_type``: the total loss is the weighted sum of these."""
    loss_weights: list[float] | None = None
    """One weight per loss type; None means 1.0 each."""
    beta: float = 0.1
    """Inverse temperature of the implicit reward."""
    label_smoothing: float = 0.0
    """Label noise epsilon (robust, exo_pair, aot, aot_unpaired; cDPO for sigmoid)."""
    f_divergence_type: str = "reverse_kl"
    """f-DPO divergence (``F_DIVERGENCES``)."""
    f_alpha_divergence_coef: float = 0.5
    """alpha of the alpha-divergence."""
    use_weighting: bool = False
    """WPO per-pair weights."""
    ld_alpha: float | None = None
    """LD-DPO weight of the completion tokens past the shorter completion's length."""
    discopop_tau: float = 0.05
    """Temperature of the DiscoPOP mixing sigmoid."""
    reference_free: bool = False
    """Drop the reference (reference log-probs taken as 0); trl 1.16 has no such mode."""
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
    seed: int = 42
    """Seed of the models, the reference perturbation, the generated data and the trainer."""
    vocab_size: int = 1000
    """Size of the tokenizer trained on the data when no ``model_path`` is given."""

    def __post_init__(self) -> None:
        unknown = [t for t in self.loss_type if t not in LOSS_TYPES]
        if not self.loss_type or unknown:
            raise ValueError(f"case {self.name!r}: loss_type {unknown or '[]'} not in {LOSS_TYPES}")
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise ValueError(
                f"case {self.name!r}: {len(self.loss_weights)} loss_weights for "
                f"{len(self.loss_type)} loss types {self.loss_type}"
            )
        if self.model_path is None and self.arch not in ARCHS:
            raise ValueError(f"case {self.name!r}: arch {self.arch!r} not in {ARCHS}")
        if self.dataset_path is None and self.data not in DATA_SHAPES:
            raise ValueError(f"case {self.name!r}: data {self.data!r} not in {DATA_SHAPES}")
        if self.f_divergence_type not in F_DIVERGENCES:
            raise ValueError(
                f"case {self.name!r}: f_divergence_type {self.f_divergence_type!r} not in {F_DIVERGENCES}"
            )
        check_truncation_mode(self.truncation_mode, f"case {self.name!r}: truncation_mode")
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


def comparable(case: ParityCase) -> tuple[bool, str]:
    """Whether trl 1.16 can run this case at all, and if not, why (shown in the table).

    Settings trl 1.16 has no equivalent for are reported, not compared: cDPO (trl ignores
    ``label_smoothing`` for sigmoid), reference-free training (no ``reference_free`` field), the
    combinations trl's ``DPOTrainer.__init__`` rejects, and ``sft`` with WPO weighting, which
    trl 1.16 accepts but crashes on at the first step.
    """
    losses = set(case.loss_type)
    if case.reference_free:
        return False, "trl 1.16 has no reference-free mode (no reference_free field)"
    if "sigmoid" in losses and case.label_smoothing > 0:
        return False, "cDPO: trl 1.16 ignores label_smoothing for sigmoid"
    if "exo_pair" in losses and case.label_smoothing == 0:
        return False, "trl 1.16 rejects exo_pair with label_smoothing 0"
    if case.f_divergence_type != "reverse_kl" and not losses <= F_DIVERGENCE_LOSSES:
        unsupported = sorted(losses - F_DIVERGENCE_LOSSES)
        return False, f"trl 1.16 has no {case.f_divergence_type} for {unsupported}"
    if case.use_weighting and losses & {"aot", "aot_unpaired"}:
        return False, "trl 1.16 has no WPO weighting for aot / aot_unpaired"
    if case.use_weighting and "sft" in losses:
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
    if set(loss_types) & SMOOTHED_LOSSES:
        return 0.1
    return 0.0


def case_name(case: ParityCase) -> str:
    """A readable name: model, loss types, then every setting that differs from its default."""
    model = case.model_path.rstrip("/").split("/")[-1] if case.model_path else case.arch
    parts = [model, "+".join(case.loss_type)]
    defaults = ParityCase(name="")
    skip = {"name", "arch", "model_path", "loss_type", "label_smoothing"}
    for f in dataclasses.fields(ParityCase):
        value = getattr(case, f.name)
        if f.name in skip or value == getattr(defaults, f.name):
            continue
        if f.name == "dataset_path":
            value = value.rstrip("/").split("/")[-1]
        parts.append(f.name if value is True else f"{f.name}={value}")
    if case.label_smoothing != default_label_smoothing(case.loss_type):
        parts.append(f"label_smoothing={case.label_smoothing}")
    return "-".join(str(p).replace(" ", "") for p in parts)


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
                loss_type=list(losses),
                loss_weights=args.loss_weights,
                beta=args.beta,
                label_smoothing=(
                    default_label_smoothing(losses)
                    if args.label_smoothing is None
                    else args.label_smoothing
                ),
                f_divergence_type=args.f_divergence,
                f_alpha_divergence_coef=args.f_alpha,
                use_weighting=args.use_weighting,
                ld_alpha=args.ld_alpha,
                discopop_tau=args.discopop_tau,
                reference_free=args.reference_free,
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
                seed=args.seed,
            )
            case.name = case_name(case)
            cases.append(case)
    return cases


def _target_modules(values: list[str]) -> list[str] | str:
    """``all-linear`` stays a string (peft's shorthand); anything else is a list of names."""
    return "all-linear" if values == ["all-linear"] else list(values)
