"""What every diagnostic shares: logging under its name, timing, and publishing values to the
other hooks through ``run.metrics``."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

from robustdrop.attacks import AttackSpec
from robustdrop.engine import Hook

if TYPE_CHECKING:
    from robustdrop.engine import RunContext


class Diagnostic(Hook):
    """A :class:`~robustdrop.engine.Hook` that logs with ``source`` = its name.

    Subclasses call :meth:`timer` around their work (it logs ``time_s``) and share values with
    the hooks after them (e.g. the collapse detector) with :meth:`publish`.
    """

    name = "diagnostic"

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

    # -- sharing ----------------------------------------------------------------------------------
    def publish(self, run: RunContext, **values: float) -> None:
        """Put this epoch's ``values`` in the channel as ``run.metrics["<name>/<key>"]``."""
        run.metrics.update({f"{self.name}/{k}": float(v) for k, v in values.items()})
