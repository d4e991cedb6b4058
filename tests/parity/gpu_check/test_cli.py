"""parity.gpu_check: the stage runner (timeouts, process groups, the JSON rewritten after every
stage, the budget), the verdicts, and the whole dry run on the CPU."""

from __future__ import annotations

import json
import pathlib
import textwrap
import time

import pytest

from parity.gpu_check import cli as gpu_check
from parity.gpu_check.cli import Stage, build_parser, judge, junit_counts, plan, run_check


def python_stage(name: str, code: str, timeout_s: float = 60, kind: str = "probe") -> Stage:
    """A stage running ``python -c code``; ``OUT`` in the code is the stage's result path."""
    return Stage(name, kind, ("-c", f'OUT = r"{{out}}"\n{textwrap.dedent(code)}'), timeout_s)


def alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie awaiting its reaper does not)."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def check_args(tmp_path, *extra: str):
    return build_parser().parse_args(["--json", str(tmp_path / "check.json"), "--dry-run", *extra])


def test_plan_runs_the_same_stages_on_the_gpu_and_in_the_dry_run():
    gpu, dry = plan(dry_run=False), plan(dry_run=True)
    names = [s.name for s in gpu]
    assert names == [s.name for s in dry]
    assert names[:7] == [
        "env", "gpu_tests", "parity_fp32", "parity_bf16", "qlora_4bit", "attention", "bench_gpu",
    ]  # fmt: skip
    for g, d in zip(gpu, dry, strict=True):
        assert "cuda" not in " ".join(d.argv)  # the dry run never asks for a GPU
        if g.kind in ("parity", "probe"):
            assert g.argv[g.argv.index("--device") + 1] == "cuda"
    by_name = {s.name: s for s in gpu}
    assert "--require-cuda" in by_name["env"].argv
    assert "--load-in-4bit" in by_name["qlora_4bit"].argv
    assert "bf16-mixed" in by_name["qlora_4bit"].argv
    bench = by_name["bench_gpu"].argv
    assert bench[bench.index("--preset") + 1] == "gpu"
    assert {"trl", "ours", "ours_plain", "trl_defaults"} <= set(bench)
    assert {s.name: s for s in dry}["gpu_tests"].env == {"DPO_GPU_TESTS_ON_CPU": "1"}


def test_a_failed_a_hung_and_a_passing_stage_are_each_recorded(tmp_path):
    """Exit status 3 and a stage past its timeout fail with the end of their output; the hung
    stage's own child (a grandchild of the check) is killed with it; the JSON is rewritten
    before each stage (the third stage reads it: the first two are in, itself is running)."""
    grandchild = tmp_path / "grandchild.pid"
    stages = [
        python_stage("crash", "print('boom'); raise SystemExit(3)"),
        python_stage(
            "hang",
            f"""
            import subprocess, sys, time
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
            open({str(grandchild)!r}, "w").write(str(child.pid))
            print("waiting", flush=True)
            time.sleep(120)
            """,
            timeout_s=3,
        ),
        python_stage(
            "reader",
            f"""
            import json, shutil
            report = json.load(open({str(tmp_path / "check.json")!r}))
            json.dump({{"summary": "read it", "seen": report}}, open(OUT, "w"))
            """,
        ),
    ]
    args = check_args(tmp_path)
    start = time.perf_counter()
    report = run_check(stages, args, tmp_path)
    assert time.perf_counter() - start < 30
    crash, hang, reader = report["stages"]
    assert (crash["ok"], crash["returncode"], crash["timed_out"]) == (False, 3, False)
    assert "boom" in crash["tail"] and crash["summary"] == "no result (exit status 3)"
    assert (hang["ok"], hang["returncode"], hang["timed_out"]) == (False, None, True)
    assert "waiting" in hang["tail"] and hang["summary"] == "timed out after 3 s"
    assert not alive(int(grandchild.read_text()))
    assert reader["ok"] and reader["summary"] == "read it" and reader["tail"] is None
    seen = reader["result"]["seen"]
    assert seen["running"] == "reader" and [s["stage"] for s in seen["stages"]] == ["crash", "hang"]
    assert json.loads((tmp_path / "check.json").read_text()) == report
    assert report["running"] is None and not report["ok"]


def test_a_stage_is_not_started_once_the_budget_is_spent(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "MIN_STAGE_S", 5.0)
    stages = [
        python_stage("slow", "import time, json; time.sleep(2); json.dump({'summary': 'x'}, open(OUT, 'w'))"),
        python_stage("late", "raise SystemExit(0)"),
    ]  # fmt: skip
    report = run_check(stages, check_args(tmp_path, "--budget-s", "6"), tmp_path)
    slow, late = report["stages"]
    assert slow["ok"] and slow["seconds"] >= 2
    assert late == {
        "stage": "late",
        "ok": False,
        "seconds": 0.0,
        "summary": "not run: budget spent",
    }


JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="0" failures="1" skipped="1" tests="3" time="2.0">
<testcase classname="tests.training.test_cuda" name="test_a" time="0.5"/>
<testcase classname="tests.training.test_cuda" name="test_b" time="1.0">
  <failure message="assert 1 == 2">trace</failure></testcase>
