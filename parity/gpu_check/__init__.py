"""The prepared single-GPU check: the GPU tests, parity cases, the bench and two probes.

Run it with ``python -m parity.gpu_check --json OUT`` (``--dry-run``: the same stages on the
CPU, tiny); the program is ``cli``, which runs each stage as a child process: the two probes
(``env_probe``, ``attention_probe``: ``python -m parity.gpu_check.<probe>``), ``python -m parity``,
``python -m parity.bench`` and the gpu-marked tests.
"""
