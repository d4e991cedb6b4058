"""The table ``python -m parity.bench`` prints: one row per side, the FLOP lines under it."""

from __future__ import annotations

# The sides reported at the top level of the report (the rest are "variants").
HEADLINE = ("ours", "trl", "trl_defaults")


def fmt(value, spec: str) -> str:
    """``value`` formatted with ``spec``, or ``-`` when there is none."""
    return "-" if value is None else format(value, spec)


def _giga(value: float | None) -> str:
    """FLOPs in GFLOP: three significant digits, no exponent."""
    if value is None:
        return "-"
    giga = value / 1e9
    return f"{giga:,.0f}" if giga >= 100 else f"{giga:.3g}"


def flop_lines(report: dict, sides: dict[str, dict]) -> list[str]:
    """The matmul peaks and the necessary work the MFU column divides by."""
    peaks = report.get("peak_flops_per_s_by_dtype") or {}
    if not peaks:
        return []
    listed = ", ".join(f"{dtype} {value / 1e9:.0f}" for dtype, value in peaks.items())
    lines = [f"matmul peak GFLOP/s (best measured in this run, same threads): {listed}"]
    necessary = {_giga(s["model_flops_per_step"]) for s in sides.values()
                 if "model_flops_per_step" in s}  # fmt: skip
    if necessary:
        values = ", ".join(sorted(necessary))
        lines.append(
            f"necessary GFLOP / step (MFU's numerator; GFLOP / step, GFLOP/s and HFU count "
            f"what each side executed; parity.bench.flops): {values}"
        )
    return lines


def busy_label(busy: dict | None) -> str:
    """``1 busy process (torch, 2 threads)``, or ``nothing`` (``--busy 0``)."""
    if not busy or not busy["processes"]:
        return "nothing (--busy 0)"
    count = busy["processes"]
    threads = "/".join(str(t) for t in sorted(set(busy["threads"])))
    each = f"{threads} thread{'' if threads == '1' else 's'}" + (" each" if count > 1 else "")
    return f"{count} busy process{'es' if count > 1 else ''} ({busy['kind']}, {each})"


def bench_table(report: dict) -> str:
    """A markdown table of every side and the headline ratios."""
    rows = [
        "| side | s / step | x trl | CPU s / step | completion tok / s | GFLOP / step "
        "| GFLOP/s | HFU | MFU | peak RSS MiB | RSS / trl | peak CUDA MiB | setup s "
        "| max loss diff vs trl |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    sides = {k: report[k] for k in HEADLINE if report.get(k)} | report["variants"]
    trl = sides.get("trl")
    diffs = report["loss_check"]["max_diff"]
    for name, s in sides.items():
        diff = "reference" if name == "trl" else fmt(diffs.get(name), ".1e")
        if name in diffs and not s["exact"]:
            diff += " (not exact)"
        speed = trl["seconds_per_step"] / s["seconds_per_step"] if trl else None
        memory = s["peak_rss_mb"] / trl["peak_rss_mb"] if trl else None
        rows.append(
            f"| {name} | {s['seconds_per_step']:.3f} | {fmt(speed, '.2f')} "
            f"| {s['cpu_seconds_per_step']:.2f} "
            f"| {s['completion_tokens_per_second']:.0f} | {_giga(s.get('flops_per_step'))} "
            f"| {_giga(s.get('flops_per_s'))} | {fmt(s.get('hfu'), '.2f')} "
            f"| {fmt(s.get('mfu'), '.2f')} | {s['peak_rss_mb']:.0f} "
            f"| {fmt(memory, '.2f')} | {fmt(s['peak_cuda_mb'], '.0f')} "
            f"| {s['setup_seconds']:.1f} | {diff} |"
        )
    lines = ["\n".join(rows), ""]
    config = report.get("config")
    if config:
        lines.append(f"{config['preset']}: {config['training']}, {config['model_path']}")
        lines.append(f"beside the sides: {busy_label(config.get('busy'))}")
    counts = [
        f"{name} {s['trainable_parameters']:,} of {s['parameters']:,}"
        for name, s in sides.items()
        if "trainable_parameters" in s
    ]
    if counts:
        lines.append("trained parameters: " + ", ".join(counts))
    lines += flop_lines(report, sides)
    for key, label in (
        ("speedup", "speedup, trl parity s/step / ours"),
        ("speedup_vs_trl_defaults", "speedup, trl defaults s/step / ours"),
        ("bf16_speedup", "bf16 speedup, ours fp32 s/step / ours_bf16"),
        ("peak_memory_ratio", "peak RSS, ours / trl parity"),
        ("peak_cuda_memory_ratio", "peak CUDA memory, ours / trl parity"),
    ):
        if report.get(key) is not None:
            lines.append(f"{label}: {report[key]:.2f}")
    check = report["loss_check"]
    verdict = "agree" if check["ok"] else "DISAGREE: THE TIMINGS ABOVE ARE NOT COMPARABLE"
    lines.append(f"losses vs trl (tolerance {check['tolerance']:.0e}): {verdict}")
    for name, s in sides.items():
        if s.get("profile"):
            ops = ", ".join(f"{o['op']} {o['share']:.0%}" for o in s["profile"][:6])
            lines.append(f"profile {name} (self CPU, one step): {ops}")
    return "\n".join(lines)
