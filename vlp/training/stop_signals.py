"""Preemption notices (SIGTERM, SIGUSR1) and Ctrl-C (SIGINT) turned into a flag the training
loop polls.

A scheduler that preempts a job sends a signal and waits a grace period before killing it. The
loop must not die mid-step or mid-save: the handler only records the request, and the loop
finishes its step, writes a checkpoint and stops (:meth:`vlp.training.Trainer.fit`). Ctrl-C
does the same, so that nothing trained since the last checkpoint is lost; a second Ctrl-C
stops at once (Python's own ``KeyboardInterrupt``).
"""

from __future__ import annotations

import os
import signal
from types import FrameType
from typing import Any

STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGUSR1") if hasattr(signal, name)
)
"""Preemption notices: the loop finishes its step, writes a checkpoint and stops."""

INTERRUPT_MESSAGE = (
    b"\nvlp: Ctrl-C: finishing this step and writing a checkpoint "
    b"(Ctrl-C again stops at once, without one)\n"
)


class StopFlag:
    """Set by SIGTERM or SIGUSR1 (preemption) or Ctrl-C, so the loop can write a checkpoint
    and leave.

    A context manager: entering installs the handlers (on the main thread only, the one place
    Python delivers signals), leaving puts the previous ones back.
    """

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        for signum in (*STOP_SIGNALS, signal.SIGINT):
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: no signal handling
                break
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        if signum == signal.SIGINT:  # the next Ctrl-C is Python's KeyboardInterrupt again
            signal.signal(signal.SIGINT, signal.default_int_handler)
            os.write(2, INTERRUPT_MESSAGE)  # no logging in a signal handler (its locks)

    def __exit__(self, *exc: object) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
