"""What an evaluation leaves in the output directory, and the table it prints.

::

    eval.json             {"before": {...}, "after": {...}, "n_pairs": int, "n_prompts": int}
    report.md             the tables, warnings, definitions and side-by-side examples
    training_curves.png   loss, rewards and accuracy over steps (when metrics.csv exists)
    optimization.png      learning rate, grad norm, chosen / rejected log-probs over steps (idem)
    heldout_curves.png    trl's held-out metrics over steps: before, during, after (idem)
    before_after.png      the headline numbers, before vs after
    frontier.png          win rate against KL, before and after

Each policy's object in eval.json holds ``preference_accuracy``, ``reward_margin``,
``win_rate`` and ``kl`` (null when not measured: no prompts, or ``--judge none``) and
``kl_stderr`` (the KL estimate's standard error; null under 2 samples), then
``reward_chosen``, ``reward_rejected``, ``logp_accuracy``, ``logps_chosen`` and
``logps_rejected``; ``dpo_core.evaluation`` defines each.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from dpo_core.evaluation import likelihood_displacement
from training.base.errors import writing
from training.eval import plots

TABLE_ROWS = (
    ("preference_accuracy", "preference accuracy"),
    ("reward_margin", "reward margin"),
    ("win_rate", "win rate"),
    ("kl", "KL(pi || pi_ref)"),
    ("logp_accuracy", "logp accuracy"),
    ("logps_chosen", "logp chosen"),
    ("logps_rejected", "logp rejected"),
)
MARKDOWN_ROWS = (
    ("preference_accuracy", "preference accuracy (implicit reward; a tie counts 1/2)"),
    ("reward_margin", "mean reward margin β(log-ratio chosen − rejected)"),
    ("reward_chosen", "mean reward, chosen"),
    ("reward_rejected", "mean reward, rejected"),
    ("logp_accuracy", "log-prob accuracy (the policy alone prefers chosen)"),
    ("logps_chosen", "mean log π(chosen \\| prompt)"),
    ("logps_rejected", "mean log π(rejected \\| prompt)"),
    ("win_rate", "win rate of sampled completions"),
    ("kl", "KL(π ‖ π_ref), sequence level, on samples"),
    ("kl_stderr", "standard error of the KL estimate"),
)
NO_CHANGE = {"kl_stderr"}  # rows whose after - before means nothing
KL_NOISE_SES = 2.0  # a negative KL within this many standard errors of 0 is noise (~95%)
DISPLACEMENT_WARNING = (
    "**Warning: likelihood displacement.** The mean log-probability of both the chosen and the "
    "rejected completions fell during training: DPO widened the margin by pushing both down, so "
    "probability mass went to completions outside the data. Consider a lower learning rate, "
    "fewer steps, a larger β, or an SFT term (`--loss-type sigmoid sft`)."
)


@dataclass
class ReportPaths:
    """Where the evaluation's files went."""

    eval_json: Path
    report_md: Path
    plots: list[Path] = field(default_factory=list)


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.4f}"


def evaluation_table(report: dict) -> str:
    """The console table of an eval.json ``report``: before, after and the change."""
    lines = [f"{'held-out metric':<22}{'before':>12}{'after':>12}{'change':>12}", "-" * 58]
    for key, label in TABLE_ROWS:
        b, a = report["before"].get(key), report["after"].get(key)
        change = None if b is None or a is None else a - b
        lines.append(f"{label:<22}{_fmt(b):>12}{_fmt(a):>12}{_fmt(change):>12}")
    return "\n".join(lines)


def markdown_table(report: dict) -> list[str]:
    """The lines of an eval.json ``report`` as a markdown table: before, after and the change."""
    lines = ["| metric | before | after | change |", "|---|---:|---:|---:|"]
    for key, label in MARKDOWN_ROWS:
        b, a = report["before"].get(key), report["after"].get(key)
        change = None if b is None or a is None or key in NO_CHANGE else a - b
        lines.append(f"| {label} | {_fmt(b)} | {_fmt(a)} | {_fmt(change)} |")
    return lines


