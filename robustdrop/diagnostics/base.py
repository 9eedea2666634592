"""What every diagnostic shares: logging under its name, timing, and the signals it offers the
collapse detector."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from robustdrop.attacks import AttackSpec
from robustdrop.engine import Hook

if TYPE_CHECKING:
    from robustdrop.engine import RunContext


class Diagnostic(Hook):
    """A :class:`~robustdrop.engine.Hook` that logs with ``source`` = its name.

    Subclasses call :meth:`timer` around their work (it logs ``time_s``) and may publish values
    for the collapse detector with :meth:`publish` (read back with :meth:`signals`).
    """

    name = "diagnostic"

    def __init__(self, **cadence: Any):
        super().__init__(**cadence)
        self._signals: dict[str, float] = {}
        self._signals_epoch = -1

    # -- logging --------------------------------------------------------------------------------
    def log(self, run: RunContext, metric: str, value: float, *, split: str = "probe",
            spec: AttackSpec | None = None, n: int = 0) -> None:
        run.log(self.name, split, metric, float(value), spec=spec, n=n)

    @contextmanager
    def timer(self, run: RunContext, split: str = "probe") -> Iterator[None]:
        """Time the block and log it as ``time_s`` (wall seconds, device synchronised)."""
        start = time.perf_counter()
        yield
        if run.device.type == "cuda":
            torch.cuda.synchronize(run.device)
        self.log(run, "time_s", time.perf_counter() - start, split=split)

    # -- signals for the collapse detector ------------------------------------------------------
    def publish(self, epoch: int, **values: float) -> None:
        if epoch != self._signals_epoch:
            self._signals, self._signals_epoch = {}, epoch
        self._signals.update({k: float(v) for k, v in values.items()})

    def signals(self, epoch: int) -> dict[str, float]:
        """Values this diagnostic measured at ``epoch`` (empty if it did not run then)."""
        return dict(self._signals) if epoch == self._signals_epoch else {}
