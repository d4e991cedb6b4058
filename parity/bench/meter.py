"""What a bench worker measures while its side trains: step times, tokens, memory, FLOPs.

Both sides' workers (``parity.bench.ours_worker``, ``parity.bench.trl_worker``) feed one
``Meter`` from their trainer's step boundaries; ``parity.bench.worker`` writes what it holds.
"""

from __future__ import annotations

import resource
import time

import psutil
import torch

from parity.bench import flop_meters, flops


class Meter:
    """Times optimizer steps and counts their completion tokens; both trainers feed it."""

    def __init__(self, cuda: bool, started: float, profile_step: int | None = None) -> None:
        self.cuda = cuda
        self.started = started  # perf_counter() when the worker process started
        self.profile_step = profile_step  # this step runs under torch.profiler
        self.profile: list[dict] | None = None
        self._profiler = None
        self.step_seconds: list[float] = []
        self.step_cpu_seconds: list[float] = []  # CPU time of all threads: robust to other load
        self.step_tokens: list[int] = []
        self.recorder = flop_meters.PassRecorder()  # backbone calls, recorded inside steps only
        self.step_passes: list[list[flops.Pass]] = []
        self.step_pairs: list[list[flops.PairTokens]] = []  # per micro-batch
        self.shape: flops.DecoderShape | None = None  # the policy's, set when training starts
        self.head_rule: flops.HeadRule | None = None
        self.compute_dtype: str = "float32"
        self.setup_seconds: float | None = None
        self.rss_at_start_mb: float | None = None
        self.threads: int | None = None
        self._start: float | None = None
        self._cpu_start: float | None = None

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def begin(self) -> None:
        self._sync()
        now = time.perf_counter()
        if self.setup_seconds is None:
            self.setup_seconds = now - self.started
            self.rss_at_start_mb = psutil.Process().memory_info().rss / 2**20
            self.threads = torch.get_num_threads()
        if len(self.step_seconds) == self.profile_step:
            self._profiler = torch.profiler.profile()
            self._profiler.__enter__()
        self.recorder.start()
        self._start = now
        self._cpu_start = time.process_time()

    def end(self) -> None:
        self._sync()
        self.step_seconds.append(time.perf_counter() - self._start)
        self.step_cpu_seconds.append(time.process_time() - self._cpu_start)
        self.step_passes.append(self.recorder.stop())
        if self._profiler is not None:
            self._profiler.__exit__(None, None, None)
            self.profile = top_ops(self._profiler)
            self._profiler = None


def top_ops(profiler, rows: int = 15) -> list[dict]:
    """The ops of a profiled step with the most self CPU time (seconds), largest first."""
    events = sorted(profiler.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    return [
        {
            "op": e.key,
            "self_seconds": e.self_cpu_time_total / 1e6,
            "share": e.self_cpu_time_total / total,
            "calls": e.count,
        }
        for e in events[:rows]
    ]


def peak_memory(cuda: bool) -> dict[str, float | None]:
    """Peak RSS of this process (MiB; ru_maxrss is KiB on Linux) and peak CUDA allocation."""
    return {
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
    }
