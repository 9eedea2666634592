"""The local backend: up to ``jobs`` cells at once, each in its own process on this machine.

Cells share the machine's GPUs as they find them: a cell's process inherits this one's
environment, ``CUDA_VISIBLE_DEVICES`` included, so ``--jobs 4`` on a one-GPU machine runs four
cells on that GPU (``--device auto`` -> ``cuda``); give each job its own GPU by running one sweep
per GPU with ``CUDA_VISIBLE_DEVICES=i``, or use the Ray backend's ``--gpus-per-cell``.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from robustdrop.sweeps.schedule import Schedule
from robustdrop.sweeps.worker import CellProcess, cell_status, finish_cell, start_cell


def cpu_cores() -> int:
    """CPU cores this process may use (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def run_local(
    sweep_dir: Path,
    schedule: Schedule,
    *,
    jobs: int,
    threads: int,
    on_start: Callable[..., None],
    on_done: Callable[[str, dict[str, Any]], None],
    poll_s: float = 0.2,
) -> None:
    """Run the ``schedule``'s cells (its order, dependencies, deadline), ``jobs`` processes at a
    time, each with ``threads`` CPU threads.

    ``on_start(cell, pid=, host=)`` when a cell's process starts; ``on_done(cell, result)`` (see
    :func:`~robustdrop.sweeps.worker.finish_cell`) when it ends, whatever the outcome: a failed
    cell never stops the others (only the cells that need it). At the deadline (also the one a
    SIGTERM to the driver sets: ``schedule.stop``) the running cells get SIGTERM (the engine
    checkpoints and exits 143: ``stopped``). If this process is interrupted (an exception such as
    KeyboardInterrupt), the running cells are stopped the same way, reported through ``on_done``,
    and the interruption is raised again.
    """
    running: list[CellProcess] = []
    host = socket.gethostname()
    try:
        while True:
            for cell, dep in schedule.blocked():
                on_done(cell, {"ok": False, "error": f"not run: it needs cell {dep}, which did not finish",
                               "wall_s": 0.0})
            while len(running) < jobs and (cell := schedule.next_ready()) is not None:
                started = start_cell(sweep_dir, cell, threads)
                running.append(started)
                on_start(cell, pid=started.proc.pid, host=host)
            if not running and (schedule.stuck() or not schedule.pending):
                break
            time.sleep(poll_s)
            if schedule.past_deadline():
                for started in running:
                    started.stop()
            for started in [r for r in running if r.proc.poll() is not None]:
                running.remove(started)
                result = finish_cell(started)
                schedule.done(started.cell, cell_status(result))
                on_done(started.cell, result)
    except BaseException:
        for started in running:
            started.stop()
        for started in running:
            on_done(started.cell, finish_cell(started))
        raise
