"""``python -m parity.gpu_check``: the prepared single-GPU check, all of its results in one JSON.

On one GPU it runs, in under 8 minutes (``--budget-s``, default 460):

- ``env``: torch, CUDA, the GPU, the packages (``parity.gpu_check.env_probe``);
- ``gpu_tests``: the suite's gpu-marked tests (``pytest -m gpu``: tests/training/test_cuda.py);
- ``parity_fp32``, ``parity_bf16``: ``python -m parity --device cuda`` in float32 and
  bf16-mixed (sigmoid); ``qlora_4bit``: the same with ``--load-in-4bit`` (bf16);
- ``attention``: which SDPA kernel runs under prompt sharing's 4D mask, and whether sharing is
  then still faster than the plain path (``parity.gpu_check.attention_probe``);
- ``bench_gpu``: ``python -m parity.bench --preset gpu``, ours and ours_plain against trl at the
  parity settings and at its defaults, with peak CUDA memory;
- ``parity_fp32_lora``, ``parity_bf16_ipo``, ``parity_bf16_lora``: more parity cases, last
  because they repeat the earlier ones' machinery.

Each stage is a child process with its own timeout (never more than the budget left), so a
crash or a hang is recorded and the next stage runs; the JSON is rewritten after every stage
(and names the one running), so a killed run still leaves what it finished. A stage's record:
``stage, ok, seconds, command, returncode, timed_out, summary, result`` (the sub-run's own JSON,
or pytest's counts) and, when it failed, ``tail`` (the end of its output). Prints a table; exit
status 0 only if every stage ran and passed.

``--dry-run`` runs the same stages on the CPU at tiny sizes (the gpu-marked tests with the CPU
standing in for the GPU, parity for 2 steps, the ``tiny`` bench preset, the ``tiny`` attention
probe), one thread per process: it checks the script and every stage's plumbing in ~3 minutes
(tests/parity/gpu_check/test_cli.py), not the GPU's numbers.

    python -m parity.gpu_check --json gpu_check.json              # on a GPU machine
    python -m parity.gpu_check --json dry.json --dry-run          # anywhere
    python -m parity.gpu_check --json out.json --stages env attention

On a machine lent by the ``device`` tool (packages to carry, the command): parity/README.md,
"The GPU check". Its results go to parity/BENCHMARKS.md, section "GPU".
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import pathlib
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

from parity.bench.table import HEADLINE, fmt

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
DEFAULT_BUDGET_S = 460.0
MIN_STAGE_S = 10.0  # a stage that would get less than this is not started
TAIL_CHARS = 4000


@dataclass(frozen=True)
class Stage:
    """One child run of the check.

    Attributes:
        name: the stage's key in the JSON.
        kind: how its output is read and judged: env, pytest, parity, probe or bench.
        argv: arguments after ``python``; ``{out}`` stands for the file the run writes its
            results to (JSON, or pytest's JUnit XML).
        timeout_s: the most it may run (less when the budget has less left).
        env: extra environment variables.
    """

    name: str
    kind: str
    argv: tuple[str, ...]
    timeout_s: float
    env: dict[str, str] = field(default_factory=dict)


def plan(dry_run: bool) -> list[Stage]:
    """The stages in the order they run; ``dry_run``: on the CPU at tiny sizes."""
    device = "cpu" if dry_run else "cuda"
    parity = ["-m", "parity", "--device", device, "--json", "{out}"]
    # 4 steps: the floor then has three steps after step 1 to measure (with 2, one sample per floor
    # run, and bf16-mixed on CPUs with native bf16 matmuls landed at 5.2x it); 2 floor runs.
    parity += ["--steps", "4" if dry_run else "10"]
    bf16 = ["--precision", "bf16-mixed"]
    env = ["-m", "parity.gpu_check.env_probe", "--json", "{out}"]
    env += [] if dry_run else ["--require-cuda"]
    attention = ["-m", "parity.gpu_check.attention_probe", "--device", device, "--json", "{out}"]
    attention += ["--size", "tiny"] if dry_run else []
    bench = ["-m", "parity.bench", "--preset", "tiny" if dry_run else "gpu", "--json", "{out}"]
    bench += ["--sides", "trl", "ours", "ours_plain", "trl_defaults"]
    pytest = ["-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "--junitxml", "{out}"]
    pytest += ["--continue-on-collection-errors"]  # a test module elsewhere that fails to import
    # On the CPU the gpu-marked tests run with the CPU standing in (tests/training/test_cuda.py).
    tests_env = {"DPO_GPU_TESTS_ON_CPU": "1"} if dry_run else {}
    return [
        Stage("env", "env", tuple(env), 90),
        Stage("gpu_tests", "pytest", tuple(pytest), 180, tests_env),
        Stage("parity_fp32", "parity", (*parity, "--loss-type", "sigmoid"), 90),
        Stage("parity_bf16", "parity", (*parity, *bf16, "--loss-type", "sigmoid"), 90),
        Stage("qlora_4bit", "parity", (*parity, *bf16, "--load-in-4bit"), 120),
        Stage("attention", "probe", tuple(attention), 120),
        Stage("bench_gpu", "bench", tuple(bench), 240),
        Stage("parity_fp32_lora", "parity", (*parity, "--loss-type", "sigmoid", "--lora"), 90),
        Stage("parity_bf16_ipo", "parity", (*parity, *bf16, "--loss-type", "ipo"), 90),
        Stage("parity_bf16_lora", "parity", (*parity, *bf16, "--lora"), 90),
    ]


def child_env(stage: Stage, dry_run: bool) -> dict[str, str]:
    """The environment of a stage: offline, quiet, the repository importable; one thread per
    process in a dry run (CPU stages share a small machine: idle OpenMP threads spinning against
    each other cost ~100x on a loaded 2-core machine)."""
    env = dict(os.environ)
    path = [str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])]
    env.update(
        PYTHONPATH=os.pathsep.join(path),
        HF_HUB_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        TOKENIZERS_PARALLELISM="false",
        TQDM_DISABLE="1",
        PYTHONUNBUFFERED="1",
    )
    if dry_run:
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.update(stage.env)
    return env


def junit_counts(path: pathlib.Path) -> dict:
    """pytest's JUnit XML as counts and one entry per test (outcome, seconds, message)."""
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    cases = []
    for case in suite.iter("testcase"):
        outcome, message = "passed", None
        for tag in ("failure", "error", "skipped"):
            child = case.find(tag)
            if child is not None:
                outcome, message = tag, (child.get("message") or "")[:300]
        name = f"{case.get('classname')}::{case.get('name')}"
        cases.append({"name": name, "outcome": outcome, "seconds": float(case.get("time", 0))})
        if message:
            cases[-1]["message"] = message
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    return {**counts, "cases": cases}


def read_result(stage: Stage, out: pathlib.Path) -> dict | None:
    """What the stage's run wrote to ``out``, or None (nothing, or unreadable)."""
    if not out.is_file():
        return None
    try:
        if stage.kind == "pytest":
            return junit_counts(out)
        return json.loads(out.read_text())
    except (ValueError, ET.ParseError, AttributeError):
        return None


def judge(kind: str, returncode: int | None, result: dict | None) -> tuple[bool, str]:
    """Whether a finished stage passed, and its one-line summary."""
    if result is None:
        return False, f"no result (exit status {returncode})"
    ok = returncode == 0
    if kind == "pytest":
        n, bad = result["tests"], result["failures"] + result["errors"]
        summary = f"{n - bad - result['skipped']} passed, {bad} failed, {result['skipped']} skipped"
        return ok and n > 0 and bad == 0 and result["skipped"] == 0, summary
    if kind == "parity":
        cases = result.get("cases", [])
        failed = [c["name"] for c in cases if not c["passed"]]
        passed = f"{len(cases) - len(failed)}/{len(cases)} cases passed"
        return ok and result.get("passed", False), passed + "".join(f"; FAIL {n}" for n in failed)
    if kind == "bench":
        return ok, bench_summary(result)
    return ok, str(result.get("summary", ""))


def bench_summary(report: dict) -> str:
    """Seconds per step of each headline side, ours' speed-ups and memory, the loss verdict."""
    sides = {k: report.get(k) for k in HEADLINE}
    sides["ours_plain"] = (report.get("variants") or {}).get("ours_plain")
    steps = ", ".join(
        f"{name} {fmt(side.get('seconds_per_step'), '.3f')} s"
        for name, side in sides.items()
        if side
    )
    check = report.get("loss_check") or {}
    return (
        f"{steps}; trl/ours x{fmt(report.get('speedup'), '.2f')}, "
        f"trl_defaults/ours x{fmt(report.get('speedup_vs_trl_defaults'), '.2f')}, "
        f"peak CUDA ours/trl {fmt(report.get('peak_cuda_memory_ratio'), '.2f')}; "
        f"losses {'agree' if check.get('ok') else 'DISAGREE'}"
    )


def _tail(log: pathlib.Path) -> str:
    return log.read_text(errors="replace")[-TAIL_CHARS:] if log.is_file() else ""


def run_stage(stage: Stage, workdir: pathlib.Path, timeout: float, dry_run: bool) -> dict:
    """Run one stage as a child process (its own process group, killed whole on timeout) and
    record it; never raises for the child's failure."""
    out = workdir / f"{stage.name}.{'xml' if stage.kind == 'pytest' else 'json'}"
    log = workdir / f"{stage.name}.log"
    argv = [a.replace("{out}", str(out)) for a in stage.argv]
    start = time.perf_counter()
    returncode, timed_out = _run_child([sys.executable, *argv], log, timeout, stage, dry_run)
    seconds = time.perf_counter() - start
    result = read_result(stage, out)
    ok, summary = judge(stage.kind, returncode, result)
    if timed_out:
        ok, summary = False, f"timed out after {timeout:.0f} s"
    return {
        "stage": stage.name,
        "ok": ok,
        "seconds": round(seconds, 1),
        "command": shlex.join(["python", *argv]),
        "returncode": returncode,
        "timed_out": timed_out,
        "summary": summary,
        "result": result,
        "tail": None if ok else _tail(log),
    }


def _run_child(argv, log: pathlib.Path, timeout: float, stage: Stage, dry_run: bool):
    """(exit status or None, timed out). The child and its own children (bench workers,
    training runs) share a new process group, so a timeout or our own exit ends all of them."""
    with open(log, "w") as f:
        proc = subprocess.Popen(
            argv,
            cwd=REPO_ROOT,
            env=child_env(stage, dry_run),
            stdout=f,
            stderr=subprocess.STDOUT,
            process_group=0,
        )
        try:
            return proc.wait(timeout=timeout), False
        except subprocess.TimeoutExpired:
            return None, True
        finally:  # timed out, we are being stopped, or leftovers of a finished child
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def finite(value):
    """``value`` with every NaN or infinity (the sub-runs' JSON may hold them) as None: the
    report is standard JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def write_report(path: pathlib.Path, report: dict) -> None:
    """Write the JSON whole or not at all (a killed run leaves the previous version)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(finite(report), indent=1, allow_nan=False, default=str) + "\n")
    os.replace(tmp, path)


