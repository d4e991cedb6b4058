"""Lightning training for DPO: the module, data module, config and the `python -m training.fit` job."""
