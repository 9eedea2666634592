"""What every diagnostic shares: its options schema, logging under its name, timing, and
publishing values to the other hooks through ``run.metrics``."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from robustdrop.attacks import AttackSpec
from robustdrop.engine import Hook

if TYPE_CHECKING:
    from robustdrop.engine import RunContext


def option(default: Any, help: str, *, minimum: int | None = None) -> Any:
    """One option of a diagnostic (a field of its :class:`Options`): the default, whose type
    (``int``, ``float``, ``bool``) also parses ``--diagnostics name:key=value``; a help line;
    the smallest value allowed, if any."""
    return field(default=default, metadata={"help": help, "minimum": minimum})


@dataclass(frozen=True)
class Options:
    """Base of a diagnostic's options: a frozen dataclass of :func:`option` fields, the one place
    their names, defaults and help are declared (``--diagnostics`` parsing, the constructors and
    the error messages all read it). Values are converted to the type of their default."""

    def __post_init__(self) -> None:
        for f in fields(self):
            object.__setattr__(self, f.name, type(f.default)(getattr(self, f.name)))

    def changed(self) -> dict[str, Any]:
        """The options that differ from their defaults, in declaration order."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != f.default}


class Diagnostic(Hook):
    """A :class:`~robustdrop.engine.Hook` that logs with ``source`` = its name.

    A subclass declares ``name``, its ``Options`` (see :class:`Options`), whether ``--diagnostics
    default`` includes it (``in_default``) and whether it needs ``--reference``
    (``needs_reference``); it passes its resolved options to ``__init__``. It calls :meth:`timer`
    around its work (it logs ``time_s``) and shares values with the hooks after it (e.g. the
    collapse detector) with :meth:`publish`.
    """

    name = "diagnostic"
    Options: ClassVar[type[Options]] = Options
    in_default: ClassVar[bool] = True
    in_all: ClassVar[bool] = True  # False: only by name (e.g. it needs the training data, which a Monitor lacks)
    needs_reference: ClassVar[bool] = False
    # Whether its rows can be measured after training from saved weights (diagnostics.replay);
    # False for one that reads the epoch's evaluation or other diagnostics from the channel.
    replayable: ClassVar[bool] = True

    def __init__(self, options: Options, **cadence: Any):
        super().__init__(**cadence)
        self.options = options

    def key_options(self) -> dict[str, Any]:
        return self.options.changed()

    @classmethod
    def from_config(cls, config: Any, **options: Any) -> Diagnostic:
        """The diagnostic for a run of ``config`` (a ``TrackConfig``) with ``options``."""
        return cls(**options)

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
