"""Running a planned sweep: the sweep directory and its record, resuming, the backends, progress.

:func:`run_sweep` creates ``<runs_dir>/<name>/`` with ``sweep.json`` (or checks the existing one
against the plan: a changed grid is refused unless ``extend``, which may only add cells; changed
fixed values are always refused), then runs every cell that has not finished: a killed cell
resumes from its checkpoint, a never-started one starts. One progress bar for the sweep and one
line per finished cell; a failed cell is recorded with its error and the others go on.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from robustdrop._progress import progress_bar
from robustdrop._version import __version__
from robustdrop.engine.config import TrackConfig
from robustdrop.errors import RobustdropError
from robustdrop.store.lock import RunLock
from robustdrop.store.sweep_record import SWEEP_FORMAT, SweepRecord, is_sweep_dir, now
from robustdrop.sweeps.grid import SweepPlan, json_value
from robustdrop.sweeps.local import cpu_cores, run_local

BACKENDS = ("local", "ray")


@dataclass
class SweepResult:
    """What :func:`run_sweep` did: the sweep directory, its record, the cells run, those that failed
    and those stopped by a signal (checkpointed; rerunning the sweep continues them)."""

    path: Path
    record: SweepRecord
    ran: list[str]
    failed: list[str]
    wall_s: float
    stopped: list[str] = field(default_factory=list)


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def _differing(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def _new_record(plan: SweepPlan, path: Path, command: Sequence[str], backend: str) -> SweepRecord:
    return SweepRecord(path, {
        "format": SWEEP_FORMAT,
        "name": plan.name,
        "robustdrop": __version__,
        "command": list(command),
        "created": now(),
        "backend": backend,
        "preset": plan.preset,
        "grid": {k: [json_value(v) for v in vs] for k, vs in plan.grid.items()},
        "fixed": {k: json_value(v) for k, v in plan.fixed.items()},
        "cells": {},
    })


def _add_cells(record: SweepRecord, plan: SweepPlan) -> None:
    for cell in plan.cells:
        if cell.name not in record.cells:
            record.cells[cell.name] = {"values": _jsonable(cell.values), "config": _jsonable(cell.config.to_dict()),
                                       "status": "pending", "error": None, "wall_s": None, "attempts": 0}


def check_compatible(record: SweepRecord, plan: SweepPlan, *, extend: bool) -> None:
    """Refuse a plan that does not continue ``record`` (one-line :class:`RobustdropError`)."""
    where = record.path / "sweep.json"
    if record.data.get("preset") != plan.preset:
        raise RobustdropError(f"{where} was made with preset {record.data.get('preset')!r}, not {plan.preset!r}; "
                              "use the same preset or a new --name")
    fixed = _jsonable({k: json_value(v) for k, v in plan.fixed.items()})
    if fixed != record.fixed:
        raise RobustdropError(f"the fixed values differ from {where} (in {', '.join(_differing(fixed, record.fixed))}); "
                              "changing them is refused, also with --extend: use a new --name")
    if sorted(plan.grid) != sorted(record.grid):
        raise RobustdropError(f"the grid's keys ({', '.join(sorted(plan.grid))}) differ from {where}'s "
                              f"({', '.join(sorted(record.grid))}); a sweep with other keys needs a new --name")
    old, new = set(record.cells), {c.name for c in plan.cells}
    if old != new:
        dropped, added = sorted(old - new), sorted(new - old)
        if not extend:
            raise RobustdropError(f"the grid differs from {where} ({len(added)} new cells, {len(dropped)} missing); "
                                  "rerun with --extend to add cells, or use a new --name")
        if dropped:
            raise RobustdropError(f"--extend only adds cells, but this grid drops {len(dropped)} (e.g. {dropped[0]}); "
                                  "keep every value of the recorded grid")
    for cell in plan.cells:
        if cell.name in record.cells:
            # Fields added to TrackConfig since the record was written take their defaults.
            recorded = _jsonable(TrackConfig.from_dict(record.cells[cell.name]["config"]).to_dict())
            diff = _differing(_jsonable(cell.config.to_dict()), recorded)
            if diff:
                raise RobustdropError(f"cell {cell.name}'s config differs from {where} (in {', '.join(diff)}): the "
                                      "preset or robustdrop's defaults changed; use a new --name")


def open_sweep(plan: SweepPlan, runs_dir: str | os.PathLike, *, extend: bool = False,
               command: Sequence[str] | None = None, backend: str = "local") -> SweepRecord:
    """The sweep directory's record for ``plan``: created, or checked and (``extend``) grown."""
    path = Path(runs_dir) / plan.name
    command = list(sys.argv if command is None else command)
    if is_sweep_dir(path):
        record = SweepRecord.open(path)
        check_compatible(record, plan, extend=extend)
        if set(record.cells) != {c.name for c in plan.cells}:
            record.data["grid"] = {k: [json_value(v) for v in vs] for k, vs in plan.grid.items()}
        record.data.setdefault("reruns", []).append({"time": now(), "command": command})
    elif path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise RobustdropError(f"{path} exists and is not a sweep directory (no sweep.json); choose another --name "
                              "or --runs-dir")
    else:
        record = _new_record(plan, path, command, backend)
    _add_cells(record, plan)
    record.save()
    return record


