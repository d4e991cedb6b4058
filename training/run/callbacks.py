"""Lightning plug-ins of the training job: atomic checkpoints, step timing, a progress bar
that counts optimizer steps, and a report of the memory each process holds."""

from __future__ import annotations

import logging
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.plugins.io import TorchCheckpointIO

from training.base.errors import RunError, is_no_space, write_failure

log = logging.getLogger("training.fit")

# The checkpoint that ``last.ckpt`` replaced, kept beside it (training.run.nan_stop falls back
# to it when the last one already holds the weights of a non-finite step).
PREVIOUS_NAME = "previous.ckpt"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write each checkpoint to a temporary file in the same folder, fsync it, then rename it
    over the target: a run killed mid-write leaves the previous checkpoint intact, never a torn
    one (``os.replace`` is atomic on POSIX within one file system).

    The checkpoint being replaced stays as ``previous.ckpt`` (a hard link: no copy), so a run
    that stops on a non-finite value can fall back to the one before the bad step
    (``training.run.nan_stop``). A write that fails (a full disk) removes its temporary, keeps
    the previous checkpoint and raises a ``RunError`` naming the file and the cause."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        previous = path.with_name(PREVIOUS_NAME)
        previous.unlink(missing_ok=True)  # at most two checkpoints on disk while writing
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
        except Exception as err:
            no_space = disk_too_full(path.parent, checkpoint, Path(tmp))
            Path(tmp).unlink(missing_ok=True)
            raise checkpoint_write_failure(path, err, no_space) from err
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _link_previous(path, previous)
        os.replace(tmp, path)
        # A writer killed mid-save (SIGKILL runs no except clause) leaves its temporary behind.
        for pattern in (f".{path.name}.*.tmp", f".{PREVIOUS_NAME}.*.tmp"):
            for stale in path.parent.glob(pattern):
                stale.unlink(missing_ok=True)


def _link_previous(path: Path, previous: Path) -> None:
    """Keep the checkpoint at ``path`` (about to be replaced) as ``previous``, by a hard link
    made under a temporary name and renamed: ``path`` exists at every moment."""
    if not path.is_file():
        return
    link = path.with_name(f".{PREVIOUS_NAME}.{os.getpid()}.tmp")
    try:
        os.link(path, link)
    except OSError:  # a file system without hard links: no previous checkpoint is kept
        return
    os.replace(link, previous)


def tensor_bytes(obj) -> int:
    """Bytes of every tensor in a (nested) checkpoint: about what ``torch.save`` writes."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def disk_too_full(folder: Path, checkpoint, partial: Path) -> bool:
    """Whether a failed checkpoint write ran out of space: the bytes it still had to write
    exceed the free space left (torch's zip writer reports this as ``file write failed``)."""
    written = partial.stat().st_size if partial.exists() else 0
    return shutil.disk_usage(folder).free < tensor_bytes(checkpoint) - written


def checkpoint_write_failure(path: Path, err: BaseException, no_space: bool) -> RunError:
    """The message of a failed checkpoint write: the file, the cause, what was kept."""
    failure = write_failure(path, err, "writing a checkpoint")
    if no_space and not is_no_space(err):
        failure = RunError(f"{path}: no space left on device while writing a checkpoint")
    kept = (
        f"the checkpoint written before, {path}, is intact"
        if path.is_file()
        else "no earlier checkpoint exists"
    )
    return RunError(f"{failure}; {kept}")


class StepCheckpoint(ModelCheckpoint):
    """``checkpoints/last.ckpt`` every ``every`` optimizer steps (0: never), after the last step,
    and after the step a signal stops training at (``training.run.signals.SignalStop``), even
    with checkpoints off: the run is to be resumed.

    Each is written in ``on_train_batch_end``, as Lightning's periodic ones are, so a resume
    continues the same epoch at the next batch. Lightning's own final save (``on_train_end``)
    comes after the epoch loop closed the epoch: a resume from it with a larger ``--max-steps``
    would find the epoch done and train nothing; with the last step saved here, it never runs.
    """

    def __init__(self, dirpath: Path, every: int, signals) -> None:
        super().__init__(
            dirpath=dirpath,
            every_n_train_steps=max(0, every),
            every_n_epochs=0,
            save_last=True,
            save_top_k=0,
            enable_version_counter=False,  # never last-v1.ckpt beside another run's last.ckpt
        )
        self.every = every
        self.signals = signals

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        stopping = self.signals.stop_now(trainer)
        final = self.every > 0 and trainer.global_step >= trainer.max_steps
        if (stopping or final) and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_end(self, trainer, pl_module) -> None:
        """Nothing: the last step was saved above (or checkpoints are off)."""


class StepTimer(L.Callback):
    """Wall time per optimizer step (the end-of-run summary reports its median)."""

    def __init__(self) -> None:
        self.durations: list[float] = []
        self._start: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._start is None:
            self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
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
    ``6/100`` for a 6-step run over 100 batches. ``TQDM_DISABLE=1`` turns it off, as it does
    tqdm's own bars (Lightning passes ``disable=False`` explicitly, which tqdm's variable cannot
    override): ``python -m parity`` sets it to keep its table clean."""

    def __init__(self, total_steps: int) -> None:
        super().__init__()
        self.total_steps = total_steps
        if os.environ.get("TQDM_DISABLE", "").lower() in {"1", "true", "yes"}:
            self.disable()

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


def read_checkpoint(path: Path) -> dict:
    """A checkpoint file, its tensors memory-mapped (not read until used): cheap to open for its
    step, its run record or a finiteness check. Lightning checkpoints hold loop and callback
    state besides tensors, hence ``weights_only=False`` (the file is this run's own)."""
    return torch.load(path, map_location="cpu", mmap=True, weights_only=False)


def held_bytes(tensors) -> tuple[int, int]:
    """(bytes this process holds, bytes of the whole tensors) of ``tensors``: a sharded
    (DTensor) one holds its local shard only."""
    held = whole = 0
    for t in tensors:
        local = t.to_local() if callable(getattr(t, "to_local", None)) else t
        held += local.numel() * local.element_size()
        whole += t.numel() * t.element_size()
    return held, whole


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class MemoryReport(L.Callback):
    """One line per process after the first optimizer step (when the optimizer state exists):
    the bytes of parameters, gradients and optimizer state it holds against the whole model's
    (1/N of them each under ``--strategy fsdp``), and its peak RSS. Kept in ``self.line``."""

    def __init__(self) -> None:
        self.line: str | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.line is not None or trainer.global_step < 1:  # after the first optimizer step
            return
        optimizer = trainer.optimizers[0]
        params = [p for g in optimizer.param_groups for p in g["params"]]
        frozen = [p for p in pl_module.model.parameters() if not p.requires_grad]
        state = [t for s in optimizer.state.values() for t in s.values() if t.dim() > 0]
        parts = {
            "parameters": held_bytes([*params, *frozen]),
            "gradients": held_bytes([p.grad for p in params if p.grad is not None]),
            "optimizer": held_bytes(state),
        }
        held = ", ".join(
            f"{k} {h / 2**20:.1f} of {w / 2**20:.1f} MiB" for k, (h, w) in parts.items()
        )
        rank, world = trainer.global_rank, trainer.world_size
        self.line = (
            f"memory (process {rank + 1} of {world}): {held}; peak RSS {peak_rss_mib():.0f} MiB"
        )
        log.info(self.line)
