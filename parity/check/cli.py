"""``python -m parity``: run trl 1.16's DPOTrainer and ours on the same cases and compare.

Every case trains twice from the same files (initial weights, reference, tokenizer, data), in the
same data order with the same optimizer, and every per-step metric, the token ids and the final
weights are compared (tolerances in ``parity.check.tolerances``). After step 1, weights and metrics
are held to a noise floor measured in the same run: trl trained ``--floor-runs`` more times from
weights moved by one ulp (``parity.check.noise_floor``). Prints a table; exit status 0 only if every
case passes.

Examples::

    python -m parity                                   # llama, sigmoid, 20 steps
    python -m parity --loss-type all --arch all --json parity.json
    python -m parity --loss-type sigmoid sft --loss-weights 1 0.5 --grad-accum 2
    python -m parity --lora --load-in-4bit --precompute-ref --data conversational
    python -m parity --model ./my-model --dataset prefs.parquet --max-length 256
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import pathlib  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import TypeVar  # noqa: E402

import datasets  # noqa: E402
import transformers  # noqa: E402
from trl import __version__ as trl_version  # noqa: E402

from dpo_core.collate import TRUNCATION_MODES  # noqa: E402
from dpo_core.settings import LossSettings  # noqa: E402
from parity.check.compare import compare_runs  # noqa: E402
from parity.check.noise_floor import FLOOR_RUNS, measure_floor  # noqa: E402
from parity.check.own_logits import compare_own_logits  # noqa: E402
from parity.check.table import format_table, write_json  # noqa: E402
from parity.check.tolerances import CaseReport  # noqa: E402
from parity.sides.cases import (  # noqa: E402
    ARCHS,
    DATA_SHAPES,
    DEVICES,
    LOSS_TYPES,
    PRECISIONS,
    ParityCase,
    all_archs,
    cases_from_args,
    comparable,
)
from training.base.cli import add_group_flags  # noqa: E402

T = TypeVar("T")


def build_parser() -> argparse.ArgumentParser:
    """The command line; every option combines with every other. The objective's flags are
    training's (``add_objective_flags``)."""
    p = argparse.ArgumentParser(
        prog="python -m parity", description=__doc__.split("\n\n")[0], allow_abbrev=False
    )
    add_objective_flags(p)
    # training.fit's names first; the short old spellings still parse
    p.add_argument("--max-steps", "--steps", dest="steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument(
        "--gradient-accumulation-steps", "--grad-accum", dest="grad_accum", type=int, default=1
    )
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--lora", action="store_true")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=int, default=16)
    p.add_argument("--lora-target-modules", nargs="+", default=["all-linear"])
    p.add_argument("--load-in-4bit", action="store_true", help="NF4 weights + LoRA (QLoRA)")
    p.add_argument(
        "--precompute-ref-log-probs", "--precompute-ref", dest="precompute_ref", action="store_true"
    )
    p.add_argument(
        "--prompt-sharing",
        action="store_true",
        help="ours forwards each prompt once per pair (its training default; parity's default "
        "is the plain path, summed in trl's order)",
    )
    p.add_argument(
        "--arch",
        nargs="+",
        default=["llama"],
        choices=[*all_archs(), "all"],
        help=f"tiny architectures; `all`: {' '.join(ARCHS)} (the zoo's other families by name)",
    )
    p.add_argument("--model", help="local Hugging Face causal LM directory (the policy)")
    p.add_argument("--dataset", help="local preference file: .jsonl/.json/.parquet/.csv")
    p.add_argument(
        "--data",
        default="explicit",
        choices=DATA_SHAPES,
        help="generated data shape when --dataset is not given",
    )
    p.add_argument("--num-rows", type=int, help="default: steps x batch size x grad accum")
    p.add_argument("--max-length", type=int, default=1024, help="0: no truncation")
    p.add_argument("--truncation-mode", default="keep_start", choices=TRUNCATION_MODES)
    p.add_argument(
        "--precision",
        default="32-true",
        choices=PRECISIONS,
        help="bf16-mixed: trl with bf16=True against ours under Lightning's bf16-mixed",
    )
    p.add_argument("--device", default="cpu", choices=DEVICES, help="where both sides train")
    p.add_argument("--seed", type=int, default=42)
    _add_run_options(p)
    return p


OBJECTIVE_HELP = (
    "The DPO objective (dpo_core.settings.LossSettings), with python -m training.fit's flags. "
    "Unset, a flag takes LossSettings' default, but --label-smoothing: 1e-3 for exo_pair, 0.1 "
    "for robust/aot, else 0. --reference-free: trl 1.16 has none (reported)."
)


