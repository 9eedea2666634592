"""The local backend: up to ``jobs`` cells at once, each in its own process on this machine."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from robustdrop.sweeps.worker import CellProcess, finish_cell, start_cell


def cpu_cores() -> int:
    """CPU cores this process may use (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def run_local(
    sweep_dir: Path,
    cells: Sequence[str],
    *,
    jobs: int,
    threads: int,
    on_start: Callable[..., None],
    on_done: Callable[[str, dict[str, Any]], None],
    poll_s: float = 0.2,
) -> None:
    """Run ``cells`` in order, ``jobs`` processes at a time, each with ``threads`` CPU threads.

    ``on_start(cell, pid=, host=)`` when a cell's process starts; ``on_done(cell, result)`` (see
    :func:`~robustdrop.sweeps.worker.finish_cell`) when it ends, whatever the outcome: a failed
    cell never stops the others. If this process is interrupted, the running cells are stopped
    (their last checkpoints stay; a rerun resumes them), reported through ``on_done``, and the
    interruption is raised again.
    """
    pending = list(cells)
    running: list[CellProcess] = []
    host = socket.gethostname()
    try:
        while pending or running:
            while pending and len(running) < jobs:
                started = start_cell(sweep_dir, pending.pop(0), threads)
                running.append(started)
                on_start(started.cell, pid=started.proc.pid, host=host)
            time.sleep(poll_s)
            for started in [r for r in running if r.proc.poll() is not None]:
                running.remove(started)
                on_done(started.cell, finish_cell(started))
    except BaseException:
        for started in running:
            if started.proc.poll() is None:
                started.proc.terminate()
        for started in running:
            on_done(started.cell, finish_cell(started))
        raise