def kl_note(side: str, kl: float | None, stderr: float | None, n: int) -> str | None:
    """What report.md says of a negative KL estimate (None when it is not negative).

    The true KL is never negative, but its Monte-Carlo estimate is: within ``KL_NOISE_SES``
    standard errors of 0 that is sampling noise; beyond them it is flagged, as a sign that the
    samples were not scored as they were drawn."""
    if kl is None or math.isnan(kl) or kl >= 0:
        return None
    if stderr is None:
        return (
            f"- The {side} policy's KL estimate is negative ({kl:.4g}) from {n} sample: no "
            "standard error to judge it by; sample more prompts (`--num-prompts`)."
        )
    k = -kl / stderr if stderr > 0 else math.inf
    measured = f"{kl:.4g} nats, standard error {stderr:.2g} over {n} samples"
    if k <= KL_NOISE_SES:
        return (
            f"- The {side} policy's KL estimate is negative ({measured}): within {k:.1f} "
            "standard errors of 0, sampling noise (the true KL is ≥ 0)."
        )
    return (
        f"- **Warning: negative KL beyond sampling noise.** The {side} policy's KL estimate "
        f"({measured}) is {k:.1f} standard errors below 0, and the true KL is ≥ 0: the samples "
        "were likely not scored as they were drawn (temperature or top-p ≠ 1, a truncated "
        "prompt, or the policy and reference scoring differently)."
    )


def _kl_notes(evaluation) -> list[str]:
    notes = [
        kl_note(side, result.kl, result.kl_stderr, evaluation.n_prompts)
        for side, result in (("before", evaluation.before), ("after", evaluation.after))
    ]
    notes = [n for n in notes if n is not None]
    return [*notes, ""] if notes else []


def _definitions(evaluation) -> list[str]:
    s = evaluation.settings
    return [
        "## How these were measured",
        "",
        f"- **Pairs**: the implicit reward is β·log π(y|x)/π_ref(y|x) with β = {evaluation.beta}. "
        "Before training the policy is the reference, so every reward is 0 and every pair is "
        "a tie; a tie counts 1/2, so the accuracy reads 0.5 (chance), not trl's strict 0. "
        "The log-prob accuracy asks whether the policy alone gives the chosen completion the "
        "higher likelihood.",
        f"- **Samples**: one completion per prompt for {evaluation.n_prompts} distinct held-out "
        f"prompts, `generate` with seed {s.seed}, temperature {s.temperature}, top-p {s.top_p}, "
        f"no top-k, at most {s.max_new_tokens} new tokens.",
        "- **KL**: the mean over samples y ~ π of log π(y|x) − log π_ref(y|x) (nats per "
        "completion); unbiased at temperature 1 and top-p 1, exactly 0 when π is π_ref. Its "
        "standard error is the sample standard deviation of the per-sample log-ratios over √n; "
        f"a negative estimate within {KL_NOISE_SES:g} standard errors of 0 is sampling noise.",
        f"- **Win rate**: the mean verdict of the judge ({evaluation.judge or 'none'}) over "
        "the samples: a score in [0, 1] for a rule or callable judge; for a reward judge, "
        "1 if the sample outscores the held-out pair's reference completion, 1/2 on a tie.",
        "",
    ]


def _examples(evaluation, n: int) -> list[str]:
    before, after = evaluation.before, evaluation.after
    count = min(n, len(evaluation.prompts), len(before.completions), len(after.completions))
    if not count:
        return []
    lines = [
        "## Examples",
        "",
        "Held-out prompts, a sample from each policy, the judge's verdict.",
        "",
    ]
    for i in range(count):
        verdict = [f" [judge {r.verdicts[i]:.2f}]" if r.verdicts else "" for r in (before, after)]
        lines += [
            f"### {i + 1}",
            "",
            "```text",
            f"prompt: {evaluation.prompts[i]}",
            f"before{verdict[0]}: {before.completions[i]}",
            f"after{verdict[1]}: {after.completions[i]}",
            "```",
            "",
        ]
    return lines


