"""parity.bench.busy and ``--busy N``: busy processes run beside the sides, ready before the
first side, and are always stopped, their whole process group, however the bench ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from parity.bench import busy as busy_module
from parity.bench import cli
from parity.bench.busy import REPO_ROOT, Busy, busy_env, busy_processes, stop
from parity.bench.table import busy_label

# Seconds a process killed or left alone may take to be gone (a wait bound, not a timing check).
GONE_WITHIN_S = 60.0


def gone(pid: int) -> bool:
    """Whether ``pid`` no longer runs (absent, or a zombie nobody has reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def wait_until(check, what: str) -> None:
    deadline = time.monotonic() + GONE_WITHIN_S
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_loop_processes_run_in_their_own_groups_and_are_killed_at_the_end():
    with busy_processes(2, "loop") as busy:
        pids = [p.pid for p in busy.processes]
        assert len(set(pids)) == 2 and os.getpid() not in pids
        for pid in pids:
            assert not gone(pid) and os.getpgid(pid) == pid  # each leads its own group
        assert busy.describe() == {"processes": 2, "kind": "loop", "threads": [1, 1]}
    for process in busy.processes:
        assert process.returncode == -signal.SIGKILL
        assert group_gone(process.pid)


def test_a_failing_block_still_kills_them():
    with pytest.raises(RuntimeError, match="a side failed"), busy_processes(1, "loop") as busy:
        assert busy.processes[0].poll() is None
        raise RuntimeError("a side failed")
    assert busy.processes[0].returncode == -signal.SIGKILL


def test_stop_kills_the_whole_group_children_included():
    leader = subprocess.Popen(
        ["sh", "-c", "sleep 300 & echo $!; wait"],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    child = int(leader.stdout.readline())
    assert os.getpgid(child) == leader.pid
    stop([leader])
    assert leader.returncode == -signal.SIGKILL
    wait_until(lambda: gone(child), "the leader's child outlived stop()")


def test_the_torch_kind_runs_on_torchs_default_threads(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MKL_NUM_THREADS", "1")
    env = busy_env("torch")
    assert "OMP_NUM_THREADS" not in env and "MKL_NUM_THREADS" not in env
    assert busy_env("loop")["OMP_NUM_THREADS"] == "1"
    default = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    with busy_processes(1, "torch") as busy:
        assert busy.threads == [int(default.stdout)]
    assert busy.processes[0].returncode == -signal.SIGKILL


def test_a_busy_process_exits_once_the_bench_is_gone():
    """A bench killed before it could stop them (SIGKILL) leaves no busy process running."""
    script = (
        "import os, sys\n"
        "from parity.bench.busy import busy_processes\n"
        "with busy_processes(1, 'loop') as busy:\n"
        "    print(busy.processes[0].pid, flush=True)\n"
        "    os._exit(0)  # as if killed: no cleanup\n"
    )
    bench = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO_ROOT,
        env=busy_env("loop"),
        capture_output=True,
        text=True,
        check=True,
    )
    pid = int(bench.stdout)
    wait_until(lambda: gone(pid), "a busy process outlived its bench")


def test_a_busy_process_that_never_gets_ready_is_named_and_stopped(monkeypatch):
    monkeypatch.setattr(busy_module, "READY_TIMEOUT_S", 30.0)
    monkeypatch.setattr(busy_module, "KINDS", ("loop", "torch", "nothing"))
    started = []
    monkeypatch.setattr(busy_module, "stop", lambda processes: started.extend(processes))
    context = busy_processes(1, "nothing")  # the child refuses the kind, exits 2 without a word
    with pytest.raises(RuntimeError, match=r"busy process \(nothing, pid \d+\) not ready"):
        context.__enter__()
    assert len(started) == 1  # stopped all the same
    stop(started)
    assert started[0].returncode == 2


def test_the_command_line_refuses_a_kind_without_processes(capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(["--busy-kind", "torch"])
    assert "--busy-kind torch needs --busy N" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.parse_args(["--busy", "-1"])
    assert cli.parse_args(["--busy", "2"]).busy_kind == "loop"
    args = cli.parse_args([])
    assert (args.busy, args.busy_kind) == (0, None)


def test_the_bench_starts_them_before_the_first_side_and_stops_them_when_it_fails(
    tmp_path, monkeypatch
):
    started: list[Busy] = []
    real = cli.busy_processes

    def recording(count, kind):
        context = real(count, kind)
        busy = context.__enter__()
        started.append(busy)
        return _Entered(context, busy)

    def failing_side(spec_path, side, workdir, threads):
        (process,) = started[0].processes
        assert process.poll() is None  # running when the first side starts
        raise RuntimeError(f"side {side!r} failed")

    monkeypatch.setattr(cli, "busy_processes", recording)
    monkeypatch.setattr(cli, "run_worker", failing_side)
    argv = ["--preset", "tiny", "--sides", "ours", "--workdir", str(tmp_path), "--busy", "1"]
    with pytest.raises(RuntimeError, match="side 'ours' failed"):
        cli.main(argv)
    assert started[0].kind == "loop"
    assert started[0].processes[0].returncode == -signal.SIGKILL


class _Entered:
    """A context manager already entered: the ``with`` in the bench exits it."""

    def __init__(self, context, value):
        self.context, self.value = context, value

    def __enter__(self):
        return self.value

    def __exit__(self, *exc):
        return self.context.__exit__(*exc)


def test_the_table_says_what_ran_beside_the_sides():
    assert busy_label({"processes": 0, "kind": None, "threads": []}) == "nothing (--busy 0)"
    assert busy_label({"processes": 1, "kind": "torch", "threads": [2]}) == (
        "1 busy process (torch, 2 threads)"
    )
    assert busy_label({"processes": 3, "kind": "loop", "threads": [1, 1, 1]}) == (
        "3 busy processes (loop, 1 thread each)"
    )


@pytest.mark.slow
def test_tiny_preset_beside_a_busy_torch_job_records_it(tmp_path, monkeypatch):
    started: list[Busy] = []
    real = cli.busy_processes

    def recording(count, kind):
        context = real(count, kind)
        started.append(context.__enter__())
        return _Entered(context, started[-1])

    monkeypatch.setattr(cli, "busy_processes", recording)
    out = tmp_path / "bench.json"
    status = cli.main(["--preset", "tiny", "--sides", "trl", "ours", "--workdir",
                       str(tmp_path / "work"), "--json", str(out), "--busy", "1",
                       "--busy-kind", "torch"])  # fmt: skip
    assert status == 0
    busy = json.loads(out.read_text())["config"]["busy"]
    assert busy == started[0].describe() and busy["processes"] == 1 and busy["kind"] == "torch"
    assert started[0].processes[0].returncode == -signal.SIGKILL
