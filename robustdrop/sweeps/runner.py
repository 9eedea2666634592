"""Running a planned sweep: the sweep directory and its record, resuming, the backends, progress.

:func:`run_sweep` creates ``<runs_dir>/<name>/`` with ``sweep.json`` (or checks the existing one
against the plan: a changed grid is refused unless ``extend``, which may only add cells; changed
fixed values are always refused), then runs every cell that has not finished, in the sweep's
order and after the cells it needs (:mod:`~robustdrop.sweeps.schedule`): whether a training
cell is finished, to resume or to (re)train is the package's one rule
(:func:`robustdrop.reuse.decide`). One progress bar for the sweep and one line per finished
cell; a failed cell is recorded with its error and the others go on (except those that need it).
With ``max_minutes``, no cell starts after the deadline and the running ones get SIGTERM: they
checkpoint and are recorded as ``stopped``; the same command continues them. A SIGTERM to the
driver (``kill``, a job scheduler, ``timeout``) makes the deadline now: the cells stop, are
recorded the same way, and then :class:`~robustdrop.errors.RunInterrupted` is raised (the CLI
exits 143). A second SIGTERM stops the driver at once (local cells still get SIGTERM).
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from robustdrop._progress import progress_bar
from robustdrop._version import __version__
from robustdrop.engine.config import TrackConfig
from robustdrop.engine.interrupt import Interrupts
from robustdrop.errors import RobustdropError, RunInterrupted
from robustdrop.reuse import decide
from robustdrop.store import RunStore
from robustdrop.store.lock import RunLock
from robustdrop.store.sweep_record import SWEEP_FORMAT, SweepRecord, is_sweep_dir, now
from robustdrop.sweeps.grid import Cell, SweepPlan, json_value
from robustdrop.sweeps.local import cpu_cores, run_local
from robustdrop.sweeps.schedule import Schedule
from robustdrop.sweeps.worker import EVALUATION_FILE, cell_config, cell_status, replay_options

BACKENDS = ("local", "ray")


@dataclass
class SweepResult:
    """What :func:`run_sweep` did: the sweep directory, its record, the cells to run, those that
    failed (or could not run because a cell they need failed) and those stopped (at the deadline or
    by a signal; checkpointed, rerunning the sweep continues them)."""

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


def _cell_entry(cell: Cell) -> dict[str, Any]:
    """What the record keeps of a planned cell (its status aside)."""
    return {"values": _jsonable(cell.values),
            "config": None if cell.config is None else _jsonable(cell.config.to_dict()),
            "kind": cell.kind, "after": list(cell.after), "action": _jsonable(cell.action)}


def _add_cells(record: SweepRecord, plan: SweepPlan) -> None:
    for cell in plan.cells:
        if cell.name not in record.cells:
            record.cells[cell.name] = {**_cell_entry(cell), "status": "pending", "error": None, "wall_s": None,
                                       "attempts": 0}


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
            entry = record.cells[cell.name]
            if cell.config is None or entry.get("config") is None:
                old_kind = {"kind": entry.get("kind", "train"), "action": entry.get("action", {})}
                diff = _differing({"kind": cell.kind, "action": _jsonable(cell.action)}, old_kind)
            else:  # fields added to TrackConfig since the record was written take their defaults
                recorded = _jsonable(TrackConfig.from_dict(entry["config"]).to_dict())
                diff = _differing(_jsonable(cell.config.to_dict()), recorded)
            if diff:
                raise RobustdropError(f"cell {cell.name}'s config differs from {where} (in {', '.join(diff)}): the "
                                      "preset or robustdrop's defaults changed; use a new --name")


def open_sweep(plan: SweepPlan, runs_dir: str | os.PathLike, *, extend: bool = False,
               command: Sequence[str] | None = None, backend: str = "local", adopt: bool = False) -> SweepRecord:
    """The sweep directory's record for ``plan``: created, or checked and (``extend``) grown.
    ``adopt``: an existing folder without ``sweep.json`` becomes the sweep directory (its runs
    named like cells are theirs, by the one rule; other entries are left alone), unless an entry
    named like a cell is not a run directory."""
    path = Path(runs_dir) / plan.name
    command = list(sys.argv if command is None else command)
    if is_sweep_dir(path):
        record = SweepRecord.open(path)
        check_compatible(record, plan, extend=extend)
        if set(record.cells) != {c.name for c in plan.cells}:
            record.data["grid"] = {k: [json_value(v) for v in vs] for k, vs in plan.grid.items()}
        record.data.setdefault("reruns", []).append({"time": now(), "command": command})
    elif path.exists() and not (adopt and _adoptable(path, plan)) and (not path.is_dir() or any(path.iterdir())):
        raise RobustdropError(f"{path} exists and is not a sweep directory (no sweep.json); choose another --name "
                              "or --runs-dir")
    else:
        record = _new_record(plan, path, command, backend)
    _add_cells(record, plan)
    record.save()
    return record


def _adoptable(path: Path, plan: SweepPlan) -> bool:
    """Whether every entry of folder ``path`` named like one of ``plan``'s cells is a run directory."""
    return path.is_dir() and all((path / c.name / RunStore.CONFIG).is_file() for c in plan.cells
                                 if (path / c.name).exists())


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
        if cfg is None:  # an evaluate cell trains nothing
            continue
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


