"""Parity with trl's DPOTrainer (`python -m parity`) and the benchmark (`python -m parity.bench`)."""
