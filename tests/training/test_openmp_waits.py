"""Importing ``training`` makes OpenMP threads wait passively, unless the environment chose."""

from __future__ import annotations

import os
import subprocess
import sys

from training.base.openmp_waits import WAIT_POLICY, passive_openmp_waits

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHOW = "import os, training, torch; print(os.environ.get('OMP_WAIT_POLICY'))"


def policy_after_import(env: dict[str, str]) -> str:
    """The wait policy a fresh interpreter has after ``import training`` then ``import torch``."""
    done = subprocess.run(
        [sys.executable, "-c", SHOW], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


def test_import_sets_a_passive_wait_before_torch_loads():
    env = {k: v for k, v in os.environ.items() if k != WAIT_POLICY}
    assert policy_after_import(env) == "PASSIVE"


def test_a_policy_in_the_environment_wins():
    assert policy_after_import({**os.environ, WAIT_POLICY: "ACTIVE"}) == "ACTIVE"


def test_too_late_once_torch_is_loaded(monkeypatch):
    """In this process torch is loaded (libgomp has read the environment): nothing is set."""
    import torch  # noqa: F401  (loaded by the test suite already; named here for the reader)

    monkeypatch.delenv(WAIT_POLICY, raising=False)
    assert passive_openmp_waits() is False
    assert WAIT_POLICY not in os.environ