def check_not_running(record: SweepRecord) -> None:
    """Refuse to drive a sweep whose cells are still running under another driver (or a killed
    driver's surviving cell): a cell's process holds its run directory's :class:`RunLock` while it
    writes, which this probes (on any host that shares the file system)."""
    for cell in record.cells:
        run_dir = record.run_dir(cell)
        if not run_dir.is_dir():
            continue
        try:
            RunLock(run_dir).acquire().release()
        except RobustdropError as exc:
            raise RobustdropError(f"cell {cell} is running: another `robustdrop sweep` drives {record.path} ({exc})"
                                  ) from None


def check_cell_data(plan: SweepPlan, cells: Sequence[str]) -> None:
    """Refuse sizes the data cannot give (``TrackConfig.check_data``: validation / probe / subset
    / batch larger than the dataset allows) for ``cells``, before the sweep writes anything,
    instead of one failed cell each. Each dataset the cells use is loaded once (from the dataset
    cache the cells then read); one that cannot be loaded here is left to its cells, whose
    failure is recorded as before."""
    from robustdrop.data import load_dataset

    sizes: dict[tuple[str, str | None], tuple[int, int, str] | None] = {}
    for name in cells:
        cfg = plan.cell(name).config
        key = (cfg.dataset, cfg.data_dir)
        if key not in sizes:
            try:
                data = load_dataset(cfg.dataset, data_dir=cfg.data_dir)
                sizes[key] = (len(data.train_y), len(data.test_y), data.name)
            except (RobustdropError, OSError):
                sizes[key] = None
        if sizes[key] is not None:
            try:
                cfg.check_data(*sizes[key])
            except RobustdropError as exc:
                raise RobustdropError(f"cell {name}: {exc}") from None


def _has_checkpoint(record: SweepRecord, cell: str) -> bool:
    return (record.run_dir(cell) / "checkpoints" / "last.pt").is_file()


def _pct(x: float) -> str:
    return "  -  " if x is None or math.isnan(x) else f"{100 * x:5.1f}"


def cell_line(record: SweepRecord, cell: str, result: dict[str, Any]) -> str:
    """One line for a finished cell: name, best / final probe PGD accuracy, onset, wall time."""
    wall = result.get("wall_s")
    wall_text = f"{wall:.0f} s" if isinstance(wall, (int, float)) and not math.isnan(wall) else "? s"
    if result.get("stopped"):
        return f"STOPPED {cell} after {wall_text}: {result.get('error')}"
    if not result.get("ok"):
        return f"FAILED {cell} after {wall_text}: {result.get('error')}"
    from robustdrop.plots.sweeps import run_summary

    try:
        s = run_summary(record.run_dir(cell))
    except RobustdropError as exc:
        return f"done   {cell} ({wall_text}); cannot read it: {exc}"
    onset = "none" if s["onset_epoch"] is None else str(s["onset_epoch"])
    if not s["detector"]:
        onset = "n/a"
    return (f"done   {cell}: probe PGD best {_pct(s['best_pgd'])}% (ep {s['best_epoch']}) final {_pct(s['final_pgd'])}%"
            f" | onset {onset} | {wall_text}")


