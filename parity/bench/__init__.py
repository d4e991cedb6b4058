"""The benchmark: ours and trl's DPOTrainer side by side; time, memory, FLOPs, losses.

Run it with ``python -m parity.bench`` (``--help``; the program is ``cli``): ``presets`` says what
trains, each side trains in its own ``python -m parity.bench.worker`` process, ``flops`` and
``flop_meters`` count its FLOPs, ``table`` prints the report. Results: ``parity/BENCHMARKS.md``.
"""
