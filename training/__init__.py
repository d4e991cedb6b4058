"""Lightning training for DPO: ``python -m training.fit`` (and ``evaluate``, ``sweep``).

Sub-packages import one way (``tests/training/test_layers.py``): ``base`` (config, command
line, errors, precision table, dpo_core settings) < ``embedded`` < ``inputs`` < ``eval`` <
``run`` < the entry points ``fit``, ``evaluate`` and ``sweep``.
"""
