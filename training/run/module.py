"""The LightningModule: a thin wrapper that feeds batches to ``dpo_core.step.dpo_step``.

``training_step`` and ``validation_step`` share one step; this file only wires it to Lightning:
optimizer and schedule (as transformers' Trainer builds them, so runs compare with trl; the
schedules are ``training.run.schedules``), the per-optimizer-step metric reduction trl uses
(mean over micro-batches of sums/counts reduced across processes), the pre-clip ``grad_norm``, a stop on a non-finite loss or gradient
(``training.run.nan_stop`` decides what is kept), and what a checkpoint carries for ``--resume``
beyond weights and optimizer: the token count, the run record (config and data fingerprint,
``training.run.resume``), the last step's metrics row and every process's random-number state
(``training.run.rng``).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import NoReturn

import lightning as L
import torch
from lightning.pytorch.plugins.precision import MixedPrecision

from dpo_core.step import StepOutput, dpo_step
from training.base.config import FitConfig
from training.base.precision import AUTOCAST_DTYPES
from training.base.settings import dpo_settings
from training.base.step_count import trl_step
from training.inputs.four_bit import check_not_packed
from training.run import rng
from training.run.nan_stop import NonFiniteStop
from training.run.schedules import lr_multiplier
from training.run.sharding import (
    ShardedReference,
    full_value,
    in_root_forward,
    is_sharded,
    shard_model,
)

# Shown in the progress bar (all metrics go to the loggers).
PROGRESS_BAR_KEYS = ("loss", "rewards/accuracies", "rewards/margins")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters in two groups, decay and no-decay (biases and norm weights), as
    transformers' ``Trainer.get_decay_parameter_names`` splits them."""
    decay, no_decay, seen = [], [], set()
    for module_name, module in model.named_modules():
        is_norm = "norm" in type(module).__name__.lower()
        for name, p in module.named_parameters(recurse=False):
            # A tied weight (embeddings = LM head) belongs to two modules: step it once only.
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            full = f"{module_name}.{name}" if module_name else name
            (no_decay if is_norm or name == "bias" or "bias" in full else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def as_logged(value: float) -> float:
    """``value`` as Lightning's loggers write it: ``self.log`` stores a Python float as a tensor
    of the default dtype (float32), and the logger writes its ``.item()``."""
    return torch.tensor(value, dtype=torch.get_default_dtype()).item()


class DPOModule(L.LightningModule):
    """Trains ``model`` with DPO against ``reference``, a ``dpo_core.reference`` source
    (``NoReference`` when reference-free, ``PrecomputedReference`` when precomputed).

    ``run_record``: the run's config and data fingerprint, saved in every checkpoint so that
    ``--resume`` can compare them (``training.run.resume``). ``resume_changes``: how many of them
    a resume was allowed to change (logged as a metric; its new optimizer settings then replace
    the restored ones when training starts)."""

    def __init__(
        self,
        model: torch.nn.Module,
        reference,
        cfg: FitConfig,
        total_steps: int,
        run_record: dict | None = None,
        resume_changes: int = 0,
    ):
        super().__init__()
        self.model = model
        self.reference = reference  # a dpo_core.reference source; not a registered submodule
        self.cfg = cfg
        self.settings = dpo_settings(cfg)
        self.total_steps = total_steps
        self._micro: list[StepOutput] = []
        self.num_tokens = 0.0
        self.last_logged: dict[str, float] = {}
        self.history: list[dict[str, float]] = []  # one entry per optimizer step
        self.run_record = run_record or {}
        self.resume_changes = resume_changes
        self.last_row: dict[str, float] = {}  # the last step's metrics row, as the CSV has it
        self._rng_to_restore: dict | None = None  # a resumed run's generator states (rng)

    # -- the shared step ----------------------------------------------------------------------
    def step(self, batch) -> StepOutput:
        # a sharded model's dpo_core calls run inside its root's forward (training.run.sharding)
        return in_root_forward(
            self.model, dpo_step, self.model, batch, self.reference, self.settings
        )

    def configure_model(self) -> None:
        """Under ``--strategy fsdp``, shard the policy and a live frozen reference across the
        data-parallel mesh (``training.run.sharding``); once, however often Lightning calls."""
        if not is_sharded(self.cfg) or hasattr(self.model, "reshard"):
            return
        mesh = self.device_mesh["data_parallel"]
        shard_model(self.model, mesh, self.cfg.dpo.prompt_sharing)
        ref_model = getattr(self.reference, "model", None)
        if ref_model is not None and ref_model is not self.model:
            shard_model(ref_model, mesh, self.cfg.dpo.prompt_sharing)
            self.reference = ShardedReference(self.reference)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        out = self.step(batch)
        if not torch.isfinite(out.loss):
            self._stop(f"non-finite DPO loss ({out.loss.item()})", f"micro-batch {batch_idx}")
        self._micro.append(out.detached())
        return out.loss

    def _stop(self, what: str, where: str) -> NoReturn:
        """Stop training before a non-finite value reaches the weights (or a checkpoint)."""
        raise NonFiniteStop(what, where, self.global_step)

    def validation_step(self, batch, batch_idx: int) -> None:
        out = self.step(batch).detached()
        values = self._reduce([out])
        self.log_dict(
            {f"eval_{k}": v for k, v in values.items()},
            on_step=False,
            on_epoch=True,
            batch_size=batch.num_pairs,
            sync_dist=False,  # already reduced across processes in _reduce
        )

    # -- metrics per optimizer step -----------------------------------------------------------
    def _all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.trainer.world_size > 1:
            return self.trainer.strategy.reduce(t, reduce_op="sum")
        return t

    def _reduce(self, micro: list[StepOutput]) -> dict[str, float]:
        """trl's reduction: per micro-batch value = (sum over processes) / (count over processes),
        then the plain mean over micro-batches; ``loss`` is the mean of micro-batch losses."""
        per_key: dict[str, list[float]] = defaultdict(list)
        for out in micro:
            keys = sorted(out.sums)
            sums = self._all_reduce_sum(torch.stack([out.sums[k] for k in keys]).double())
            counts = self._all_reduce_sum(torch.stack([out.counts[k] for k in keys]).double())
            for k, s, c in zip(keys, sums.tolist(), counts.tolist(), strict=True):
                per_key[k].append(s / c if c > 0 else math.nan)
            loss = self._all_reduce_sum(out.loss.double().reshape(1)) / self.trainer.world_size
            per_key["loss"].append(loss.item())
        return {k: sum(v) / len(v) for k, v in per_key.items()}

    def on_before_optimizer_step(self, optimizer) -> None:
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        # The pre-clip total norm as clip_grad_norm_ computes it (in the gradients' dtype), which
        # is what transformers' Trainer logs as grad_norm.
        # (sharded gradients: the norm over every process's shards, as clipping takes it)
        grad_norm = full_value(torch.nn.utils.get_total_norm(grads)).item() if grads else 0.0
        if not math.isfinite(grad_norm):  # the update would write nan/inf into every weight
            self._stop(f"non-finite gradient norm ({grad_norm})", "before the optimizer step")
        values = self._reduce(self._micro)
        tokens = sum(out.num_tokens for out in self._micro)
        self.num_tokens += self._all_reduce_sum(torch.tensor(float(tokens))).item()
        self._micro = []
        values.update(
            grad_norm=grad_norm,
            learning_rate=optimizer.param_groups[0]["lr"],
            num_tokens=self.num_tokens,
        )
        if self.resume_changes:
            values["resume_changes"] = float(self.resume_changes)
        self.last_logged = values
        row = {k: as_logged(v) for k, v in values.items()}
        # the row as metrics.csv writes it: at the step this update completes (trl's count)
        step = trl_step(self.global_step)
        self.last_row = {**row, "epoch": self.current_epoch, "step": step}
        self.history.append(values)
        bar = {k: v for k, v in values.items() if k in PROGRESS_BAR_KEYS}
        rest = {k: v for k, v in values.items() if k not in PROGRESS_BAR_KEYS}
        self.log_dict(bar, on_step=True, on_epoch=False, prog_bar=True, rank_zero_only=True)
        self.log_dict(rest, on_step=True, on_epoch=False, rank_zero_only=True)

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ) -> None:
        """Clip as configured. Under bf16 autocast no gradient is scaled, so clipping before the
        fused AdamW step is exact, as in fp32 (transformers' Trainer does so with ``bf16=True``);
        Lightning's mixed-precision plugin refuses any fused optimizer, scaler or not."""
        plugin = self.trainer.precision_plugin
        if gradient_clip_val and isinstance(plugin, MixedPrecision) and plugin.scaler is None:
            plugin.clip_grad_by_norm(optimizer, gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # -- optimizer ----------------------------------------------------------------------------
    def configure_optimizers(self):
        o = self.cfg.optim
        # fp16 (16-mixed) scales the loss; a fused AdamW would unscale inside its step, after
        # clipping has seen the scaled gradients, so it is used everywhere else only.
        fp16 = AUTOCAST_DTYPES.get(self.cfg.trainer.precision) is torch.float16
        fused = not fp16 and all(p.device.type in ("cpu", "cuda") for p in self.model.parameters())
        optimizer = torch.optim.AdamW(
            param_groups(self.model, o.weight_decay),
            lr=o.learning_rate,
            betas=(o.adam_beta1, o.adam_beta2),
            eps=o.adam_epsilon,
            fused=fused,
        )
        # transformers' TrainingArguments.get_warmup_steps: warmup_steps, else the ratio's ceil
        warmup = o.warmup_steps or math.ceil(o.warmup_ratio * self.total_steps)
        lam = lr_multiplier(o.lr_scheduler_type, warmup=warmup, total=self.total_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lam)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    # -- state beyond weights and optimizer that --resume must restore --------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["num_tokens"] = self.num_tokens  # a running total, as trl's num_tokens
        # Lightning saves the checkpoint before it writes the step's metrics row: a kill in
        # between would lose the row for good, so the checkpoint carries it (metrics_csv).
        checkpoint["dpo_run"] = {**self.run_record, "last_row": dict(self.last_row)}
        checkpoint["rng_states"] = rng.collect_all_ranks()  # dropout continues as if not stopped

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.num_tokens = float(checkpoint.get("num_tokens", 0.0))
        self._rng_to_restore = rng.for_rank(checkpoint.get("rng_states"), self.global_rank)

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        if self._rng_to_restore is not None:  # the first batch after a resume
            rng.restore(self._rng_to_restore)
            self._rng_to_restore = None

    def reference_to(self, device) -> None:
        """Move a separate reference model (not a registered submodule) to ``device``."""
        model = getattr(self.reference, "model", None)
        if model is not None and model is not self.model:
            model.to(device)

    def on_fit_start(self) -> None:
        self.reference_to(self.device)
        self.model.train()  # from_pretrained returns eval mode; trl's Trainer trains in train mode

    def on_train_start(self) -> None:
        # after the reference precomputation and the "before" evaluation (no-grad passes)
        check_not_packed(self.model, "training start")
        if self.resume_changes:  # after Lightning restored the checkpoint's optimizer state
            apply_optim_config(
                self.optimizers(use_pl_optimizer=False), self.lr_schedulers(), self.cfg
            )

    def on_train_epoch_start(self) -> None:
        # Lightning keeps submodules' modes; a model from from_pretrained starts in eval mode.
        self.model.train()


def apply_optim_config(optimizer, scheduler, cfg: FitConfig) -> None:
    """Put ``cfg.optim``'s settings into a restored optimizer and schedule: a resume allowed to
    change them (``--resume-allow-changes``) trains with the new learning rate, betas, epsilon
    and weight decay from the restored step on (Lightning restores the old ones, and LambdaLR
    its old base learning rates). The schedule's shape comes from ``cfg`` already
    (``configure_optimizers``)."""
    o = cfg.optim
    for i, group in enumerate(optimizer.param_groups):
        group["initial_lr"] = o.learning_rate
        group["betas"] = (o.adam_beta1, o.adam_beta2)
        group["eps"] = o.adam_epsilon
        if i == 0:  # param_groups puts the decayed weights first, the rest at 0
            group["weight_decay"] = o.weight_decay
    scheduler.base_lrs = [o.learning_rate] * len(optimizer.param_groups)
    lrs = [lam(scheduler.last_epoch) * o.learning_rate for lam in scheduler.lr_lambdas]
    for group, lr in zip(optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    scheduler._last_lr = lrs
