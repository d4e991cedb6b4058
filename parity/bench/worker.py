"""One side of ``python -m parity.bench``, alone in its own process so its memory is its own.

    python -m parity.bench.worker SPEC.json SIDE OUT.json

``SPEC.json`` (written by ``parity.bench``) names the prepared workspace, the parity case and
the preset; ``SIDE`` is a key of ``SIDES``. The side trains through its normal entry point (ours:
``training.fit.train``, the Lightning path; trl: ``DPOTrainer.train``) with a meter attached
that times every optimizer step (forward + backward + clipping + optimizer + schedule; batch
collation is outside) and counts its completion tokens. ``OUT.json`` receives the step times,
token counts, per-step losses, the trained model's parameter counts (all, and those that train:
LoRA's adapter only), peak RSS (``getrusage``) and, on a GPU, peak CUDA memory; and the FLOP
accounting of ``parity.bench.flops``: per step the FLOPs the side executed (its backbone calls, recorded
by hooks, and its head rule) and the necessary ones of its pairs, the dtype its matmuls ran in,
and the matmul peak measured in this process after training (same threads, float32 and bf16).
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()  # setup time counts from here (imports included)

import json  # noqa: E402
import os  # noqa: E402
import pathlib  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

from parity.bench import flop_meters, flops  # noqa: E402


@dataclass(frozen=True)
class Side:
    """A row of the benchmark: who trains, with which settings changed.

    Attributes:
        trainer: ``ours`` or ``trl``.
        settings: ours: ``FitConfig`` fields by name; trl: ``DPOConfig`` fields.
        exact: its losses must equal trl's parity run's within float32 tolerance.
    """

    trainer: str
    settings: dict = field(default_factory=dict)
    exact: bool = True
    description: str = ""


SIDES = {
    "ours": Side(
        "ours",
        description="ours, default settings: padding-free prompt sharing, reference log-probs "
        "precomputed (the run reads every row) before the first step, so setup includes them",
    ),
    "ours_one_pair_per_row": Side(
        "ours",
        {"padding_free": False},
        description="ours, --no-padding-free: prompt sharing with one pair per row, padded to "
        "the longest (the default before padding-free)",
    ),
    "ours_live": Side(
        "ours",
        {"precompute_ref_log_probs": False},
        description="ours, --no-precompute-ref-log-probs: live reference forward every step",
    ),
    "ours_plain": Side(
        "ours",
        {"prompt_sharing": False, "precompute_ref_log_probs": False},
        description="ours, --no-prompt-sharing --no-precompute-ref-log-probs: the path parity "
        "checks (each prompt forwarded twice, live reference)",
    ),
    "ours_group_by_length": Side(
        "ours",
        {"group_by_length": True},
        exact=False,
        description="ours, --group-by-length (other batches: losses differ)",
    ),
    "trl": Side("trl", description="trl, parity settings (fp32, no checkpointing)"),
    "trl_defaults": Side(
        "trl",
        {"bf16": True, "gradient_checkpointing": True},
        exact=False,
        description="trl, its defaults: bf16 autocast + gradient checkpointing",
    ),
    "trl_precompute": Side(
        "trl",
        {"precompute_ref_log_probs": True},
        description="trl, parity settings + precompute_ref_log_probs",
    ),
}


class Meter:
    """Times optimizer steps and counts their completion tokens; both trainers feed it."""

    def __init__(self, cuda: bool, profile_step: int | None = None) -> None:
        self.cuda = cuda
        self.profile_step = profile_step  # this step runs under torch.profiler
        self.profile: list[dict] | None = None
        self._profiler = None
        self.step_seconds: list[float] = []
        self.step_cpu_seconds: list[float] = []  # CPU time of all threads: robust to other load
        self.step_tokens: list[int] = []
        self.recorder = flop_meters.PassRecorder()  # backbone calls, recorded inside steps only
        self.step_passes: list[list[flops.Pass]] = []
        self.step_pairs: list[list[flops.PairTokens]] = []  # per micro-batch
        self.shape: flops.DecoderShape | None = None  # the policy's, set when training starts
        self.head_rule: flops.HeadRule | None = None
        self.compute_dtype: str = "float32"
        self.setup_seconds: float | None = None
        self.rss_at_start_mb: float | None = None
        self.threads: int | None = None
        self._start: float | None = None
        self._cpu_start: float | None = None

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def begin(self) -> None:
        self._sync()
        now = time.perf_counter()
        if self.setup_seconds is None:
            import psutil

            self.setup_seconds = now - STARTED
            self.rss_at_start_mb = psutil.Process().memory_info().rss / 2**20
            self.threads = torch.get_num_threads()
        if len(self.step_seconds) == self.profile_step:
            self._profiler = torch.profiler.profile()
            self._profiler.__enter__()
        self.recorder.start()
        self._start = now
        self._cpu_start = time.process_time()

    def end(self) -> None:
        self._sync()
        self.step_seconds.append(time.perf_counter() - self._start)
        self.step_cpu_seconds.append(time.process_time() - self._cpu_start)
        self.step_passes.append(self.recorder.stop())
        if self._profiler is not None:
            self._profiler.__exit__(None, None, None)
            self.profile = top_ops(self._profiler)
            self._profiler = None


def top_ops(profiler, rows: int = 15) -> list[dict]:
    """The ops of a profiled step with the most self CPU time (seconds), largest first."""
    events = sorted(profiler.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    return [
        {
            "op": e.key,
            "self_seconds": e.self_cpu_time_total / 1e6,
            "share": e.self_cpu_time_total / total,
            "calls": e.count,
        }
        for e in events[:rows]
    ]


def _peak_memory(cuda: bool) -> dict[str, float | None]:
    """Peak RSS of this process (MiB; ru_maxrss is KiB on Linux) and peak CUDA allocation."""
    return {
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
    }


# ------------------------------------------------------------------------------------- ours


def _lightning_meter(meter: Meter):
    import lightning as L

    class LightningMeter(L.Callback):
        """Step boundaries from Lightning: the first micro-batch's start to the last one's end."""

        def on_fit_start(self, trainer, pl_module) -> None:
            _watch_ours(meter, pl_module, trainer.precision)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if batch_idx % trainer.accumulate_grad_batches == 0:
                meter.begin()
                meter.step_tokens.append(0)
                meter.step_pairs.append([])
            meter.step_tokens[-1] += int(batch.completion_mask.sum())
            meter.step_pairs[-1].append(
                flops.pair_tokens(batch.attention_mask, batch.completion_mask)
            )

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if (batch_idx + 1) % trainer.accumulate_grad_batches == 0:
                meter.end()

    return LightningMeter()


def _precision_dtype(precision: str, model: torch.nn.Module) -> str:
    """The dtype the matmuls run in: the autocast dtype of a mixed Lightning precision, else
    the weights'."""
    from training.inputs.precompute import AUTOCAST_DTYPES

    dtype = AUTOCAST_DTYPES.get(precision) or next(model.parameters()).dtype
    return str(dtype).removeprefix("torch.")


