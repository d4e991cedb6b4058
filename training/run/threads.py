"""How many torch CPU threads each process of a run uses: chosen, not inherited.

torch takes every core it sees by default, in every process. Two DDP or sharded processes on a
2-core machine then run 2 x 2 threads, and a parallel region waits for a thread that is not
scheduled: many small kernels per step (ours) lose the most (issue 27 measured 10-25x). So a run
chooses its layout before it loads anything:

- ``--threads N`` (flag or YAML) when given;
- else ``OMP_NUM_THREADS`` when set (the user's, or a launcher's, choice);
- else the usable cores split over the processes this machine runs: ``max(1, cores // N)``.

The usable cores are those this process may run on (``os.sched_getaffinity``: taskset, cpusets)
and, under a cgroup CPU quota (containers, CI runners), no more than the quota allows
(``/sys/fs/cgroup/cpu.max``). The layout is logged at the start of the run.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from training.base.config import FitConfig

log = logging.getLogger("training.fit")

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def cgroup_cores(path: Path = CGROUP_CPU_MAX) -> int | None:
    """The whole cores a cgroup v2 CPU quota allows (``"quota period"``), None without one."""
    try:
        quota, period = path.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return max(1, math.floor(int(quota) / int(period)))


def usable_cores(cgroup: Path = CGROUP_CPU_MAX) -> int:
    """Cores this process may use: its affinity set, capped by a cgroup quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    quota = cgroup_cores(cgroup)
    return max(1, min(cores, quota) if quota else cores)


@dataclass(frozen=True)
class ThreadLayout:
    """Threads per process, the processes on this machine, the usable cores, and why."""

    threads: int
    processes: int
    cores: int
    source: str

    def line(self) -> str:
        return (
            f"threads: {self.threads} per process x {self.processes} process(es) on this "
            f"machine ({self.cores} usable cores; {self.source})"
        )


def thread_layout(
    cfg: FitConfig, env: dict | None = None, cores: int | None = None
) -> ThreadLayout:
    """The layout of the module docstring for ``cfg`` (``env``: the environment to read)."""
    env = os.environ if env is None else env
    cores = usable_cores() if cores is None else cores
    devices = cfg.trainer.devices
    processes = cores if devices == -1 else max(1, devices)
    if cfg.trainer.threads is not None:
        return ThreadLayout(cfg.trainer.threads, processes, cores, "--threads")
    omp = env.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) > 0:
        return ThreadLayout(int(omp), processes, cores, "OMP_NUM_THREADS")
    return ThreadLayout(max(1, cores // processes), processes, cores, "usable cores / processes")


def apply_thread_layout(cfg: FitConfig) -> ThreadLayout:
    """Set torch's intra-op threads to the layout's, and log it."""
    layout = thread_layout(cfg)
    torch.set_num_threads(layout.threads)
    log.info(layout.line())
    return layout