def mark_stale(record: SweepRecord, plan: SweepPlan, states: dict[str, str]) -> list[str]:
    """Finished cells that need a cell that runs again (its config changed, ...) are run again
    too: recorded as ``rerun`` (the reason) in their entry, which makes the worker retrain /
    re-evaluate instead of reusing. Updates ``states``; returns those cells."""
    after = {c.name: c.after for c in plan.cells}
    stale: list[str] = []
    for cell in after:  # marked by an earlier run that stopped before it could run them again
        if states[cell] == "finished" and record.cells[cell].get("rerun"):
            states[cell] = "start"
            stale.append(cell)
    changed = True
    while changed:  # dependencies may come later in the sweep's order: to a fixed point
        changed = False
        for cell, deps in after.items():
            again = next((d for d in deps if states.get(d) != "finished"), None)
            if states[cell] == "finished" and again is not None and states[again] == "start":
                states[cell] = "start"
                record.cells[cell]["rerun"] = f"cell {again}, which it needs, runs again"
                stale.append(cell)
                changed = True
    if stale:
        record.save()
    return stale


def cell_state(record: SweepRecord, cell: str) -> str:
    """``finished``, ``resume`` or ``start`` for a cell of ``record``: a training cell by the one
    rule (:func:`robustdrop.reuse.decide` on its run directory and resolved config), another kind
    by its recorded status and output."""
    entry = record.cells[cell]
    if entry.get("kind") == "replay":  # finished and still in the run's log (a retrained run lost it)
        return "finished" if record.status(cell) == "finished" and _replayed(record, entry) else "start"
    if entry.get("kind", "train") != "train":
        done = record.status(cell) == "finished" and (record.run_dir(cell) / EVALUATION_FILE).is_file()
        return "finished" if done else "start"
    action = decide(record.run_dir(cell), cell_config(record, cell)).action
    return {"reuse": "finished", "resume": "resume"}.get(action, "start")


def _replayed(record: SweepRecord, entry: dict[str, Any]) -> bool:
    """Whether a replay cell's run holds its finished replay (:func:`robustdrop.diagnostics.replay.is_replayed`)."""
    from robustdrop.diagnostics.replay import is_replayed

    options = replay_options(record, entry["action"])
    try:
        return is_replayed(options["run"], reference=options.get("reference"), diagnostics=options.get("diagnostics"))
    except RobustdropError:  # e.g. its referee is not trained yet
        return False


def _pct(x: float) -> str:
    return "  -  " if x is None or math.isnan(x) else f"{100 * x:5.1f}"


