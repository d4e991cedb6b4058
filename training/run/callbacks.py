"""Lightning plug-ins of the training job: atomic checkpoints, step timing and a progress bar
that counts optimizer steps."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write each checkpoint to a temporary file in the same folder, fsync it, then rename it
    over the target: a run killed mid-write leaves the previous checkpoint intact, never a torn
    one (``os.replace`` is atomic on POSIX within one file system)."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        # A writer killed mid-save (SIGKILL runs no except clause) leaves its temporary behind.
        for stale in path.parent.glob(f".{path.name}.*.tmp"):
            stale.unlink(missing_ok=True)


class StepTimer(L.Callback):
    """Wall time per optimizer step (the end-of-run summary reports its median)."""

    def __init__(self) -> None:
        self.durations: list[float] = []
        self._start: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        import time

        if self._start is None:
            self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        import time

        accum = trainer.accumulate_grad_batches
        if (batch_idx + 1) % accum == 0 and self._start is not None:
            self.durations.append(time.perf_counter() - self._start)
            self._start = None

    def median(self) -> float:
        if not self.durations:
            return float("nan")
        ordered = sorted(self.durations)
        return ordered[len(ordered) // 2]


class StepProgressBar(TQDMProgressBar):
    """Lightning's bar, counting optimizer steps up to the run's total (``--max-steps``, or the
    epochs' steps) in one bar across epochs. Lightning's own bar counts the batches of one epoch:
    ``6/100`` for a 6-step run over 100 batches."""

    def __init__(self, total_steps: int) -> None:
        super().__init__()
        self.total_steps = total_steps

    def on_train_epoch_start(self, trainer, *_) -> None:
        if self._leave:
            self.train_progress_bar = self.init_train_tqdm()
        bar = self.train_progress_bar
        bar.reset(total=self.total_steps)
        self._show(bar, trainer.global_step)  # a resumed run starts where it stopped

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        bar = self.train_progress_bar
        step = trainer.global_step
        if bar is not None and step != bar.n and self._should_update(step, bar.total):
            self._show(bar, step)
            bar.set_postfix(self.get_metrics(trainer, pl_module))

    @staticmethod
    def _show(bar, n: int) -> None:
        if not bar.disable:
            bar.n = n
            bar.refresh()
