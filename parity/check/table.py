"""Print parity results as a table and write them as JSON.

The table has one row per check: case, metric, trl value, ours, max |diff|, tolerance, result.
Values are those at the step where the difference is largest; ``rel`` marks a relative difference
(``|ours - trl| / max(1, |trl|)``). A check bounded by the noise floor
(``parity.check.noise_floor``) shows its bound and what it was made of, ``1.1e-06 (5x floor
2.1e-07)``; a report-only row shows ``info`` (``info, over`` when above that bound). A case trl 1.16
cannot run shows ``SKIP`` and the reason instead of numbers; a side that raised shows ``ERROR:
trl failed: ...`` or ``ERROR: ours failed: ...`` (when trl failed, ours' own-logits rows follow).

The JSON has exactly this shape::

    {"passed": bool, "trl_version": str,
     "cases": [{"name": str, "passed": bool, "error": str | null,
                "max_abs_diff": {check: float}, "tolerance": {check: float},
                "floor": {check: float}}]}

``max_abs_diff`` holds the difference as the table shows it (relative for the ``rel`` checks);
``null`` stands for an infinite difference (a metric, step or weight missing on one side).
``floor`` holds, for the checks bounded by the noise floor only, the floor's value (their
``tolerance`` is the bound made from it); it is empty when no floor was measured.
"""

from __future__ import annotations

import json
import math
import pathlib

from parity.check.tolerances import CaseReport, MetricCheck

HEADER = ("case", "metric", "trl", "ours", "max |diff|", "tolerance", "result")


def _value(v: float | None) -> str:
    return "-" if v is None else f"{v:.10g}"


def _tolerance(check: MetricCheck) -> str:
    if check.floor is None:
        tolerance = f"{check.tolerance:g}"
    else:
        tolerance = f"{check.tolerance:.1e} ({check.factor:g}x floor {check.floor:.1e})"
    return tolerance + (" rel" if check.relative else "")


def _result(check: MetricCheck) -> str:
    if not check.gated:
        return "info" if check.within else "info, over"
    return "pass" if check.passed else "FAIL"


def _row(case: str, check: MetricCheck) -> tuple[str, ...]:
    tolerance = _tolerance(check)
    result = _result(check)
    if check.note and (not check.passed or check.floor is not None or not check.gated):
        # where it failed; for a floor check, where it is nearest; for a report-only row, why
        result += f" ({check.note})"
    return (
        case,
        check.name,
        _value(check.trl_value),
        _value(check.ours_value),
        f"{check.max_diff:.2e}",
        tolerance,
        result,
    )


def table_rows(reports: list[CaseReport]) -> list[tuple[str, ...]]:
    """The table's rows, header excluded: one per check (the case named on its first row), one
    per skipped case or case that raised."""
    rows = []
    for report in reports:
        if report.skipped:
            rows.append((report.name, "-", "-", "-", "-", "-", f"SKIP: {report.skipped}"))
        failures = [f"ERROR: {e}" for e in (report.trl_failed, report.error) if e]
        for i, failure in enumerate(failures):
            rows.append((report.name if i == 0 else "", "-", "-", "-", "-", "-", failure))
        for i, check in enumerate(report.checks):
            rows.append(_row(report.name if i == 0 and not failures else "", check))
    return rows


def format_table(reports: list[CaseReport]) -> str:
    """The table as aligned text, with a closing line counting the cases that passed."""
    rows = [HEADER, *table_rows(reports)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    passed = sum(r.passed for r in reports)
    lines.append(f"{passed}/{len(reports)} cases passed")
    lines += [
        f"{r.name}: trl's error, not ours: {r.trls_error}; ours equals the model's own "
        "log-probs within float32"
        for r in reports
        if r.trls_error
    ]
    return "\n".join(lines)


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def report_json(reports: list[CaseReport], trl_version: str) -> dict:
    """The JSON document (shape in the module docstring)."""
    return {
        "passed": all(r.passed for r in reports),
        "trl_version": trl_version,
        "cases": [
            {
                "name": r.name,
                "passed": r.passed,
                "error": r.trl_failed or r.error or None,
                "max_abs_diff": {c.name: _finite(c.max_diff) for c in r.checks},
                "tolerance": {c.name: c.tolerance for c in r.checks},
                "floor": {c.name: c.floor for c in r.checks if c.floor is not None},
            }
            for r in reports
        ],
    }


def write_json(path: pathlib.Path | str, reports: list[CaseReport], trl_version: str) -> None:
    """Write ``report_json`` to ``path`` (standard JSON: no NaN or Infinity)."""
    text = json.dumps(report_json(reports, trl_version), indent=2, allow_nan=False)
    pathlib.Path(path).write_text(text + "\n", encoding="utf-8")