def add_objective_flags(p: argparse.ArgumentParser) -> None:
    """One flag per field of ``LossSettings``, made by training's own builder
    (``training.base.cli.add_group_flags`` on its ``dpo`` group, whose ``DPOConfig`` extends
    ``LossSettings``), so both command lines spell them alike; ``DPOConfig``'s other fields (how
    ours runs) are left out. An unset flag parses to None. ``--loss-type`` is parity's own: it
    also takes ``all``. No flag is taken by a prefix of its name (as training.fit)."""
    section = p.add_argument_group("objective", OBJECTIVE_HELP)
    section.add_argument(
        "--loss-type",
        nargs="+",
        default=LossSettings().loss_type,
        choices=[*LOSS_TYPES, "all"],
        help="one case summing these losses, or `all`: one case per loss type",
    )
    training = argparse.ArgumentParser(add_help=False)
    add_group_flags(training, "dpo")
    taken = {f.name for f in dataclasses.fields(LossSettings)} - {"loss_type"}
    for action in training._actions:  # argparse has no public way to move a flag
        if action.dest in taken:
            section._add_action(action)


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """How the cases are run and reported (not what they train)."""
    p.add_argument("--json", type=pathlib.Path, help="write the JSON report here")
    p.add_argument("--workdir", type=pathlib.Path, help="keep the case files here (default: temp)")
    p.add_argument(
        "--against",
        default="ours",
        choices=["ours", "trl"],
        help="`trl` compares trl with itself: a determinism check of the harness",
    )
    p.add_argument(
        "--floor-runs",
        type=int,
        default=FLOOR_RUNS,
        help="perturbed trl runs that measure the noise floor bounding weights and metrics "
        "after step 1 (0: the fixed bounds of parity/check/tolerances.py instead)",
    )


def run_case(
    case: ParityCase, workdir: pathlib.Path, against: str = "ours", floor_runs: int = FLOOR_RUNS
) -> CaseReport:
    """Run one case on both sides and compare; never raises (errors become a failed report).

    Both sides get the same ``workdir``, so they train from the same prepared files. With
    ``floor_runs`` > 0, trl also trains that many times from perturbed weights (seeds 1..K)
    and the noise floor they measure bounds the comparison after step 1 (in bf16/fp16 too:
    QLoRA's adapters are then nudged by one ulp of that dtype). Each side's step 1 is also held
    to the model's own logits (``parity.check.own_logits``). A failure is put on the side that
    failed: when trl fails, ours still runs and is held to the own-logits oracle alone.
    """
    ok, reason = comparable(case)
    if not ok:
        return CaseReport(name=case.name, skipped=reason)
    # why here: the sides load peft and bitsandbytes (seconds, and a banner), not for --help
    from parity.sides import own_logits
    from parity.sides.ours_side import run_ours
    from parity.sides.trl_side import run_trl

    trl, trl_failed = _attempt("trl", lambda: run_trl(case, workdir))
    floor = None
    if trl is not None and floor_runs > 0:
        floors, trl_failed = _attempt(
            "trl (floor run)",
            lambda: [run_trl(case, workdir, perturb_seed=j) for j in range(1, floor_runs + 1)],
        )
        if floors is not None:
            floor = measure_floor(trl, floors, case.precision != "32-true", case.loss)
    other_side = (lambda: run_trl(case, workdir)) if against == "trl" else None
    other, other_failed = _attempt(against, other_side or (lambda: run_ours(case, workdir)))
    report = CaseReport(name=case.name, error=other_failed, trl_failed=trl_failed)
    if trl is not None and other is not None and not trl_failed:
        report.checks = compare_runs(case.name, trl, other, floor).checks
    ran = trl or other
    if ran is not None:
        oracle, why = _attempt(
            "own-logits oracle", lambda: own_logits.measure(case, workdir, ran.token_ids)
        )
        oracle = oracle or own_logits.OwnLogits(skipped=why)
        report.checks += compare_own_logits(oracle, trl, other, case.loss.beta)
    return report


def _attempt(who: str, run: Callable[[], T]) -> tuple[T | None, str]:
    """``(run(), "")``, or ``(None, "<who> failed: <the exception's first line>")`` with the
    traceback printed: a side's failure is reported as that side's, and the case goes on."""
    try:
        return run(), ""
    except Exception as exc:  # report and go on
        traceback.print_exc()
        return None, f"{who} failed: " + f"{type(exc).__name__}: {exc}".splitlines()[0]


def main(argv: list[str] | None = None) -> int:
    """Run the cases the options describe; 0 if every case passed, 3 if the others failed on
    trl's account alone (``CaseReport.trls_error``), 1 otherwise."""
    args = build_parser().parse_args(argv)
    try:
        cases = cases_from_args(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _quiet()
    with tempfile.TemporaryDirectory(prefix="parity-") as tmp:
        root = args.workdir or pathlib.Path(tmp)
        reports = []
        for case in cases:
            print(f"[parity] {case.name}", file=sys.stderr, flush=True)
            workdir = root / _dirname(case.name)
            reports.append(run_case(case, workdir, args.against, args.floor_runs))
    print(format_table(reports))
    if args.json:
        write_json(args.json, reports, trl_version)
    if all(r.passed for r in reports):
        return 0
    return 3 if all(r.passed or r.trls_error for r in reports) else 1


def _dirname(name: str) -> str:
    """A case name made safe as a directory name (letters, digits, ``._=+-`` kept)."""
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", name)


def _quiet() -> None:
    """No progress bars from datasets, transformers, trl (its reference precomputation) or our
    training bar (``TQDM_DISABLE``, set here rather than at import so that importing this module
    changes nothing); warnings stay."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
