"""The training run: the Lightning module, its callbacks and logger, resume, and outputs."""
