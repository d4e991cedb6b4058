"""Sharded training, ``--strategy fsdp``: FSDP2's ``fully_shard`` through Lightning's
``ModelParallelStrategy``, one code path on CPU processes (gloo) and on GPUs (NCCL).

Parameters, gradients and optimizer state are split across the N processes of the run (a
data-parallel mesh of N, tensor-parallel 1). Units: every decoder layer is one, the root (the
whole model) holds the rest: embeddings, final norm and LM head (tied or not, in one unit, as
FSDP2 needs shared weights). A live frozen reference (a copy of the policy, or ``--ref-model``)
is sharded the same way; the LoRA reference is the policy itself, base weights sharded.

``dpo_core`` never calls the model's own forward: it runs the backbone, then reads the head's
weight in its own kernel (``dpo_core.lm_head``), so the root's forward hooks, which all-gather
the root unit, would not run, and the kernel would see one process's shard. Each ``dpo_core``
call on a sharded model therefore runs inside the root's forward hooks (``in_root_forward``:
FSDP2's ``register_fsdp_forward_method``): the root unit is gathered first, so the head weight
the kernel reads is the whole (plain) tensor, and FSDP reduce-scatters its gradient at the end
of backward as for any unit. The decoder layers gather themselves in their own forwards.

Every process must run each unit as many times per step as the others (each run all-gathers
it, each backward reduce-scatters it, and a collective waits for every process). ``dpo_core``
makes one backbone call per model and forward whichever path a batch takes (plain, packed one
pair per row, or padding-free rows: all packed rows in one call, ``dpo_core.packing``), so the
processes may choose differently for their own rows and still stay in step; the step's settings
are the run's, padding-free included.

What ``dpo_core`` finds on a model by probing it once (its parts, ``model_parts``; whether
packed rows run, ``packing.model_blocker``) is found before sharding, on the whole model, and
kept: ``fully_shard`` swaps each module's class in place, the objects stay the same, so no step
probes a sharded model. After training, ``gathered`` collects the trained weights into an
ordinary model on rank 0, which saves ``model/`` and runs the evaluation.
"""

from __future__ import annotations

import importlib.util
import types
from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

from dpo_core.model_parts import model_parts, unwrap_peft
from dpo_core.packing import model_blocker
from dpo_core.reference import ReferenceSource
from training.base.config import FitConfig
from training.base.errors import RunError
from training.run.sharded_checkpoint import ShardedCheckpointStrategy

SHARDED = "fsdp"  # the --strategy value that shards with FSDP2
_IN_FORWARD = "dpo_in_root_forward"  # the method FSDP2 wraps with the root's forward hooks


def is_sharded(cfg: FitConfig) -> bool:
    """Whether the run shards its models (``--strategy fsdp``)."""
    return cfg.trainer.strategy == SHARDED


def check_strategy(cfg: FitConfig) -> None:
    """One line (``RunError``), before anything loads, for a strategy this run cannot use:
    DeepSpeed without its package or without a GPU (it is passed to Lightning untested), and
    the combinations ``--strategy fsdp`` does not support."""
    strategy, accelerator = cfg.trainer.strategy, cfg.trainer.accelerator
    if strategy.startswith("deepspeed"):
        if importlib.util.find_spec("deepspeed") is None:
            raise RunError(
                f"--strategy {strategy} needs the deepspeed package, which is not installed "
                "(pip install deepspeed); --strategy fsdp shards without it, on CPU or GPU"
            )
        if accelerator == "cpu":
            raise RunError(f"--strategy {strategy} needs a GPU; --strategy fsdp shards on CPU")
    if not is_sharded(cfg):
        return
    if cfg.trainer.precision in ("16-mixed", "16"):
        raise RunError(
            "--strategy fsdp takes --precision 32-true, bf16-mixed, bf16-true or 16-true, not "
            f"{cfg.trainer.precision} (Lightning's ModelParallelStrategy has no loss scaler)"
        )
    if cfg.lora.load_in_4bit:
        raise RunError("--strategy fsdp cannot shard 4-bit weights: use --lora without 4-bit")


def lightning_strategy(cfg: FitConfig):
    """What ``L.Trainer(strategy=...)`` gets: Lightning's ``ModelParallelStrategy`` (FSDP2) on a
    data-parallel mesh of every process for ``fsdp``, else the name as given. Lightning's own
    ``fsdp`` is FSDP1, which refuses CPU. Its checkpoints are sharded, each process writing its
    own shard, atomically (``training.run.sharded_checkpoint``)."""
    if not is_sharded(cfg):
        return cfg.trainer.strategy
    return ShardedCheckpointStrategy(data_parallel_size=cfg.trainer.world_size)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a transformers model (optionally peft-wrapped): the modules of the
    classes its ``_no_split_modules`` names (``LlamaDecoderLayer``), the unit transformers
    itself never splits across devices."""
    base = unwrap_peft(model)
    names = set(getattr(base, "_no_split_modules", None) or ())
    layers = [m for m in base.modules() if type(m).__name__ in names]
    if not layers:
        raise RunError(
            f"--strategy fsdp: {type(base).__name__} names no decoder layer class "
            "(_no_split_modules), so it cannot be sharded one layer per unit"
        )
    return layers


def shard_model(model: nn.Module, mesh, prompt_sharing: bool) -> None:
    """Shard ``model`` in place across ``mesh``: each decoder layer, then the root (see the
    module docstring). Its parts and fast-path verdict are found first, on the whole model."""
    model_parts(model)  # cached per model (by module names): never probed once sharded
    if prompt_sharing:
        model_blocker(model)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    setattr(model, _IN_FORWARD, types.MethodType(_call, model))
    register_fsdp_forward_method(model, _IN_FORWARD)


def _call(_model: nn.Module, fn: Callable, *args):
    """``fn(*args)``: the body FSDP2 wraps in the root's forward hooks."""
    return fn(*args)


def in_root_forward(model: nn.Module, fn: Callable, *args):
    """``fn(*args)``, inside ``model``'s root forward hooks when it is sharded (its root unit
    gathered for the call), else directly."""
    wrapped = getattr(model, _IN_FORWARD, None)
    return fn(*args) if wrapped is None else wrapped(fn, *args)


class ShardedReference(ReferenceSource):
    """A live reference model that is sharded: the source runs inside its root's forward hooks,
    and the root unit is resharded after (no backward will do it: the reference has no grad)."""

    def __init__(self, source) -> None:
        self.source = source
        self.model = source.model
        self.name = source.name

    def __call__(self, batch, options):
        try:
            return in_root_forward(self.model, self.source, batch, options)
        finally:
            self.model.reshard()


def full_value(t: torch.Tensor) -> torch.Tensor:
    """A (possibly distributed) tensor's whole value: a DTensor's ``full_tensor()``."""
    full = getattr(t, "full_tensor", None)
    return full() if callable(full) else t


def gathered(model: nn.Module, rebuild: Callable[[], nn.Module], is_global_zero: bool):
    """The sharded ``model``'s weights as an ordinary model on rank 0 (None elsewhere): every
    process takes part in gathering the full state dict; rank 0 loads it into ``rebuild()``, a
    freshly loaded model of the same structure (adapters included), all keys matching."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    if not is_global_zero:
        return None
    plain = rebuild()
    plain.load_state_dict(state, strict=True)
    return plain
