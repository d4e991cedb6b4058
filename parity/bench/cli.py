"""``python -m parity.bench``: train ours and trl's DPOTrainer side by side; time, memory, losses.

Both sides train the same model, rows, batch, optimizer and schedule from the same files
(``parity.bench.presets``), each in its own process (``parity.bench.worker``), one after the
other, so each peak memory is its own. Per side it reports the median seconds per optimizer step
over the steps after warm-up, completion tokens per second, and peak RSS (peak CUDA memory on a
GPU), then the ratios against trl. trl runs at the parity settings (float32, no gradient
checkpointing: the same numbers as ours) and at its own defaults (bf16 autocast + gradient
checkpointing: faster on some CPUs, other numbers).

How close each side is to the limit (``parity.bench.flops``): the FLOPs it executes per step (its
backbone calls and its head; ``flops_per_step``, ``flops_per_s``, ``hfu``), the necessary FLOPs
of the step's pairs, the same for every side (``model_flops_per_step``, ``mfu``), both against
the matmul peak measured in the same run on the same threads (``peak_flops_per_s``, per dtype:
bf16 for trl's defaults).

A fast wrong answer is worthless: every exact side's per-step losses must equal trl's parity
run's within ``--loss-tolerance``; otherwise the table says so and the exit status is 1.

    python -m parity.bench                                   # cpu-small
    python -m parity.bench --preset hh-rlhf --json hh.json
    python -m parity.bench --preset cpu-bigvocab --sides ours trl
    python -m parity.bench --preset smollm2 --sides trl ours --lora   # real model, LoRA
    python -m parity.bench --model ./my-model --dataset prefs.jsonl --steps 20 --batch-size 4
    python -m parity.bench --preset hh-rlhf --sides trl ours --busy 1 --busy-kind torch

``--busy N`` runs N busy processes beside the sides for the whole measurement (``--busy-kind``
loop or torch: ``parity.bench.busy``); the report records them (``config.busy``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile

import torch
import transformers
import trl

from parity.bench.busy import KINDS, busy_processes
from parity.bench.presets import PRESETS, Preset, prepare_assets, with_overrides
from parity.bench.table import HEADLINE, bench_table, busy_label
from parity.bench.worker import SIDES
from parity.check.tolerances import ALL_STEPS

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
DEFAULT_SIDES = ["trl", "ours", "ours_plain", "trl_defaults"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m parity.bench", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="cpu-small", choices=sorted(PRESETS))
    p.add_argument(
        "--model", help="local causal-LM directory (with tokenizer) instead of the preset's"
    )
    p.add_argument("--dataset", help="local preference file instead of the preset's rows")
    p.add_argument("--steps", type=int, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, help="untimed optimizer steps before them")
    p.add_argument("--batch-size", type=int, help="pairs per optimizer step")
    p.add_argument("--max-length", type=int, help="truncation length of prompt + completion")
    p.add_argument("--threads", type=int, help="torch CPU threads per side")
    p.add_argument(
        "--lora",
        action=argparse.BooleanOptionalAction,
        help="both sides train a LoRA adapter (rank 8, alpha 16, all-linear, one shared initial "
        "adapter) instead of every weight; default: the preset's",
    )
    p.add_argument(
        "--sides", nargs="+", default=DEFAULT_SIDES, choices=sorted(SIDES), help="rows to run"
    )
    p.add_argument("--repeat", type=int, default=1, help="run every side N times, keep the best")
    p.add_argument(
        "--loss-tolerance",
        type=float,
        default=ALL_STEPS,
        help="largest |loss - trl loss| / max(1, |trl loss|) over all steps (parity's bound)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="run each side's last step under torch.profiler (top ops in the JSON, step untimed)",
    )
    p.add_argument(
        "--busy",
        type=int,
        default=0,
        metavar="N",
        help="run N busy processes beside the sides, from before the first to the end (a "
        "shared machine; parity.bench.busy)",
    )
    p.add_argument(
        "--busy-kind",
        choices=KINDS,
        help="what each busy process runs: loop (pure Python, one core; the default with "
        "--busy) or torch (matmuls on torch's default thread count)",
    )
    p.add_argument("--json", type=pathlib.Path, help="write the report here")
    p.add_argument("--workdir", type=pathlib.Path, help="keep models, data and runs here")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line; ``--busy-kind`` without ``--busy N`` is refused (it would do nothing)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.busy < 0:
        parser.error(f"--busy {args.busy}: want a number of processes >= 0")
    if args.busy_kind is not None and args.busy == 0:
        parser.error(f"--busy-kind {args.busy_kind} needs --busy N (N >= 1 busy processes)")
    if args.busy and args.busy_kind is None:
        args.busy_kind = "loop"
    return args


def resolve_preset(args: argparse.Namespace) -> Preset:
    return with_overrides(
        PRESETS[args.preset],
        steps=args.steps,
        warmup=args.warmup,
        batch_size=args.batch_size,
        max_length=args.max_length,
        threads=args.threads,
        lora=args.lora,
    )


def run_worker(spec_path: pathlib.Path, side: str, workdir: pathlib.Path, threads) -> dict:
    """Run one side in a fresh Python process; its output goes to ``runs/<side>.log``."""
    out = workdir / "runs" / f"{side}.json"
    log = workdir / "runs" / f"{side}.log"
    out.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    command = [sys.executable, "-m", "parity.bench.worker", str(spec_path), side, str(out)]
    with open(log, "w") as f:
        done = subprocess.run(command, cwd=REPO_ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = log.read_text().splitlines()[-25:]
        raise RuntimeError(f"side {side!r} failed ({done.returncode}):\n" + "\n".join(tail))
    return json.loads(out.read_text())


def summarize(raw: dict, warmup: int) -> dict:
    """Add the headline figures of one side to its raw measurements (the steps after warm-up,
    less a profiled last step)."""
    timed = slice(warmup, -1 if raw.get("profile") else None)
    seconds = raw["step_seconds"][timed]
    cpu = raw.get("step_cpu_seconds", [])[timed]
    tokens = raw["step_completion_tokens"][timed]
    return {
        **raw,
        "seconds_per_step": statistics.median(seconds) if seconds else float("nan"),
        "cpu_seconds_per_step": statistics.median(cpu) if cpu else float("nan"),
        "completion_tokens_per_second": sum(tokens) / sum(seconds) if seconds else float("nan"),
        **flop_summary(raw, timed, seconds),
    }


def flop_summary(raw: dict, timed: slice, seconds: list[float]) -> dict:
    """Over the timed steps: the mean FLOPs per step, executed (by part) and necessary, and the
    rates Σ FLOPs / Σ seconds (as tokens per second); empty when the side counted none."""
    executed, necessary = raw.get("step_flops", [])[timed], raw.get("step_model_flops", [])[timed]
    if not executed or not seconds:
        return {}
    parts = {k: sum(step[k] for step in executed) / len(executed) for k in executed[0]}
    return {
        "flops_per_step": parts["total"],
        "flops_breakdown": parts,
        "model_flops_per_step": sum(necessary) / len(necessary),
        "flops_per_s": sum(step["total"] for step in executed) / sum(seconds),
        "model_flops_per_s": sum(necessary) / sum(seconds),
    }


def matmul_peaks(runs: list[dict]) -> dict[str, float]:
    """The best matmul FLOP/s per dtype over every run's own measurement (each measured in its
    worker after training, on the same threads): the machine's limit in this run."""
    peaks: dict[str, float] = {}
    for run in runs:
        for dtype, value in run.get("matmul_peak_flops_per_s", {}).items():
            peaks[dtype] = max(peaks.get(dtype, 0.0), value)
    return peaks


