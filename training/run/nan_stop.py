"""What a run keeps and advises when training stops on a non-finite loss or gradient.

The stop comes at optimizer step ``k``, from the weights after ``k`` updates. ``last.ckpt`` may
hold exactly those weights (it is written after each update): resuming from it repeats the
failure at the same step whatever the learning rate, since the forward pass does not depend on
it. So only a checkpoint from a step before ``k`` whose weights are all finite is kept: the
writer keeps the checkpoint ``last.ckpt`` replaced as ``previous.ckpt``
(``training.run.callbacks.AtomicCheckpointIO``), and one of the two becomes ``last.ckpt`` again.
The message says which file is kept, from which step, and what to run next.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from training.base.config import FitConfig
from training.run.callbacks import PREVIOUS_NAME
from training.run.checkpoint_check import LAST_NAME, BadCheckpoint, verify_checkpoint
from training.run.sharded_checkpoint import (
    full_model_state,
    is_sharded_checkpoint,
    remove_checkpoint,
)


class NonFiniteStop(FloatingPointError):
    """A non-finite loss or gradient norm at optimizer step ``step`` (raised by ``DPOModule``
    before the value reaches the weights)."""

    def __init__(self, what: str, where: str, step: int) -> None:
        super().__init__(f"{what} at optimizer step {step}, {where}; training stopped")
        self.step = step


def finite_weights(path: Path, checkpoint: dict) -> bool:
    """Whether every floating-point tensor of the checkpoint's ``state_dict`` is finite (a
    sharded checkpoint's, read from its shards)."""
    weights = full_model_state(path) if is_sharded_checkpoint(path) else checkpoint["state_dict"]
    for tensor in weights.values():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            return False
    return True


def _judge(path: Path, bad_step: int) -> tuple[int | None, str]:
    """(the checkpoint's step, "" if it may be kept, else why not)."""
    try:
        checkpoint = verify_checkpoint(path)
    except (BadCheckpoint, OSError) as err:  # a torn or foreign file: unusable either way
        return None, f"unusable: {err}"
    step = checkpoint["global_step"]
    if step >= bad_step:
        return step, f"from step {step}, it holds the weights that gave the non-finite value"
    if not finite_weights(path, checkpoint):
        return step, f"from step {step}, its weights are not finite"
    return step, ""


def keep_good_checkpoint(folder: Path, bad_step: int) -> tuple[int | None, list[str]]:
    """Remove the checkpoints in ``folder`` that are not from before ``bad_step`` with finite
    weights; leave the newest good one as ``last.ckpt``. Returns (its step or None, a note per
    removed checkpoint: a file, or a sharded directory)."""
    good: dict[str, int] = {}
    removed: list[str] = []
    for name in (LAST_NAME, PREVIOUS_NAME):
        path = folder / name
        if not path.exists():
            continue
        step, reason = _judge(path, bad_step)
        if reason:
            remove_checkpoint(path)
            removed.append(f"removed {path} ({reason})")
        else:
            good[name] = step
    if LAST_NAME not in good and PREVIOUS_NAME in good:
        os.replace(folder / PREVIOUS_NAME, folder / LAST_NAME)
        good[LAST_NAME] = good.pop(PREVIOUS_NAME)
    return good.get(LAST_NAME), removed


def lower_learning_rate(cfg: FitConfig) -> str:
    """A tenth of the run's peak learning rate, written as a flag value."""
    return f"{cfg.optim.learning_rate / 10:.3g}"


def stop_message(stop: NonFiniteStop, cfg: FitConfig, is_writer: bool = True) -> str:
    """The whole message of a non-finite stop: what happened, what is kept, what to run.
    ``is_writer``: this process may touch the checkpoints (rank zero)."""
    folder = Path(cfg.trainer.output_dir) / "checkpoints"
    kept, removed = keep_good_checkpoint(folder, stop.step) if is_writer else (None, [])
    lr = lower_learning_rate(cfg)
    lines = [str(stop) + "."]
    lines += [f"  {note}" for note in removed]
    if kept is not None:
        lines.append(f"  kept {folder / LAST_NAME}: step {kept}, weights checked finite.")
        lines.append(
            f"  To continue from step {kept} with a lower learning rate: --resume "
            f"--resume-allow-changes --learning-rate {lr} (a tenth of "
            f"{cfg.optim.learning_rate:g}); or start again without --resume."
        )
    else:
        every = cfg.trainer.save_every_n_steps
        why = (
            "checkpoints are off (--save-every-n-steps 0)"
            if every <= 0
            else f"none was written before step {stop.step} (--save-every-n-steps {every})"
        )
        lines.append(f"  No checkpoint is kept in {folder}: {why}.")
        lines.append(
            f"  Start again without --resume and with a lower learning rate: --learning-rate "
            f"{lr} (a tenth of {cfg.optim.learning_rate:g})."
        )
    lines.append("  If a lower learning rate does not help, check the data and the loss settings.")
    return "\n".join(lines)
