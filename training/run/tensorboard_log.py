"""The run's ``tensorboard/`` event files, with a failed write naming the folder.

Lightning's ``TensorBoardLogger`` reports a full disk as "no space left on device" with no path,
or re-raises it from ``log_metrics`` as "you tried to log 3.0 which is currently not supported".
``PathNamingTensorBoardLogger`` turns any failure that comes from the operating system into a
``RunError`` naming the logger's folder and the cause.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from lightning.pytorch.loggers import TensorBoardLogger

from training.base.errors import is_no_space, write_failure


def _from_os(err: BaseException) -> bool:
    """Whether ``err``, or an exception it was raised from, is an operating-system error."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError):
            return True
        err = err.__cause__ or err.__context__
    return False


class PathNamingTensorBoardLogger(TensorBoardLogger):
    """``TensorBoardLogger`` whose writes fail with a ``RunError`` naming its folder."""

    @contextlib.contextmanager
    def _naming_folder(self, what: str):
        try:
            yield
        except Exception as err:
            if not (is_no_space(err) or _from_os(err)):
                raise
            cause = err if isinstance(err, OSError) else (err.__cause__ or err)
            raise write_failure(Path(self.log_dir), cause, what) from err

    def log_metrics(self, metrics, step=None) -> None:
        with self._naming_folder("writing TensorBoard events"):
            super().log_metrics(metrics, step)

    def log_hyperparams(self, params, metrics=None) -> None:
        with self._naming_folder("writing TensorBoard hyperparameters"):
            super().log_hyperparams(params, metrics)

    def save(self) -> None:
        with self._naming_folder("writing TensorBoard events"):
            super().save()

    def finalize(self, status: str) -> None:
        with self._naming_folder("closing TensorBoard's event file"):
            super().finalize(status)