def with_utilisation(side: dict, peaks: dict[str, float]) -> dict:
    """``side`` with ``mfu`` (necessary FLOP/s / peak) and ``hfu`` (executed FLOP/s / peak),
    against the peak of the dtype its matmuls ran in (``peak_dtype``)."""
    dtype = side.get("compute_dtype")
    if "flops_per_s" not in side or dtype not in peaks:
        return side
    peak = peaks[dtype]
    return {
        **side,
        "peak_dtype": dtype,
        "peak_flops_per_s": peak,
        "mfu": side["model_flops_per_s"] / peak,
        "hfu": side["flops_per_s"] / peak,
    }


def best_of(runs: list[dict]) -> dict:
    """The run with the lowest seconds per step (repeats only fight noise from other load)."""
    return min(runs, key=lambda r: r["seconds_per_step"])


def loss_check(sides: dict[str, dict], tolerance: float) -> dict:
    """Largest relative loss difference of every side from trl's parity run, and the verdict."""
    if "trl" not in sides:
        return {"reference": None, "tolerance": tolerance, "ok": True, "max_diff": {}}
    reference = sides["trl"]["losses"]
    diffs = {}
    for name, side in sides.items():
        if name == "trl":
            continue
        pairs = list(zip(side["losses"], reference, strict=True))
        diffs[name] = max(abs(a - b) / max(1.0, abs(b)) for a, b in pairs)
    ok = all(diffs[n] <= tolerance for n in diffs if sides[n]["exact"])
    return {"reference": "trl", "tolerance": tolerance, "ok": ok, "max_diff": diffs}


