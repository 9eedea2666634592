"""SIGINT / SIGTERM during training: finish the step, checkpoint, exit resumably.

:class:`Interrupts` turns the two signals into a flag that the training loop polls between steps
(a step is never cut in half). While evaluation and diagnostics run (:meth:`Interrupts.abortable`)
the handler also raises :class:`Abort` at once, so a long evaluation does not delay the exit: the
trainer then restores the state it had when the epoch's steps ended and checkpoints that. A second
signal while the first is being handled stops at once with :class:`KeyboardInterrupt` (the last
checkpoint on disk stays intact: every write is atomic).

Handlers can only be installed in the main thread; elsewhere (a thread of a sweep runner) the
process's own handling applies. A sweep's driver uses the same flag for SIGTERM alone
(:func:`robustdrop.sweeps.runner.run_sweep`: its cells stop as at the deadline).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType, TracebackType
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Abort(BaseException):
    """Raised by the handler inside :meth:`Interrupts.abortable` (a BaseException so that no
    ``except Exception`` in evaluation or diagnostics code swallows it)."""


class Interrupts:
    """Context manager that records SIGINT / SIGTERM (or ``signals``) for the training loop.

    Examples:
        >>> with Interrupts() as stop:
        ...     for step in steps:
        ...         if stop.signum is not None:
        ...             break  # checkpoint, then raise RunInterrupted
    """

    def __init__(self, signals: tuple[int, ...] = SIGNALS) -> None:
        self.signals = signals
        self.signum: int | None = None
        self._abortable = False
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> Interrupts:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @contextlib.contextmanager
    def abortable(self) -> Iterator[None]:
        """A block that a signal interrupts at once with :class:`Abort` (evaluation, diagnostics)."""
        if self.requested:
            raise Abort
        self._abortable = True
        try:
            yield
        finally:
            self._abortable = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:  # a second signal: stop now, without a new checkpoint
            raise KeyboardInterrupt
        self.signum = signum
        if self._abortable:
            self._abortable = False
            raise Abort