def _validation_table(validation: dict[str, dict[str, float]]) -> list[str]:
    """The held-out metrics the training loop logs (trl's names, strict accuracy)."""
    before, after = validation.get("before") or {}, validation.get("after") or {}
    keys = sorted(set(before) | set(after))
    if not keys:
        return []
    lines = [
        "## Held-out metrics as trl logs them",
        "",
        "The training objective against the training's reference (trl's strict accuracy).",
        "",
        "| metric | before | after |",
        "|---|---:|---:|",
    ]
    lines += [f"| {k} | {_fmt(before.get(k))} | {_fmt(after.get(k))} |" for k in keys]
    return [*lines, ""]


def render_markdown(evaluation, plot_files: list[Path], extra: dict) -> str:
    """report.md: summary tables, warnings, definitions, plots, examples."""
    report = evaluation.to_json()
    lines = [
        "# DPO evaluation: before vs after training",
        "",
        f"{evaluation.n_pairs} held-out preference pairs, {evaluation.n_prompts} held-out "
        f"prompts sampled; judge: {evaluation.judge or 'none'}.",
        "",
        *markdown_table(report),
        "",
    ]
    if likelihood_displacement(evaluation.before.pairs, evaluation.after.pairs):
        lines += [DISPLACEMENT_WARNING, ""]
    lines += _kl_notes(evaluation)
    lines += _definitions(evaluation)
    if plot_files:
        lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plot_files] + [""]
    lines += _examples(evaluation, extra.get("num_examples", 5))
    lines += _validation_table(extra.get("validation") or {})
    if extra.get("dropped_rows"):
        lines += ["## Rows left out", ""]
        lines += [f"- {k}: {v}" for k, v in sorted(extra["dropped_rows"].items())] + [""]
    return "\n".join(lines)


def _curve_plots(out_dir: Path, metrics_csv: Path | None, validation: dict) -> list[Path]:
    """The plots over steps, drawn when ``metrics_csv`` has training rows: training curves,
    optimization, and the held-out metrics (the evaluation's before / after, ``validation``,
    with the held-out passes during training)."""
    if metrics_csv is None or not Path(metrics_csv).is_file():
        return []
    steps = plots.read_steps(metrics_csv)
    if not steps:
        return []
    files = [
        plots.training_curves(metrics_csv, out_dir / "training_curves.png"),
        plots.optimization_curves(metrics_csv, out_dir / "optimization.png"),
    ]
    heldout = plots.read_heldout(metrics_csv)
    before, after = validation.get("before") or {}, validation.get("after") or {}
    if heldout or before or after:
        steps_done = int(max(r.get("step", i + 1) for i, r in enumerate(steps)))  # from 1
        series = plots.heldout_series(heldout, before, after, steps_done)
        files.append(plots.heldout_curves(series, out_dir / "heldout_curves.png"))
    return files


def write_report(
    out_dir: Path,
    evaluation,
    *,
    metrics_csv: Path | None = None,
    num_examples: int = 5,
    validation: dict | None = None,
    dropped_rows: dict | None = None,
) -> ReportPaths:
    """Write eval.json, the plots and report.md to ``out_dir``."""
    out_dir = Path(out_dir)
    with writing(out_dir, "creating the report's folder"):
        out_dir.mkdir(parents=True, exist_ok=True)
    report = evaluation.to_json()
    eval_json = out_dir / "eval.json"
    with writing(eval_json, "writing the evaluation"):
        eval_json.write_text(json.dumps(report, indent=2) + "\n")
    files = _curve_plots(out_dir, metrics_csv, validation or {})
    files.append(plots.before_after_bars(report, out_dir / "before_after.png"))
    if report["after"]["win_rate"] is not None:
        points = [
            plots.FrontierPoint(side, report[side]["kl"], report[side]["win_rate"])
            for side in ("before", "after")
        ]
        files.append(plots.frontier(points, out_dir / "frontier.png", f"β = {evaluation.beta}"))
    extra = {"num_examples": num_examples, "validation": validation, "dropped_rows": dropped_rows}
    report_md = out_dir / "report.md"
    with writing(report_md, "writing the report"):
        report_md.write_text(render_markdown(evaluation, files, extra))
    return ReportPaths(eval_json, report_md, files)