def ratio(sides: dict, num: str, den: str, key: str) -> float | None:
    if num not in sides or den not in sides:
        return None
    return sides[num][key] / sides[den][key]


def build_report(
    preset: Preset, case, sides: dict[str, dict], check: dict, beside: dict, peaks: dict
) -> dict:
    """The JSON report: headline sides, ratios, the matmul peaks, the loss check and the
    settings; ``beside``: the machine's ``load`` and the ``busy`` processes beside the sides."""
    sides = {name: with_utilisation(side, peaks) for name, side in sides.items()}
    report = {name: sides.get(name) for name in HEADLINE}
    report["speedup"] = ratio(sides, "trl", "ours", "seconds_per_step")
    report["peak_memory_ratio"] = ratio(sides, "ours", "trl", "peak_rss_mb")
    if preset.device == "cuda":
        report["peak_cuda_memory_ratio"] = ratio(sides, "ours", "trl", "peak_cuda_mb")
    report["speedup_vs_trl_defaults"] = ratio(sides, "trl_defaults", "ours", "seconds_per_step")
    report["bf16_speedup"] = ratio(sides, "ours", "ours_bf16", "seconds_per_step")
    report["variants"] = {k: v for k, v in sides.items() if k not in HEADLINE}
    report["peak_flops_per_s"] = peaks.get("float32")
    report["peak_flops_per_s_by_dtype"] = peaks
    report["loss_check"] = check
    report["config"] = {
        "preset": preset.name,
        "description": preset.description,
        "preset_settings": {k: v for k, v in vars(preset).items() if k != "description"},
        "model_path": case.model_path,
        "dataset_path": case.dataset_path,
        "rows": case.num_rows,
        "training": training_label(case),
        "lora": lora_settings(case),
        "busy": beside["busy"],
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "cpu_features": cpu_features(),
            "load": beside["load"],
        },
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": trl.__version__,
        },
    }
    return report


def lora_settings(case) -> dict | None:
    """The adapter both sides trained (None: full fine-tuning)."""
    if not case.lora:
        return None
    return {"r": case.lora_r, "alpha": case.lora_alpha, "target_modules": case.lora_target_modules}


def training_label(case) -> str:
    """``full fine-tuning`` or ``LoRA r=8 alpha=16 all-linear``: what the table's rows trained."""
    lora = lora_settings(case)
    if lora is None:
        return "full fine-tuning"
    targets = lora["target_modules"]
    targets = targets if isinstance(targets, str) else ",".join(targets)
    return f"LoRA r={lora['r']} alpha={lora['alpha']} {targets}"


# CPU features that decide float32 and bf16 matmul speed (bf16 without them is emulated: slow).
CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def cpu_features() -> list[str]:
    """Which of ``CPU_FEATURES`` this machine's CPU has (Linux; empty elsewhere)."""
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next(
        (line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")),
        [],
    )
    return [f for f in CPU_FEATURES if f in flags]


def run(args: argparse.Namespace, workdir: pathlib.Path) -> dict:
    """Prepare the files, run every side (``--repeat`` times) and build the report."""
    preset = resolve_preset(args)
    case, ws = prepare_assets(preset, workdir, model=args.model, dataset=args.dataset)
    spec = {
        "case": dataclasses.asdict(case),  # ParityCase.from_dict reads it back
        "workspace": str(workdir / "case"),
        "workdir": str(workdir),
        "device": preset.device,
        "threads": preset.threads,
        "profile": args.profile,
    }
    spec_path = workdir / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {side: [] for side in args.sides}
    with busy_processes(args.busy, args.busy_kind) as busy:
        if args.busy:
            print(f"[bench] beside the sides: {busy_label(busy.describe())}", file=sys.stderr)
        for _ in range(args.repeat):
            for side in args.sides:
                print(f"[bench] {preset.name}: {side}", file=sys.stderr, flush=True)
                raw = run_worker(spec_path, side, workdir, preset.threads)
                runs[side].append(summarize(raw, preset.warmup))
        load = {"before": load_before, "after": os.getloadavg()}
    sides = {side: best_of(r) for side, r in runs.items()}
    peaks = matmul_peaks([run for r in runs.values() for run in r])
    check = loss_check(sides, args.loss_tolerance)
    beside = {"load": load, "busy": busy.describe()}
    return build_report(preset, case, sides, check, beside, peaks)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        workdir = (args.workdir or pathlib.Path(tmp)).resolve()
        report = run(args, workdir)
    print(bench_table(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    return 0 if report["loss_check"]["ok"] else 1