def _watch_ours(meter: Meter, pl_module, precision: str) -> None:
    """Hook ours' policy and live reference model (None when precomputed) for the FLOP count;
    read the head options it trains with (``flops.ours_head_matmuls``)."""
    from dpo_core.lm_head import uses_linear_kernel
    from dpo_core.model_parts import model_parts

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
    from training.run.config import DPOConfig

    d = DPOConfig()
    return {
        "prompt_sharing": d.prompt_sharing,
        "padding_free": d.padding_free,
        "precompute_ref_log_probs": d.precompute_ref_log_probs,
    }


def run_ours(spec: dict, side: Side, meter: Meter, out_dir: pathlib.Path):
    """Train as ``parity.sides.ours_side`` does, with the side's settings; returns the per-step losses
    and the trained policy."""
    from parity.sides.cases import ParityCase
    from parity.sides.ours_side import train_case

    case = ParityCase.from_dict(spec["case"])
    changes = _our_defaults() | side.settings
    if spec["device"] == "cuda":
        changes["accelerator"] = "gpu"
    meter_callback = _lightning_meter(meter)
    run = train_case(case, spec["workspace"], out_dir / "run", changes, [meter_callback])
    return [step["loss"] for step in run.result.history], run.result.policy


# -------------------------------------------------------------------------------------- trl


