"""Busy processes beside the bench (``--busy N``, ``--busy-kind``): the machine a user shares.

:func:`busy_processes` starts N processes before the first side and stops them when the bench
ends or fails: each in a session (process group) of its own, stopped by killing that group with
``SIGKILL``, and each exits by itself once the bench's process is gone. Kinds:

- ``loop``: a pure-Python busy loop (one core, no torch);
- ``torch``: repeated float32 matmuls in torch with its default thread count (the bench's
  ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` are not passed on): a multi-threaded job.

A process says it is ready (torch imported, one matmul done) on its stdout, with its torch thread
count, before the first side starts. Run one by itself: ``python -m parity.bench.busy loop``.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import select
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
KINDS = ("loop", "torch")
# Seconds a busy process may take to say it is ready (importing torch on a loaded machine).
READY_TIMEOUT_S = 120.0
# Side of the square float32 matrices the torch kind multiplies (~0.27 GFLOP a product).
MATMUL_SIZE = 512
# Loop iterations between two checks that the bench is still there.
CHECK_EVERY = 100_000
READY = "ready"


@dataclass
class Busy:
    """The busy processes running beside the bench.

    Attributes:
        kind: ``loop`` or ``torch`` (None: no busy process).
        processes: one ``Popen`` per busy process (each the leader of its own process group).
        threads: each process's torch thread count (1 for a loop).
    """

    kind: str | None
    processes: list[subprocess.Popen] = field(default_factory=list)
    threads: list[int] = field(default_factory=list)

    def describe(self) -> dict:
        """What the report records: how many, of which kind, with how many threads each."""
        return {"processes": len(self.processes), "kind": self.kind, "threads": self.threads}


def busy_env(kind: str) -> dict[str, str]:
    """The environment of a busy process: torch's default thread count for ``torch``."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    if kind == "torch":
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env.pop(name, None)
    return env


@contextlib.contextmanager
def busy_processes(count: int, kind: str | None) -> Iterator[Busy]:
    """``count`` busy processes of ``kind``, running (and ready) for the whole ``with`` block,
    killed (their whole process group) when it ends, however it ends; none for ``count`` 0.

    Raises:
        ValueError: an unknown ``kind`` or a negative ``count``.
        RuntimeError: a busy process that exits or stays silent before it is ready.
    """
    if count < 0 or (count > 0 and kind not in KINDS):
        raise ValueError(f"--busy {count} --busy-kind {kind}: want N >= 0 and one of {KINDS}")
    busy = Busy(kind if count else None)
    try:
        for _ in range(count):
            busy.processes.append(_start(kind))
        busy.threads = [_wait_ready(p, kind) for p in busy.processes]
        yield busy
    finally:
        stop(busy.processes)


def _start(kind: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "parity.bench.busy", kind, str(os.getpid())]
    return subprocess.Popen(
        command,
        cwd=REPO_ROOT,
        env=busy_env(kind),
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,  # its own process group, killed whole by stop()
    )


def _wait_ready(process: subprocess.Popen, kind: str) -> int:
    """The thread count a busy process reports once it is ready."""
    said, _, _ = select.select([process.stdout], [], [], READY_TIMEOUT_S)
    line = process.stdout.readline() if said else ""  # "" too once it has exited
    word, _, threads = line.strip().partition(" ")
    if word != READY:
        raise RuntimeError(
            f"busy process ({kind}, pid {process.pid}) not ready within {READY_TIMEOUT_S:.0f} s: "
            f"exit status {process.poll()}, said {line!r}"
        )
    return int(threads)


def stop(processes: list[subprocess.Popen]) -> None:
    """Kill each process's whole group and reap it."""
    for process in processes:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    for process in processes:
        process.wait()
        if process.stdout is not None:
            process.stdout.close()


def _loop(bench_pid: int) -> None:
    """Spin one core in pure Python until the bench's process is gone."""
    print(READY, 1, flush=True)
    x = 0
    while True:
        for _ in range(CHECK_EVERY):
            x += 1
        if os.getppid() != bench_pid:
            return


def _torch(bench_pid: int) -> None:
    """Multiply float32 matrices on torch's default threads until the bench's process is gone."""
    import torch  # why: only this kind needs it; the loop kind starts without it

    a = torch.randn(MATMUL_SIZE, MATMUL_SIZE)
    b = a @ a
    print(READY, torch.get_num_threads(), flush=True)
    while os.getppid() == bench_pid:
        b = a @ b
        b = b / b.norm()


def main(argv: list[str] | None = None) -> int:
    """``python -m parity.bench.busy KIND [BENCH_PID]``: one busy process (until killed, or
    until BENCH_PID, its parent, is gone)."""
    argv = sys.argv[1:] if argv is None else argv
    kind, bench_pid = argv[0], int(argv[1]) if len(argv) > 1 else os.getppid()
    if kind not in KINDS:
        print(f"unknown kind {kind!r}; one of {KINDS}", file=sys.stderr)
        return 2
    (_loop if kind == "loop" else _torch)(bench_pid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
