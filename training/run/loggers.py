"""The run's loggers, as ``--report-to`` picks them: csv, tensorboard, wandb, mlflow, none.

``logs/metrics.csv`` (``training.run.metrics_csv``) is always written, every step at trl's
count: it is the run's own record, which ``--resume``, report.md and the plots read; ``csv`` in
``--report-to`` names it, ``none`` asks for it alone. The others are Lightning's loggers:

- ``tensorboard``: ``<output_dir>/tensorboard/`` event files;
- ``wandb``: offline, a local run directory ``<output_dir>/wandb/offline-run-*`` (``wandb sync``
  uploads it) unless ``WANDB_MODE=online``; project ``$WANDB_PROJECT`` or ``dpo``;
- ``mlflow``: a local file store ``<output_dir>/mlruns`` unless ``MLFLOW_TRACKING_URI`` is set;
  experiment ``$MLFLOW_EXPERIMENT_NAME`` or ``dpo``.

Each gets trl's metric names (``loss``, ``rewards/chosen``, ``eval_loss``, ...) at trl's step
count (the first optimizer step is step 1), one row every ``--logging-steps`` steps averaged as
trl averages (``TrlSteps``); wandb and MLflow also get the resolved config.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger, MLFlowLogger, WandbLogger

from training.base.config import FitConfig
from training.base.errors import RunError
from training.base.step_count import trl_step
from training.run.metrics_csv import StepCSVLogger
from training.run.tensorboard_log import PathNamingTensorBoardLogger

# Per-step values trl logs as they are at the logging step, not averaged over the window.
LAST_VALUE_KEYS = ("learning_rate", "grad_norm", "num_tokens", "epoch", "resume_changes")


class TrlSteps(Logger):
    """Another logger, fed as trl's Trainer logs: steps counted from 1, and the training rows of
    ``every`` optimizer steps sent as one (the mean of each metric over them, as trl's
    ``log``; the last value of ``LAST_VALUE_KEYS``). Held-out (``eval_*``) rows go at once; a
    window cut short by the end of training is sent when the run ends."""

    def __init__(self, inner: Logger, every: int = 1) -> None:
        super().__init__()
        self.inner = inner
        self.every = every
        self._window: list[dict[str, float]] = []
        self._last_step = 0

    @property
    def name(self) -> str | None:
        return self.inner.name

    @property
    def version(self) -> Any:
        return self.inner.version

    @property
    def save_dir(self) -> str | None:
        return self.inner.save_dir

    @property
    def log_dir(self) -> str | None:
        return getattr(self.inner, "log_dir", None)

    @property
    def experiment(self) -> Any:
        return self.inner.experiment

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        self.inner.log_hyperparams(params, *args, **kwargs)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        step = trl_step(step)  # Lightning counts optimizer steps from 0, trl from 1
        if any(k.startswith("eval_") for k in metrics):
            self.inner.log_metrics(metrics, step)
            return
        self._window.append(dict(metrics))
        self._last_step = step
        if step % self.every == 0:
            self._flush()

    def _flush(self) -> None:
        if not self._window:
            return
        keys = {k for row in self._window for k in row}
        row = {}
        for key in keys:
            values = [r[key] for r in self._window if key in r]
            row[key] = values[-1] if key in LAST_VALUE_KEYS else sum(values) / len(values)
        self._window = []
        self.inner.log_metrics(row, self._last_step)

    def save(self) -> None:
        self.inner.save()

    def finalize(self, status: str) -> None:
        self._flush()
        self.inner.finalize(status)
        if isinstance(self.inner, WandbLogger):  # Lightning leaves the wandb run open:
            self.inner.experiment.finish()  # a second run in this process would join it


def make_loggers(cfg: FitConfig, earlier_rows: list[dict] | None = None) -> list[Logger]:
    """``logs/metrics.csv``'s logger (every step; ``earlier_rows``: the rows a resumed run
    continues), then one ``TrlSteps`` per logger ``--report-to`` names."""
    out = Path(cfg.trainer.output_dir)
    loggers: list[Logger] = [StepCSVLogger(str(out), "logs", earlier_rows)]
    for name in cfg.trainer.report_to:
        logger = _make(name, cfg, out)
        if logger is not None:
            loggers.append(TrlSteps(logger, cfg.trainer.logging_steps))
    return loggers


def _make(name: str, cfg: FitConfig, out: Path) -> Logger | None:
    if name == "tensorboard":
        with contextlib.suppress(ImportError):  # needs tensorboard (or tensorboardX)
            return PathNamingTensorBoardLogger(save_dir=str(out), name="tensorboard", version="")
        return None
    if name == "wandb":
        logger = wandb_logger(cfg, out)
    elif name == "mlflow":
        logger = mlflow_logger(cfg, out)
    else:  # csv (always written) and none
        return None
    logger.log_hyperparams(flat_config(cfg))
    return logger


def run_name(cfg: FitConfig) -> str:
    """``--run-name``, else the output directory's folder name."""
    return cfg.trainer.run_name or Path(cfg.trainer.output_dir).resolve().name


def wandb_logger(cfg: FitConfig, out: Path) -> Logger:
    """Lightning's ``WandbLogger``: offline unless ``WANDB_MODE=online``."""
    _need("wandb", "wandb")
    online = os.environ.get("WANDB_MODE", "offline") == "online"
    return WandbLogger(
        name=run_name(cfg),
        save_dir=str(out),
        project=os.environ.get("WANDB_PROJECT", "dpo"),
        offline=not online,
    )


def mlflow_logger(cfg: FitConfig, out: Path) -> Logger:
    """Lightning's ``MLFlowLogger``: a file store in ``<out>/mlruns`` unless
    ``MLFLOW_TRACKING_URI`` is set."""
    _need("mlflow", "mlflow-skinny")
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        uri = (out.resolve() / "mlruns").as_uri()
        # MLflow 3 asks for this to use a file store (mlflow-skinny has no database backend)
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return MLFlowLogger(
        experiment_name=os.environ.get("MLFLOW_EXPERIMENT_NAME", "dpo"),
        run_name=run_name(cfg),
        tracking_uri=uri,
    )


def _need(module: str, package: str) -> None:
    """A ``RunError`` naming the package to install when ``module`` cannot be imported."""
    if importlib.util.find_spec(module) is None:
        raise RunError(f"--report-to {module} needs the {module} package: pip install {package}")


def flat_config(cfg: FitConfig) -> dict[str, Any]:
    """The resolved config as ``{field: value}`` (field names are unique across groups), as
    trl hands its arguments to wandb and MLflow."""
    return {k: v for group in dataclasses.asdict(cfg).values() for k, v in group.items()}
