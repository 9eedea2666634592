"""Sweeps: many ``track`` runs as one experiment, on this machine or on a Ray cluster.

Above the engine in the data flow: a sweep plans cells (:mod:`~robustdrop.sweeps.grid`), keeps its
record in the sweep directory (:class:`robustdrop.store.SweepRecord`), and runs each cell through
:func:`robustdrop.api.track` / :func:`robustdrop.api.resume` in its own process
(:mod:`~robustdrop.sweeps.worker`), with a local (:mod:`~robustdrop.sweeps.local`) or a Ray
(:mod:`~robustdrop.sweeps.ray_backend`) backend. Reading a sweep is :mod:`robustdrop.plots.sweeps`.

>>> import robustdrop
>>> table = robustdrop.sweep({"seed": "0:3", "epsilon": ["8/255", "12/255"]}, preset="quick",
...                          name="eps-study", epochs=10)          # doctest: +SKIP
>>> table = robustdrop.load_sweep("runs/eps-study")                   # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from robustdrop.sweeps.grid import (
    Cell,
    SweepPlan,
    cell_name,
    default_sweep_name,
    parse_grid,
    parse_values,
    plan_sweep,
    read_toml,
    toml_text,
)
from robustdrop.sweeps.runner import BACKENDS, SweepResult, run_sweep

__all__ = [
    "BACKENDS", "Cell", "SweepPlan", "SweepResult", "cell_name", "default_sweep_name", "parse_grid", "parse_values",
    "plan_sweep", "read_toml", "run_sweep", "sweep", "toml_text",
]


def sweep(
    grid: Mapping[str, Any] | Iterable[str],
    *,
    preset: str | None = None,
    name: str | None = None,
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
    cells: Mapping[str, Mapping[str, Any]] | None = None,
    **fixed: Any,
):
    """Run a sweep (or continue it) and return its tidy metrics table.

    Args:
        grid: ``{key: values}`` (a list, or a string as on the command line: ``"0:5"``,
            ``"8/255,10/255"``) or grid words (``["seed=0:5", "epsilon=8/255,12/255"]``).
        preset, **fixed: the config every cell starts from (like ``robustdrop track --preset P --flag v``).
        name: the sweep directory's name under ``runs_dir`` (default: ``<preset>-<grid keys>``).
        cells: named cells ``{name: {key: value, "after": [...], "kind": ...}}`` (see
            :mod:`~robustdrop.sweeps.grid`), run before the grid's; ``grid`` may then be empty.
        backend, jobs, address, cpus_per_cell, gpus_per_cell, extend, max_minutes: see :func:`run_sweep`.

    Returns:
        The tidy table (:func:`robustdrop.plots.sweeps.sweep_metrics`): every cell's metrics rows
        with ``cell`` and the varied values as ``cfg_<key>`` columns. Cells that failed are listed
        in ``table.attrs["failed"]``, cells stopped (by a signal or at the ``max_minutes`` deadline) in
        ``table.attrs["stopped"]`` (and both in ``sweep.json``).
    """
    from robustdrop.plots.sweeps import sweep_metrics

    if isinstance(grid, Mapping):
        parsed = {k: parse_values(k, v) for k, v in grid.items()}
    else:
        parsed = parse_grid([grid] if isinstance(grid, str) else list(grid))
    plan = plan_sweep(parsed, preset=preset, fixed=fixed, name=name, cells=cells)
    result = run_sweep(plan, runs_dir=runs_dir, backend=backend, jobs=jobs, address=address,
                       cpus_per_cell=cpus_per_cell, gpus_per_cell=gpus_per_cell, extend=extend, progress=progress,
                       command=command, max_minutes=max_minutes)
    table = sweep_metrics(result.path)
    table.attrs["failed"] = list(result.failed)
    table.attrs["stopped"] = list(result.stopped)
    return table
