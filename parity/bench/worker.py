"""One side of ``python -m parity.bench``, alone in its own process so its memory is its own.

    python -m parity.bench.worker SPEC.json SIDE OUT.json

``SPEC.json`` (written by ``parity.bench.cli``) names the prepared workspace, the parity case and
the preset; ``SIDE`` is a key of ``SIDES``. The side trains through its normal entry point (ours:
``training.fit.train``, the Lightning path, in ``parity.bench.ours_worker``; trl:
``DPOTrainer.train``, in ``parity.bench.trl_worker``) with a meter attached
(``parity.bench.meter``) that times every optimizer step (forward + backward + clipping +
optimizer + schedule; batch collation is outside) and counts its completion tokens.
``OUT.json`` receives the step times, token counts, per-step losses, the trained model's
parameter counts (all, and those that train: LoRA's adapter only), peak RSS (``getrusage``)
and, on a GPU, peak CUDA memory; and the FLOP accounting of ``parity.bench.flops``: per step the
FLOPs the side executed (its backbone calls, recorded by hooks, and its head rule) and the
necessary ones of its pairs, the dtype its matmuls ran in, and the matmul peak measured in this
process after training (same threads, float32 and bf16).
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()  # setup time counts from here (imports included)

import json  # noqa: E402
import os  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")


def _wait_as_its_users_do(argv: list[str]) -> None:
    """Ours' side runs with the OpenMP waits a ``python -m training.fit`` run has: importing
    ``training`` makes them passive (``training.base.openmp_waits``), which libgomp reads when
    torch loads, so it must come first. trl's side keeps libgomp's default, as trl's users do."""
    if len(argv) > 2 and argv[2].startswith("ours"):
        import training  # noqa: F401


if __name__ == "__main__":
    _wait_as_its_users_do(sys.argv)

import torch  # noqa: E402

from parity.bench import flop_meters  # noqa: E402
from parity.bench.meter import Meter, peak_memory  # noqa: E402


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
    "ours_bf16": Side(
        "ours",
        {"precision": "bf16-mixed"},
        exact=False,
        description="ours, --precision bf16-mixed: bf16 autocast, fp32 weights and optimizer "
        "(bf16 rounding: losses differ from trl's fp32 run; `python -m parity --precision "
        "bf16-mixed` checks it against trl's bf16)",
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


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    """All parameters of ``model`` (a tied head once) and those that train (LoRA: the adapter)."""
    params = list(model.parameters())
    return {
        "parameters": sum(p.numel() for p in params),
        "trainable_parameters": sum(p.numel() for p in params if p.requires_grad),
    }


def _trainer(name: str):
    """The training function of trainer ``name`` (``ours`` or ``trl``)."""
    # why here: a worker imports its own side only; its setup time counts its imports
    if name == "ours":
        from parity.bench.ours_worker import run_ours

        return run_ours
    from parity.bench.trl_worker import run_trl

    return run_trl


def run_side(spec: dict, side_name: str) -> dict:
    """Train one side and return its measurements (see the module docstring)."""
    side = SIDES[side_name]
    cuda = spec["device"] == "cuda"
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    out_dir = pathlib.Path(spec["workdir"]) / "runs" / side_name
    out_dir.mkdir(parents=True, exist_ok=True)
    # --profile: the last step runs under torch.profiler (and is left out of the timing)
    profile_step = spec["case"]["steps"] - 1 if spec.get("profile") else None
    meter = Meter(cuda, STARTED, profile_step)
    losses, model = _trainer(side.trainer)(spec, side.settings, meter, out_dir)
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
        "openmp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "libgomp default"),
        "profile": meter.profile,
        **parameter_counts(model),
        **peak_memory(cuda),  # read before the peak matmuls allocate their operands
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