<testcase classname="tests.training.test_cuda" name="test_c" time="0.0">
  <skipped message="needs a CUDA device"/></testcase>
</testsuite></testsuites>
"""


def test_junit_counts_and_the_pytest_verdict(tmp_path):
    path = tmp_path / "junit.xml"
    path.write_text(JUNIT)
    result = junit_counts(path)
    assert {k: result[k] for k in ("tests", "failures", "errors", "skipped")} == {
        "tests": 3, "failures": 1, "errors": 0, "skipped": 1,
    }  # fmt: skip
    assert [c["outcome"] for c in result["cases"]] == ["passed", "failure", "skipped"]
    assert result["cases"][1]["message"] == "assert 1 == 2"
    assert judge("pytest", 1, result) == (False, "1 passed, 1 failed, 1 skipped")
    skipped_only = {"tests": 2, "failures": 0, "errors": 0, "skipped": 2, "cases": []}
    assert not judge("pytest", 0, skipped_only)[0]  # on a GPU machine a skip is a failure


def test_parity_and_bench_verdicts():
    cases = [{"name": "a", "passed": True}, {"name": "b", "passed": False}]
    assert judge("parity", 1, {"passed": False, "cases": cases}) == (
        False,
        "1/2 cases passed; FAIL b",
    )
    assert judge("parity", 0, {"passed": True, "cases": cases[:1]}) == (True, "1/1 cases passed")
    bench = {
        "ours": {"seconds_per_step": 0.1},
        "trl": {"seconds_per_step": 0.2},
        "trl_defaults": None,
        "variants": {"ours_plain": {"seconds_per_step": 0.15}},
        "speedup": 2.0,
        "peak_cuda_memory_ratio": 0.5,
        "loss_check": {"ok": True},
    }
    ok, summary = judge("bench", 0, bench)
    assert ok
    assert summary == (
        "ours 0.100 s, trl 0.200 s, ours_plain 0.150 s; trl/ours x2.00, trl_defaults/ours x-, "
        "peak CUDA ours/trl 0.50; losses agree"
    )
    assert judge("env", 1, None) == (False, "no result (exit status 1)")


def test_the_report_is_standard_json_when_a_sub_run_wrote_nan(tmp_path):
    stages = [
        python_stage(
            "nan", 'open(OUT, \'w\').write(\'{"summary": "s", "x": [NaN, 1.5, Infinity]}\')'
        )
    ]
    report = run_check(stages, check_args(tmp_path), tmp_path)
    assert report["stages"][0]["result"]["x"][1] == 1.5

    def refuse(constant):
        raise AssertionError(f"{constant} in the report")

    saved = json.loads((tmp_path / "check.json").read_text(), parse_constant=refuse)
    assert saved["stages"][0]["result"]["x"] == [None, 1.5, None]


@pytest.mark.slow
def test_dry_run_passes_every_stage(tmp_path, capsys):
    """``python -m parity.gpu_check --dry-run``: every stage runs on the CPU and passes (~3 min
    on 2 cores), and the JSON holds each stage's parsed result."""
    out = tmp_path / "dry.json"
    status = gpu_check.main(["--json", str(out), "--dry-run", "--workdir", str(tmp_path / "w")])
    report = json.loads(out.read_text())
    failed = {s["stage"]: (s["summary"], s.get("tail")) for s in report["stages"] if not s["ok"]}
    assert status == 0 and not failed, failed
    assert report["dry_run"] and report["device"] == "cpu" and report["running"] is None
    stages = {s["stage"]: s for s in report["stages"]}
    assert list(stages) == [s.name for s in plan(dry_run=True)] == report["planned"]
    for s in stages.values():
        assert set(s) >= {"stage", "ok", "seconds", "command", "returncode", "result", "summary"}
        assert s["command"].startswith("python -m ") and s["returncode"] == 0
    assert stages["env"]["result"]["packages"]["trl"]
    assert stages["gpu_tests"]["result"]["tests"] >= 7  # every gpu-marked test ran on the CPU
    for name in ("parity_fp32", "parity_bf16", "qlora_4bit", "parity_bf16_ipo"):
        assert stages[name]["result"]["passed"], name
    assert "load_in_4bit" in stages["qlora_4bit"]["result"]["cases"][0]["name"]
    shapes = stages["attention"]["result"]["shapes"]
    assert set(shapes) == {"fixed", "ragged"}
    for shape in shapes.values():
        assert shape["layout"]["sharing_chosen"]
        assert set(shape["verdict"]) == {"fp32", "bf16"}
        assert all(v["shared_kernel"] and "speedup" in v for v in shape["verdict"].values())
    bench = stages["bench_gpu"]["result"]
    assert bench["config"]["preset"] == "tiny" and bench["loss_check"]["ok"]
    assert "ours_plain" in bench["variants"] and bench["trl_defaults"]
    assert "10/10 stages ok" in capsys.readouterr().out