def cell_line(record: SweepRecord, cell: str, result: dict[str, Any]) -> str:
    """One line for a finished cell: name, best / final probe PGD accuracy, onset, wall time."""
    wall = result.get("wall_s")
    wall_text = f"{wall:.0f} s" if isinstance(wall, (int, float)) and not math.isnan(wall) else "? s"
    if result.get("stopped"):
        return f"STOPPED {cell} after {wall_text} (checkpointed; rerun the sweep to continue it)"
    if not result.get("ok"):
        return f"FAILED {cell} after {wall_text}: {result.get('error')}"
    kind = record.cells[cell].get("kind", "train")
    if kind == "replay":
        target = replay_options(record, record.cells[cell]["action"])["run"]
        return f"done   {cell} (replay, {wall_text}): rows in {target}/metrics.parquet"
    if kind != "train":
        return f"done   {cell} ({kind}, {wall_text}): {record.run_dir(cell) / EVALUATION_FILE}"
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
    max_minutes: float | None = None,
    adopt: bool = False,
) -> SweepResult:
    """Run (or continue) ``plan`` in ``<runs_dir>/<plan.name>/``; see the module docstring.

    Args:
        backend: ``local`` (this machine, ``jobs`` cells at once) or ``ray`` (a Ray cluster at ``address``).
        jobs: local cells at once (default: the CPU cores, at most the number of cells to run).
            Cells on a machine with a GPU share it (see :mod:`~robustdrop.sweeps.local`).
        cpus_per_cell: CPU threads of a cell (local default: cores // jobs, at least 1; Ray: 1);
            a cell's own ``threads`` config value wins when it is not 0. Ray tasks ask for this many CPUs.
        gpus_per_cell: GPUs a Ray task asks for (fractions share a GPU: 0.25 puts four cells on one).
        command: the command line recorded in sweep.json (default ``sys.argv``).
        max_minutes: the deadline, in minutes from now: no cell starts after it, running cells
            are stopped (SIGTERM, their checkpoint) and recorded as ``stopped``.
        adopt: make an existing folder of runs the sweep directory (see :func:`open_sweep`).

    Raises:
        RunInterrupted: SIGTERM reached this process (in the main thread) while cells ran; they
            were stopped and recorded as at the deadline first.
    """
    if backend not in BACKENDS:
        raise RobustdropError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    if address and backend != "ray":
        raise RobustdropError("--address is the Ray cluster's; add --backend ray")
    if jobs is not None and jobs < 1:
        raise RobustdropError(f"--jobs must be at least 1, got {jobs}")
    if cpus_per_cell is not None and cpus_per_cell <= 0:
        raise RobustdropError(f"--cpus-per-cell must be positive, got {cpus_per_cell}")
    if max_minutes is not None and not max_minutes > 0:
        raise RobustdropError(f"--max-minutes must be positive, got {max_minutes}")
    deadline = None if max_minutes is None else time.time() + 60 * float(max_minutes)
    path = Path(runs_dir) / plan.name
    unfinished = [c.name for c in plan.cells]
    if is_sweep_dir(path):
        existing = SweepRecord.open(path)
        check_not_running(existing)
        unfinished = [c for c in unfinished if c not in existing.cells or existing.status(c) != "finished"]
    check_cell_data(plan, unfinished)
    record = open_sweep(plan, runs_dir, extend=extend, command=command, backend=backend, adopt=adopt)
    states = {c.name: cell_state(record, c.name) for c in plan.cells}
    stale = mark_stale(record, plan, states)
    finished = [c for c, st in states.items() if st == "finished"]
    todo = [c.name for c in plan.cells if states[c.name] != "finished"]
    resumable = [c for c in todo if states[c] == "resume"]
    cores = cpu_cores()
    jobs = jobs or max(1, min(cores, len(todo)))
    fixed_threads = int(plan.fixed.get("threads") or 0)
    threads = fixed_threads or max(1, int(cpus_per_cell or (cores // jobs if backend == "local" else 1)))
    where = f"local backend, {jobs} job(s)" if backend == "local" else f"Ray at {address or 'the default address'}"
    until = "" if max_minutes is None else f", until {time.strftime('%H:%M', time.localtime(deadline))}"
    print(f"sweep {record.path}: {len(plan.cells)} cells ({len(finished)} finished, {len(resumable)} to resume, "
          f"{len(todo) - len(resumable)} to start); {where}, {threads} thread(s) per cell{until}", flush=True)
    for cell in stale:
        print(f"  {cell}: again, after {record.cells[cell]['rerun']}", flush=True)
    for cell in finished:
        if record.status(cell) != "finished":  # finished by a driver that died before it could record it
            record.set_status(cell, "finished")

    failed: list[str] = []
    stopped: list[str] = []
    bar = progress_bar(total=len(plan.cells), initial=len(finished), desc=plan.name, unit="cell", enabled=progress)
    write = bar.write if progress else print

    def on_start(cell: str, **info: Any) -> None:
        record.set_status(cell, "running", **info)

    def on_done(cell: str, result: dict[str, Any]) -> None:
        if result.get("not_started"):  # a Ray task that found the deadline passed
            record.set_status(cell, "pending")
            return
        status = cell_status(result)
        if status == "finished":
            record.cells[cell].pop("rerun", None)
        record.set_status(cell, status, error=None if status == "finished" else result.get("error"),
                          wall_s=result.get("wall_s"), returncode=result.get("returncode"),
                          **({"host": result["host"]} if result.get("host") else {}))
        (failed if status == "failed" else stopped if status == "stopped" else []).append(cell)
        write(cell_line(record, cell, result))
        if status == "finished":
            bar.update(1)

    # SIGTERM to the driver is the deadline, now (a flag the backends poll, as the engine's loop
    # does): the default action would kill this process alone and leave its cells running
    term = Interrupts(signals=(signal.SIGTERM,))
    schedule = Schedule(todo, {c.name: c.after for c in plan.cells}, finished, deadline, stop=lambda: term.requested)
    start = time.perf_counter()
    try:
        with term:
            if backend == "local":
                run_local(record.path, schedule, jobs=jobs, threads=threads, on_start=on_start, on_done=on_done)
            else:
                from robustdrop.sweeps.ray_backend import run_ray

                run_ray(record.path.resolve(), schedule, address=address,
                        cpus_per_cell=float(cpus_per_cell or threads), gpus_per_cell=float(gpus_per_cell),
                        threads=threads, on_start=on_start, on_done=on_done)
    finally:
        bar.close()
    wall = time.perf_counter() - start
    done = sum(record.status(c.name) == "finished" for c in plan.cells)
    waiting = len(plan.cells) - done - len(failed) - len(stopped)
    print(f"sweep {record.path}: {done}/{len(plan.cells)} cells finished, {len(failed)} failed, {len(stopped)} "
          f"stopped, {waiting} not started this time ({wall:.0f} s); read it with `robustdrop compare {record.path}`",
          flush=True)
    if stopped or waiting:
        print("  rerun the same command to continue (stopped cells resume from their checkpoints)", flush=True)
    for cell in failed:
        print(f"  failed: {cell}: {record.cells[cell].get('error')} (log: {record.log_path(cell)})", flush=True)
    if term.requested:
        raise RunInterrupted(term.signum, f"stopped by SIGTERM: {len(stopped)} running cell(s) checkpointed and "
                                          "recorded as stopped; rerun the same command to continue")
    return SweepResult(record.path, record, todo, failed, wall, stopped)


def dry_run_sweep(plan: SweepPlan, *, runs_dir: str | os.PathLike = "runs", jobs: int = 1) -> list[dict[str, Any]]:
    """Print the sweep's cells in the order they start (kind, what they wait for, their state in an
    existing sweep directory) with the engine's cost estimate of each training still to do
    (:func:`robustdrop.api.dry_run`: a few timed steps; cells that differ only by seed share one),
    and the total; writes nothing. A ``"@cell"`` referee is left out of the timing (it does not
    exist yet). Returns one row per cell (``cell``, ``kind``, ``after``, ``state``, ``estimate_s``)."""
    import dataclasses
    import tempfile

    from robustdrop.api import dry_run

    path = Path(runs_dir) / plan.name
    record = SweepRecord.open(path) if is_sweep_dir(path) else None
    cache: dict[str, float] = {}
    rows = []
    with tempfile.TemporaryDirectory() as scratch:  # dry_run checks a runs dir; nothing is written there
        for cell in plan.cells:
            state = cell_state(record, cell.name) if record is not None and cell.name in record.cells else "start"
            estimate = None
            if cell.config is not None and state != "finished":
                cfg = cell.config
                if any(isinstance(v, str) and v.startswith("@") for v in cfg.to_dict().values()):
                    cfg = dataclasses.replace(cfg, reference=None, diagnostics=["none"])
                key = json.dumps({**cfg.to_dict(), "seed": 0}, sort_keys=True, default=str)
                if key not in cache:
                    cache[key] = dry_run(cfg, runs_dir=scratch, name="estimate").total_s
                estimate = cache[key]
            rows.append({"cell": cell.name, "kind": cell.kind, "after": list(cell.after), "state": state,
                         "estimate_s": estimate})
            after = f" after {', '.join(cell.after)}" if cell.after else ""
            cost = "" if estimate is None else f": about {estimate / 60:.1f} min"
            print(f"  {cell.name} ({cell.kind}{after}) {state}{cost}", flush=True)
    total = sum(r["estimate_s"] or 0.0 for r in rows)
    print(f"sweep {path}: {len(rows)} cells, {sum(r['state'] != 'finished' for r in rows)} to run; trainings about "
          f"{total / 3600:.2f} h of cell time, about {total / 3600 / max(1, jobs):.2f} h with {jobs} at once "
          "(dependencies aside; evaluate and replay cells not estimated); dry run: nothing was written", flush=True)
    return rows