def run_sweep(
    plan: SweepPlan,
    *,
    runs_dir: str | os.PathLike = "runs",
    backend: str = "local",
    jobs: int | None = None,
    address: str | None = None,
    cpus_per_cell: float | None = None,
    gpus_per_cell: float = 0.0,
    extend: bool = False,
    progress: bool = True,
    command: Sequence[str] | None = None,
) -> SweepResult:
    """Run (or continue) ``plan`` in ``<runs_dir>/<plan.name>/``; see the module docstring.

    Args:
        backend: ``local`` (this machine, ``jobs`` cells at once) or ``ray`` (a Ray cluster at ``address``).
        jobs: local cells at once (default: the CPU cores, at most the number of cells to run).
        cpus_per_cell: CPU threads of a cell (local default: cores // jobs, at least 1; Ray: 1);
            a cell's own ``threads`` config value wins when it is not 0. Ray tasks ask for this many CPUs.
        gpus_per_cell: GPUs a Ray task asks for (fractions share a GPU).
        command: the command line recorded in sweep.json (default ``sys.argv``).
    """
    if backend not in BACKENDS:
        raise RobustdropError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    if address and backend != "ray":
        raise RobustdropError("--address is the Ray cluster's; add --backend ray")
    if jobs is not None and jobs < 1:
        raise RobustdropError(f"--jobs must be at least 1, got {jobs}")
    if cpus_per_cell is not None and cpus_per_cell <= 0:
        raise RobustdropError(f"--cpus-per-cell must be positive, got {cpus_per_cell}")
    path = Path(runs_dir) / plan.name
    unfinished = [c.name for c in plan.cells]
    if is_sweep_dir(path):
        existing = SweepRecord.open(path)
        check_not_running(existing)
        unfinished = [c for c in unfinished if c not in existing.cells or existing.status(c) != "finished"]
    check_cell_data(plan, unfinished)
    record = open_sweep(plan, runs_dir, extend=extend, command=command, backend=backend)
    finished = [c.name for c in plan.cells if record.status(c.name) == "finished" and _has_checkpoint(record, c.name)]
    todo = [c.name for c in plan.cells if c.name not in finished]
    resumable = [c for c in todo if _has_checkpoint(record, c)]
    cores = cpu_cores()
    jobs = jobs or max(1, min(cores, len(todo)))
    fixed_threads = int(plan.fixed.get("threads") or 0)
    threads = fixed_threads or max(1, int(cpus_per_cell or (cores // jobs if backend == "local" else 1)))
    where = f"local backend, {jobs} job(s)" if backend == "local" else f"Ray at {address or 'the default address'}"
    print(f"sweep {record.path}: {len(plan.cells)} cells ({len(finished)} finished, {len(resumable)} to resume, "
          f"{len(todo) - len(resumable)} to start); {where}, {threads} thread(s) per cell", flush=True)

    failed: list[str] = []
    stopped: list[str] = []
    bar = progress_bar(total=len(plan.cells), initial=len(finished), desc=plan.name, unit="cell", enabled=progress)
    write = bar.write if progress else print

    def on_start(cell: str, **info: Any) -> None:
        record.set_status(cell, "running", **info)

    def on_done(cell: str, result: dict[str, Any]) -> None:
        ok = bool(result.get("ok"))
        status = "finished" if ok else "stopped" if result.get("stopped") else "failed"
        record.set_status(cell, status, error=None if ok else result.get("error"), wall_s=result.get("wall_s"),
                          returncode=result.get("returncode"),
                          **({"host": result["host"]} if result.get("host") else {}))
        {"failed": failed, "stopped": stopped}.get(status, []).append(cell)
        write(cell_line(record, cell, result))
        bar.update(1)

    start = time.perf_counter()
    try:
        if backend == "local":
            run_local(record.path, todo, jobs=jobs, threads=threads, on_start=on_start, on_done=on_done)
        else:
            from robustdrop.sweeps.ray_backend import run_ray

            run_ray(record.path.resolve(), todo, address=address, cpus_per_cell=float(cpus_per_cell or threads),
                    gpus_per_cell=float(gpus_per_cell), threads=threads, on_start=on_start, on_done=on_done)
    finally:
        bar.close()
    wall = time.perf_counter() - start
    done = sum(record.status(c.name) == "finished" for c in plan.cells)
    halted = f", {len(stopped)} stopped (rerun the same command to continue them)" if stopped else ""
    print(f"sweep {record.path}: {done}/{len(plan.cells)} cells finished, {len(failed)} failed this time{halted} "
          f"({wall:.0f} s); read it with `robustdrop compare {record.path}`", flush=True)
    for cell in failed:
        print(f"  failed: {cell}: {record.cells[cell].get('error')} (log: {record.log_path(cell)})", flush=True)
    return SweepResult(record.path, record, todo, failed, wall, stopped)
