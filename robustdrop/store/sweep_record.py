"""The sweep directory's record, ``sweep.json``: what the sweep is and where each cell stands.

A sweep directory (``robustdrop sweep``) holds ``sweep.json``, one ordinary run directory per
cell (named by the cell) and ``logs/<cell>.log`` (each cell's output). ``sweep.json``::

    {"format": "robustdrop-sweep-1", "name": ..., "robustdrop": version, "command": [argv...],
     "created": ISO time, "backend": "local" | "ray",
     "preset": "quick" | null, "grid": {key: [values...]}, "fixed": {key: value},
     "cells": {cell name: {"values": {key: value}, "config": {resolved TrackConfig} | null,
                           "kind": "train" | "evaluate", "after": [cell names], "action": {options},
                           "status": "pending" | "running" | "finished" | "failed" | "stopped",
                           "error": one line | null, "wall_s": seconds of the last attempt,
                           "attempts": n, "host": ..., "pid": ..., "returncode": the cell process's
                           exit status (143: stopped by SIGTERM), "updated": ISO time}}}

Only the process that runs the sweep (the driver) writes it, atomically; cells never do. The
truth about a cell's training is its run directory (``checkpoints/last.pt``); the record says
what the driver last saw, so a cell left ``running`` by a killed driver is resumed on the next run.
``stopped``: stopped at the sweep's deadline (or by SIGINT / SIGTERM) after its checkpoint; the
next run of the sweep continues it. ``config`` is null for a cell that does not train
(``kind = "evaluate"``; its options in ``action``).
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from robustdrop._files import atomic_write_text
from robustdrop.errors import RobustdropError

SWEEP_FILE = "sweep.json"
SWEEP_FORMAT = "robustdrop-sweep-1"
# stopped: ended by SIGTERM / SIGINT after its checkpoint (resumable), not a failure
STATUSES = ("pending", "running", "finished", "failed", "stopped")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def is_sweep_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a sweep directory (holds ``sweep.json``)."""
    return (Path(path) / SWEEP_FILE).is_file()


class SweepRecord:
    """``sweep.json`` of one sweep directory, held in memory and rewritten whole on :meth:`save`.

    Attributes:
        path: the sweep directory.
        data: the JSON document (see the module docstring).
    """

    def __init__(self, path: str | os.PathLike, data: dict[str, Any]):
        self.path = Path(path)
        self.data = data

    @classmethod
    def open(cls, path: str | os.PathLike) -> SweepRecord:
        path = Path(path)
        target = path / SWEEP_FILE
        if not target.is_file():
            raise RobustdropError(f"{path} is not a sweep directory (no {SWEEP_FILE}); give the folder that "
                                  "`robustdrop sweep` created")
        try:
            data = json.loads(target.read_text())
        except json.JSONDecodeError as exc:
            raise RobustdropError(f"{target} is not valid JSON ({exc}); restore it or start a new sweep") from None
        if not isinstance(data, dict) or data.get("format") != SWEEP_FORMAT:
            raise RobustdropError(f"{target} is not a {SWEEP_FORMAT} record; it was written by another tool or version")
        return cls(path, data)

    def save(self) -> Path:
        target = self.path / SWEEP_FILE
        atomic_write_text(target, json.dumps(self.data, indent=2, sort_keys=False, default=str) + "\n")
        return target

    # -- reading --------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return str(self.data.get("name") or self.path.name)

    @property
    def grid(self) -> dict[str, list[Any]]:
        return dict(self.data.get("grid", {}))

    @property
    def fixed(self) -> dict[str, Any]:
        return dict(self.data.get("fixed", {}))

    @property
    def cells(self) -> dict[str, dict[str, Any]]:
        return self.data.setdefault("cells", {})

    def run_dir(self, cell: str) -> Path:
        """The run directory of ``cell``."""
        return self.path / cell

    def log_path(self, cell: str) -> Path:
        """Where ``cell``'s output goes: ``logs/<cell>.log``."""
        return self.path / "logs" / f"{cell}.log"

    def status(self, cell: str) -> str:
        return str(self.cells[cell].get("status", "pending"))

    # -- writing (the driver only) ------------------------------------------------------------
    def set_status(self, cell: str, status: str, **info: Any) -> None:
        """Set a cell's status (and ``error``, ``wall_s``, ``host``, ``pid`` ... as given), then save."""
        if status not in STATUSES:
            raise ValueError(f"unknown cell status {status!r}")
        entry = self.cells[cell]
        entry["status"] = status
        if status == "running":
            entry["attempts"] = int(entry.get("attempts", 0)) + 1
            entry["error"] = None
        entry.update(info)
        entry["updated"] = now()
        self.save()