def _trl_meter(meter: Meter):
    from transformers import TrainerCallback

    class TrlMeter(TrainerCallback):
        """Step boundaries from transformers' Trainer (on_step_begin .. on_step_end)."""

        def on_step_begin(self, args, state, control, **kwargs):
            meter.begin()

        def on_step_end(self, args, state, control, **kwargs):
            meter.end()

    return TrlMeter()


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
    try:
        from trl.kernels.chunked_logprob import _use_triton
    except ImportError:  # another trl: assume the CPU path
        _use_triton = lambda device: False  # noqa: E731
    policy = trainer.model
    meter.recorder.attach(policy)
    meter.recorder.attach(trainer.ref_model)
    meter.shape = flops.decoder_shape(policy)
    args = trainer.args
    meter.compute_dtype = "bfloat16" if args.bf16 else "float16" if args.fp16 else "float32"
    device = next(policy.parameters()).device
    meter.head_rule = flops.HeadRule("trl", compact=bool(_use_triton(device)))


def run_trl(spec: dict, side: Side, meter: Meter, out_dir: pathlib.Path):
    """Train trl's ``DPOTrainer`` as ``parity.sides.trl_side`` builds it, with the side's settings;
    returns the per-step losses and the trained policy."""
    from parity.sides.cases import ParityCase
    from parity.sides.trl_side import build_trainer, step_metrics

    case = ParityCase.from_dict(spec["case"])
    overrides = dict(side.settings)
    if spec["device"] == "cuda":
        overrides["use_cpu"] = False
    trainer, _ = build_trainer(case, spec["workspace"], out_dir / "run", **overrides)
    trainer.add_callback(_trl_meter(meter))
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


# ------------------------------------------------------------------------------------- main


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    """All parameters of ``model`` (a tied head once) and those that train (LoRA: the adapter)."""
    params = list(model.parameters())
    return {
        "parameters": sum(p.numel() for p in params),
        "trainable_parameters": sum(p.numel() for p in params if p.requires_grad),
    }


def run_side(spec: dict, side_name: str) -> dict:
    """Train one side and return its measurements (see the module docstring)."""
    side = SIDES[side_name]
    cuda = spec["device"] == "cuda"
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    out_dir = pathlib.Path(spec["workdir"]) / "runs" / side_name
    out_dir.mkdir(parents=True, exist_ok=True)
    # --profile: the last step runs under torch.profiler (and is left out of the timing)
    meter = Meter(cuda, profile_step=spec["case"]["steps"] - 1 if spec.get("profile") else None)
    runner = run_ours if side.trainer == "ours" else run_trl
    losses, model = runner(spec, side, meter, out_dir)
    return {
        "side": side_name,
        "trainer": side.trainer,
        "settings": side.settings,
        "exact": side.exact,
        "description": side.description,
        "losses": losses,
        "step_seconds": meter.step_seconds,
        "step_cpu_seconds": meter.step_cpu_seconds,
        "step_completion_tokens": meter.step_tokens,
        "setup_seconds": meter.setup_seconds,
        "rss_at_start_mb": meter.rss_at_start_mb,
        "threads": meter.threads,
        "profile": meter.profile,
        **parameter_counts(model),
        **_peak_memory(cuda),  # read before the peak matmuls allocate their operands
        **flop_meters.flop_counts(meter, "cuda" if cuda else "cpu"),
    }


def main(argv: list[str] | None = None) -> int:
    spec_path, side_name, out_path = argv if argv is not None else sys.argv[1:]
    spec = json.loads(pathlib.Path(spec_path).read_text())
    result = run_side(spec, side_name)
    pathlib.Path(out_path).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
