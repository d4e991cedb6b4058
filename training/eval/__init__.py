"""Evaluation before vs after training: models, sampling, judges, the report and its plots."""
