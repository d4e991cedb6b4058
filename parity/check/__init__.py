"""The parity check: trl's DPOTrainer and ours on the same cases, every number compared.

Run it with ``python -m parity`` (``--help``; the program is ``cli``). ``tolerances`` holds the
bound of every check, ``noise_floor`` the floor measured by perturbed trl runs, ``compare``
lines up two runs of a case, ``table`` prints and writes the report.
"""
