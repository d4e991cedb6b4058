"""Lightning training for DPO: ``python -m training.fit`` (and ``evaluate``, ``sweep``).

Sub-packages import one way (``tests/training/test_layers.py``): ``base`` (config, command
line, errors, precision table, dpo_core settings) < ``embedded`` < ``inputs`` < ``eval`` <
``run`` < the entry points ``fit``, ``evaluate``, ``sweep`` and ``api``.

From Python: ``from training import train`` (``training.api``): trl's names as keywords, a
``datasets.Dataset`` as the data.

Importing ``training`` makes torch's OpenMP threads sleep while they wait, unless the
environment says otherwise (``training.base.openmp_waits``: on shared cores spinning waits made
the evaluation 8x slower).
"""

from training.base.openmp_waits import passive_openmp_waits

passive_openmp_waits()


def __getattr__(name: str):
    """``training.train`` is ``training.api.train``, imported on first use."""
    if name == "train":
        # why: training.api loads Lightning; `import training.base` (for --help) must not
        from training.api import train

        return train
    raise AttributeError(f"module 'training' has no attribute {name!r}")
