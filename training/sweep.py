"""``python -m training.sweep``: train one run per β and draw the reward-vs-KL frontier.

Each β is a full ``training.fit`` run (with its evaluation) in ``<output-dir>/beta-<β>``; every
other flag is passed on to ``training.fit``, so the sweep runs the embedded default unless told
otherwise. The final (KL, win rate) of each run becomes one point of ``frontier.png``, like
Figure 2 (left) of the DPO paper (Rafailov et al. 2023): a smaller β buys reward with KL.

    python -m training.sweep --beta 0.05 0.1 0.5
    python -m training.sweep --beta 0.1 0.5 --output-dir runs/sweep -- --max-steps 100

Writes ``<output-dir>/sweep.json`` (each β's eval.json) and ``<output-dir>/frontier.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from training.base.cli import resolve_config
from training.base.errors import report_failure, writing
from training.eval import plots
from training.fit import run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.sweep",
        description="Train one DPO run per beta and plot win rate against KL. Other flags go to "
        "training.fit (see python -m training.fit --help).",
        allow_abbrev=False,
    )
    parser.add_argument("--beta", type=float, nargs="+", required=True, help="The betas to train.")
    parser.add_argument("--output-dir", type=Path, default=Path("runs/sweep"), help="Sweep root.")
    return parser


def run_dir(root: Path, beta: float) -> Path:
    """``<root>/beta-0.1``: one directory per β."""
    return root / f"beta-{beta:g}"


def fit_one(beta: float, root: Path, fit_argv: list[str]) -> dict:
    """Train and evaluate at ``beta``; its eval.json as a dict, with ``beta`` added."""
    argv = [*fit_argv, "--beta", str(beta), "--output-dir", str(run_dir(root, beta)), "--evaluate"]
    cfg, _ = resolve_config(argv)
    result = run(cfg)
    if result.evaluation is None:
        raise ValueError(f"beta {beta}: the run has no evaluation (no held-out pairs?)")
    return {"beta": beta, **result.evaluation.to_json()}


def frontier_points(runs: list[dict]) -> list[plots.FrontierPoint]:
    """The starting policy (from the first run) and each run's trained policy, where measured."""
    points = []
    if runs and runs[0]["before"]["win_rate"] is not None:
        start = runs[0]["before"]
        points.append(plots.FrontierPoint("start", start["kl"], start["win_rate"]))
    for r in runs:
        after = r["after"]
        if after["win_rate"] is not None:
            points.append(plots.FrontierPoint(f"β={r['beta']:g}", after["kl"], after["win_rate"]))
    return points


def sweep(betas: list[float], root: Path, fit_argv: list[str]) -> tuple[list[dict], Path]:
    """Every run, then sweep.json and frontier.png under ``root``."""
    runs = [fit_one(beta, root, fit_argv) for beta in betas]
    with writing(root / "sweep.json", "writing the sweep's results"):
        root.mkdir(parents=True, exist_ok=True)
        (root / "sweep.json").write_text(json.dumps(runs, indent=2) + "\n")
    png = plots.frontier(frontier_points(runs), root / "frontier.png", "Win rate vs KL, by β")
    return runs, png


def summary(runs: list[dict]) -> str:
    """One line per β: KL, win rate, preference accuracy after training."""
    lines = [f"{'beta':>8}{'KL':>10}{'win rate':>10}{'pref acc':>10}", "-" * 38]
    for r in runs:
        a = r["after"]
        cells = [a["kl"], a["win_rate"], a["preference_accuracy"]]
        text = "".join(f"{'n/a':>10}" if v is None else f"{v:>10.4f}" for v in cells)
        lines.append(f"{r['beta']:>8g}{text}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args, fit_argv = build_parser().parse_known_args(argv)
    fit_argv = [a for a in fit_argv if a != "--"]
    if any(b <= 0 for b in args.beta):
        print("error: every --beta must be > 0", file=sys.stderr)
        return 2
    try:
        runs, png = sweep(args.beta, args.output_dir, fit_argv)
    except Exception as err:
        return report_failure(err, "--debug" in fit_argv)
    print()
    print(summary(runs))
    print(f"\nfrontier: {png}\nsweep.json: {args.output_dir / 'sweep.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