def run_check(stages: list[Stage], args: argparse.Namespace, workdir: pathlib.Path) -> dict:
    """Run ``stages`` in order within the budget, rewriting the JSON before and after each."""
    start = time.perf_counter()
    report = {
        "check": "python -m parity.gpu_check",
        "dry_run": args.dry_run,
        "device": "cpu" if args.dry_run else "cuda",
        "started_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "budget_s": args.budget_s,
        "planned": [s.name for s in stages],
        "running": None,
        "seconds": 0.0,
        "ok": False,
        "stages": [],
    }
    for stage in stages:
        left = args.budget_s - (time.perf_counter() - start)
        if left < MIN_STAGE_S:
            record = {
                "stage": stage.name,
                "ok": False,
                "seconds": 0.0,
                "summary": "not run: budget spent",
            }
        else:
            report["running"] = stage.name
            write_report(args.json, report)
            print(
                f"[gpu_check] {stage.name} (<= {min(stage.timeout_s, left):.0f} s)",
                file=sys.stderr,
                flush=True,
            )
            record = run_stage(stage, workdir, min(stage.timeout_s, left), args.dry_run)
        report["stages"].append(record)
        report.update(running=None, seconds=round(time.perf_counter() - start, 1))
        report["ok"] = all(r["ok"] for r in report["stages"])
        write_report(args.json, report)
    return report


