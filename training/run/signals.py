"""SIGTERM and SIGINT: stop at an optimizer-step boundary with everything needed to resume.

A cluster scheduler sends SIGTERM before it kills a job; Ctrl-C sends SIGINT. Either one asks
the run to stop: during training, at the end of the optimizer step in progress, after which
``checkpoints/last.ckpt`` holds that step (``StepCheckpoint``), metrics.csv every step trained and
config.yaml the settings; ``model/`` is not written (the run did not finish). Before training (while
loading) and during the evaluation, the run stops at once. ``python -m training.fit`` then prints
one line with the ``--resume`` command and exits ``128 + signal``: 143 for SIGTERM, 130 for SIGINT,
as a shell reports a process killed by that signal. A second signal while stopping exits at once
(the checkpoint on disk is whole either way: it is written atomically).

Lightning 2.6 registers its own SIGTERM handler for ``fit``: it stops after the current micro-batch
(not the optimizer step) by raising ``SIGTERMException``, a ``SystemExit`` with code 0, with no
checkpoint. ``take_over_signals`` keeps it from registering, so this module's is the one behaviour.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

import lightning as L

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def exit_code(signum: int) -> int:
    """The exit status of a run stopped by ``signum``: 128 + its number (SIGTERM 143, SIGINT 130)."""
    return 128 + int(signum)


class Interrupted(BaseException):
    """The run stopped on a signal. A ``BaseException``, as ``KeyboardInterrupt``: no
    ``except Exception`` on the way swallows it. ``step``: the optimizer steps trained when
    training stopped (None: it stopped outside training)."""

    def __init__(self, signum: int, step: int | None = None, when: str = "") -> None:
        self.signum, self.step, self.when = int(signum), step, when
        super().__init__(f"{signal.Signals(signum).name} {when}".strip())

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


class SignalStop(L.Callback):
    """The process's SIGTERM / SIGINT handler, and the callback that acts on it in training.

    ``installed()`` puts the handler in place for the whole run. Inside ``deferred()`` (training,
    writing the outputs) a first signal is only recorded; elsewhere it raises ``Interrupted`` at
    once. In training, the step that was in progress finishes, ``StepCheckpoint`` writes it (it
    asks ``stop_now``), and the next batch raises ``Interrupted`` instead of starting."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.stop_step: int | None = None  # the step training stops after, once decided
        self.phase = "before training"  # where the run is, for a signal raised at once
        self._deferring = False
        self._step_before: int | None = None
        self._launcher = None

    # -- the handler ------------------------------------------------------------------------
    def handle(self, signum: int, _frame) -> None:
        if self.signum is not None:  # a second signal: the user does not want to wait
            name = signal.Signals(signum).name
            os.write(2, f"\nsecond signal ({name}) while stopping: exiting now\n".encode())
            os._exit(exit_code(signum))
        self.signum = signum
        if self._launcher is not None:  # processes Lightning started (DDP) stop with this one
            with contextlib.suppress(Exception):
                self._launcher.kill(signum)
        if not self._deferring:
            raise Interrupted(signum, self.stop_step, self.phase)

    @contextlib.contextmanager
    def installed(self) -> Iterator[SignalStop]:
        """This object handles SIGTERM and SIGINT inside the block (Python lets only the main
        thread set handlers: elsewhere, as a library call, the caller's handling stays)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        old = {s: signal.getsignal(s) for s in STOP_SIGNALS}
        for s in STOP_SIGNALS:
            signal.signal(s, self.handle)
        try:
            yield self
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Inside the block a first signal is recorded, not raised; see ``check``."""
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False

    def check(self, when: str) -> None:
        """Raise ``Interrupted`` if a signal came while it was deferred."""
        if self.signum is not None:
            raise Interrupted(self.signum, self.stop_step, when)

    # -- in training ------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        self._launcher = getattr(trainer.strategy, "launcher", None)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.stop_step is not None:
            raise Interrupted(self.signum, self.stop_step, f"at optimizer step {self.stop_step}")
        self._step_before = trainer.global_step

    def stop_now(self, trainer) -> bool:
        """Whether training stops after the optimizer step that just ended: a signal came (in
        any process: all stop at the same step). Decided once per step, from ``on_train_batch_end``
        of a batch that stepped the optimizer; True only if steps remain."""
        if self._step_before is None or trainer.global_step == self._step_before:
            return False  # not an optimizer-step boundary (accumulating), or already decided
        self._step_before = None
        asked = self.signum is not None
        if trainer.world_size > 1:
            asked = trainer.strategy.reduce_boolean_decision(asked, all=False)
        if asked and trainer.global_step < trainer.max_steps:
            self.stop_step = trainer.global_step
        return self.stop_step is not None


def take_over_signals(trainer: L.Trainer) -> None:
    """Keep Lightning from registering its SIGTERM handler for ``fit`` (module docstring)."""
    trainer._signal_connector.register_signal_handlers = lambda: None
