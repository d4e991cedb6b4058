"""The training run: config, command line, the Lightning module, callbacks and outputs."""
