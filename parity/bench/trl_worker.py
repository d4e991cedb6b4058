"""trl's side in a bench worker: ``DPOTrainer`` as parity builds it, with the meter attached.

Imported by ``parity.bench.worker`` only in a worker that trains trl, so our worker does not
load what trl's side needs (a worker's setup time counts its imports).
"""

from __future__ import annotations

import pathlib

from transformers import TrainerCallback

from parity.bench import flops
from parity.bench.meter import Meter
from parity.sides.cases import ParityCase
from parity.sides.trl_side import build_trainer, step_metrics

try:
    from trl.kernels.chunked_logprob import _use_triton
except ImportError:  # another trl: assume the CPU path

    def _use_triton(device) -> bool:
        return False


class TrlMeter(TrainerCallback):
    """Step boundaries from transformers' Trainer (on_step_begin .. on_step_end)."""

    def __init__(self, meter: Meter) -> None:
        self.meter = meter

    def on_step_begin(self, args, state, control, **kwargs):
        self.meter.begin()

    def on_step_end(self, args, state, control, **kwargs):
        self.meter.end()


def _counting_collator(collator, counts: list[int], pairs: list[flops.PairTokens]):
    """``collator`` that also records each batch's completion tokens and ``PairTokens``, in
    batch order."""

    def collate(examples):
        batch = collator(examples)
        counts.append(int(batch["completion_mask"].sum()))
        pairs.append(flops.pair_tokens(batch["attention_mask"], batch["completion_mask"]))
        return batch

    return collate


def _watch_trl(meter: Meter, trainer) -> None:
    """Hook trl's policy and reference model for the FLOP count; trl's head scores completion
    positions only where its Triton kernels run (``compact``), every position elsewhere."""
    policy = trainer.model
    meter.recorder.attach(policy)
    meter.recorder.attach(trainer.ref_model)
    meter.shape = flops.decoder_shape(policy)
    args = trainer.args
    meter.compute_dtype = "bfloat16" if args.bf16 else "float16" if args.fp16 else "float32"
    device = next(policy.parameters()).device
    meter.head_rule = flops.HeadRule("trl", compact=bool(_use_triton(device)))


def run_trl(spec: dict, settings: dict, meter: Meter, out_dir: pathlib.Path):
    """Train trl's ``DPOTrainer`` as ``parity.sides.trl_side`` builds it, with the side's
    ``settings`` (trl ``DPOConfig`` fields); returns the per-step losses and the trained policy."""
    case = ParityCase.from_dict(spec["case"])
    overrides = dict(settings)
    if spec["device"] == "cuda":
        overrides["use_cpu"] = False
    trainer, _ = build_trainer(case, spec["workspace"], out_dir / "run", **overrides)
    trainer.add_callback(TrlMeter(meter))
    _watch_trl(meter, trainer)
    counts: list[int] = []
    pairs: list[flops.PairTokens] = []
    trainer.data_collator = _counting_collator(trainer.data_collator, counts, pairs)
    trainer.train()
    per_step, steps = case.grad_accum, len(meter.step_seconds)
    starts = range(0, per_step * steps, per_step)
    meter.step_tokens = [sum(counts[i : i + per_step]) for i in starts]
    meter.step_pairs = [pairs[i : i + per_step] for i in starts]
    losses = [step["loss"] for step in step_metrics(trainer.state.log_history, case.steps)]
    return losses, trainer.accelerator.unwrap_model(trainer.model)
