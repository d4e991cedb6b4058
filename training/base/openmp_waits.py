"""OpenMP threads that sleep while they wait: set before torch loads, by ``training``'s import.

torch's CPU kernels run on OpenMP threads (GNU libgomp), which by default spin for a while at
every barrier, waiting for the others. On a machine whose cores other processes also use, the
other thread is often descheduled: the spinning one burns its time slice and every small kernel
waits a scheduler tick. Measured on 2 shared cores (SmolLM2-135M, 2 held-out pairs and 2
sampled prompts), the evaluation took 199 s of wall time and 130 s of CPU time with spinning
waits, 25 s and 32 s with passive ones (one thread: 22 s); a (2, 576) x (576, 1536) linear
took 7.7 ms instead of 0.2 ms.

A passive wait costs a wake-up per parallel region instead (microseconds), so on cores of
its own a run may want spinning back: ``OMP_WAIT_POLICY=ACTIVE`` in the environment wins.
"""

from __future__ import annotations

import os
import sys

WAIT_POLICY = "OMP_WAIT_POLICY"


def passive_openmp_waits() -> bool:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` unless the environment already chose a policy.

    libgomp reads it once, when torch loads: True when this call set it in time (torch not
    imported yet), False when the environment had a policy or torch came first."""
    if WAIT_POLICY in os.environ or "torch" in sys.modules:
        return False
    os.environ[WAIT_POLICY] = "PASSIVE"
    return True
