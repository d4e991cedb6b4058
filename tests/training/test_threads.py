"""training.run.threads: the run's thread layout, chosen from the usable cores and the processes
on the machine, never inherited (processes x threads never exceed the cores)."""

from __future__ import annotations

import dataclasses
import logging

import torch

from tests.training.conftest import base_args, fit
from training.base.config import FitConfig
from training.run.threads import cgroup_cores, thread_layout, usable_cores


def config(**trainer) -> FitConfig:
    cfg = FitConfig()
    return dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, **trainer))


def test_processes_share_the_cores():
    assert thread_layout(config(devices=2), env={}, cores=2).threads == 1
    assert thread_layout(config(devices=2), env={}, cores=8).threads == 4
    assert thread_layout(config(devices=3), env={}, cores=2).threads == 1  # never 0
    one = thread_layout(config(), env={}, cores=2)
    assert (one.threads, one.processes, one.source) == (2, 1, "usable cores / processes")
    assert thread_layout(config(devices=-1), env={}, cores=4).threads == 1  # a process a core


def test_flag_then_environment_override():
    assert (
        thread_layout(config(devices=2, threads=3), env={"OMP_NUM_THREADS": "2"}, cores=8).threads
        == 3
    )
    layout = thread_layout(config(devices=2), env={"OMP_NUM_THREADS": "3"}, cores=8)
    assert (layout.threads, layout.source) == (3, "OMP_NUM_THREADS")
    assert thread_layout(config(), env={"OMP_NUM_THREADS": "junk"}, cores=2).threads == 2


def test_a_cgroup_quota_caps_the_usable_cores(tmp_path):
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("max 100000\n")
    assert cgroup_cores(cpu_max) is None
    cpu_max.write_text("150000 100000\n")
    assert cgroup_cores(cpu_max) == 1 and usable_cores(cpu_max) == 1
    cpu_max.write_text("400000 100000\n")
    assert cgroup_cores(cpu_max) == 4
    assert cgroup_cores(tmp_path / "missing") is None


def test_a_run_sets_and_logs_its_layout(tiny_assets, tmp_path, caplog, monkeypatch):
    seen = []
    monkeypatch.setattr(torch, "set_num_threads", seen.append)
    with caplog.at_level(logging.INFO, "training.fit"):
        fit(base_args(tiny_assets, tmp_path, max_steps=1, threads=1))
    assert seen == [1]
    assert any(
        r.message.startswith("threads: 1 per process x 1 process(es)") for r in caplog.records
    )
