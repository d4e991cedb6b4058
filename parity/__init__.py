"""Ours against trl 1.16's DPOTrainer: three programs, one package each, over shared sides.

- ``parity.check``: the parity check, ``python -m parity`` (every number of both runs compared).
- ``parity.bench``: the benchmark, ``python -m parity.bench`` (time, memory, FLOPs per side).
- ``parity.gpu_check``: the prepared single-GPU check, ``python -m parity.gpu_check`` (runs the
  other two and the GPU probes as child processes).
- ``parity.sides``: what they share: a case, the files both sides start from, trl's side and
  ours, and what a run hands back.

Imports point one way (``tests/parity/test_packages.py``): ``sides`` imports none of the
others, ``check`` imports ``sides``, ``bench`` imports ``sides`` and the check's loss bound
(``check.tolerances``), ``gpu_check`` the bench's presets and table.
"""
