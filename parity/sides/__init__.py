"""Both sides of a parity case, shared by the check and the benchmark.

``cases`` (a ``ParityCase``: every setting that changes a number), ``datasets_io`` and
``models`` (rows and models), ``workspace`` (the files both sides start from), ``trl_side``
(trl's ``DPOTrainer``) and ``ours_side`` (``training.fit``), ``result`` (the ``RunResult`` each
returns) and ``padding_free_check`` (ours' padding-free forward against float64). Not a program:
``python -m parity`` and ``python -m parity.bench`` run them.
"""
