"""Our side in a bench worker: ``training.fit`` (Lightning) with the meter attached.

Imported by ``parity.bench.worker`` only in a worker that trains ours, so trl's worker does not
load Lightning and training (a worker's setup time counts its imports).
"""

from __future__ import annotations

import pathlib

import lightning as L
import torch

from dpo_core.lm_head import uses_linear_kernel
from dpo_core.model_parts import model_parts
from parity.bench import flops
from parity.bench.meter import Meter
from parity.sides.cases import ParityCase
from parity.sides.ours_side import train_case
from training.base.config import DPOConfig
from training.base.precision import AUTOCAST_DTYPES


class LightningMeter(L.Callback):
    """Step boundaries from Lightning: the first micro-batch's start to the last one's end."""

    def __init__(self, meter: Meter) -> None:
        self.meter = meter

    def on_fit_start(self, trainer, pl_module) -> None:
        _watch_ours(self.meter, pl_module, trainer.precision)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        meter = self.meter
        if batch_idx % trainer.accumulate_grad_batches == 0:
            meter.begin()
            meter.step_tokens.append(0)
            meter.step_pairs.append([])
        meter.step_tokens[-1] += int(batch.completion_mask.sum())
        meter.step_pairs[-1].append(flops.pair_tokens(batch.attention_mask, batch.completion_mask))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches == 0:
            self.meter.end()


def _precision_dtype(precision: str, model: torch.nn.Module) -> str:
    """The dtype the matmuls run in: the autocast dtype of a mixed Lightning precision, else
    the weights'."""
    dtype = AUTOCAST_DTYPES.get(precision) or next(model.parameters()).dtype
    return str(dtype).removeprefix("torch.")


def _watch_ours(meter: Meter, pl_module, precision: str) -> None:
    """Hook ours' policy and live reference model (None when precomputed) for the FLOP count;
    read the head options it trains with (``flops.ours_head_matmuls``)."""
    policy = pl_module.model
    meter.recorder.attach(policy)
    meter.recorder.attach(getattr(pl_module.reference, "model", None))
    meter.shape = flops.decoder_shape(policy)
    meter.compute_dtype = _precision_dtype(str(precision), policy)
    parts = model_parts(policy)
    # the backbone's hidden states come out in the head's dtype
    linear = uses_linear_kernel(parts.head, parts.head.weight.dtype, parts.logit_transform)
    settings = pl_module.settings
    meter.head_rule = flops.HeadRule(
        "ours",
        keep_probs_bytes=settings.keep_probs_bytes,
        chunk_size=settings.chunk_size,
        linear_kernel=linear,
    )


def _our_defaults() -> dict:
    """The speed settings a plain ``python -m training.fit`` run gets (parity's case pins the
    plain path; the benchmark measures what users run)."""
    d = DPOConfig()
    return {
        "prompt_sharing": d.prompt_sharing,
        "padding_free": d.padding_free,
        "precompute_ref_log_probs": d.precompute_ref_log_probs,
    }


def run_ours(spec: dict, settings: dict, meter: Meter, out_dir: pathlib.Path):
    """Train as ``parity.sides.ours_side`` does, with the side's ``settings`` (``FitConfig``
    fields); returns the per-step losses and the trained policy."""
    case = ParityCase.from_dict(spec["case"])
    changes = _our_defaults() | settings
    if spec["device"] == "cuda":
        changes["accelerator"] = "gpu"
    run = train_case(case, spec["workspace"], out_dir / "run", changes, [LightningMeter(meter)])
    return [step["loss"] for step in run.result.history], run.result.policy