def format_table(report: dict) -> str:
    """One line per stage: name, ok / FAIL, seconds, summary."""
    rows = [("stage", "result", "s", "summary")]
    for r in report["stages"]:
        rows.append((r["stage"], "ok" if r["ok"] else "FAIL", f"{r['seconds']:.0f}", r["summary"]))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[3] for row in rows]
    passed = sum(r["ok"] for r in report["stages"])
    lines.append(f"{passed}/{len(report['stages'])} stages ok in {report['seconds']:.0f} s")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    names = [s.name for s in plan(dry_run=False)]
    p = argparse.ArgumentParser(
        prog="python -m parity.gpu_check", description=__doc__.split("\n")[0]
    )
    p.add_argument("--json", type=pathlib.Path, required=True, help="write the results here")
    p.add_argument("--dry-run", action="store_true", help="the same stages on the CPU, tiny")
    p.add_argument(
        "--budget-s",
        type=float,
        default=DEFAULT_BUDGET_S,
        help="wall-clock seconds for all stages; a stage never gets more than is left",
    )
    p.add_argument("--stages", nargs="+", choices=names, help="run only these (default: all)")
    p.add_argument("--workdir", type=pathlib.Path, help="keep each stage's output and log here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    stages = [s for s in plan(args.dry_run) if not args.stages or s.name in args.stages]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    # SIGTERM unwinds like an exception, so the running stage's process group is killed.
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
            workdir = args.workdir or pathlib.Path(tmp)
            workdir.mkdir(parents=True, exist_ok=True)
            report = run_check(stages, args, workdir)
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(format_table(report))
    return 0 if report["ok"] and len(report["stages"]) == len(stages) else 1
