"""The prepared single-GPU check: the GPU tests, parity cases, the bench and two probes.

Run it with ``python -m parity.gpu_check --json OUT`` (``--dry-run``: the same stages on the
CPU, tiny); the program is ``cli``, which runs each stage as a child process. The probes run
as ``python -m parity.gpu_check.probes env|attention``.
"""
