"""The run directory: the one place a run's results are written to and read from.

Every write is atomic (:mod:`robustdrop._files`: a temporary file in the same folder, then
``os.replace``), so a killed process never leaves a torn file behind. Metrics are kept as a tidy
table (one row per epoch/step/split/metric/attack spec) and written as Parquet plus an identical CSV.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import warnings
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from robustdrop._files import atomic_write_bytes, atomic_write_text, make_folders, write_error
from robustdrop.errors import FileWriteError, RobustdropError, first_line
from robustdrop.store.lock import LOCK_NAME

METRIC_COLUMNS = [
    "epoch", "step", "split", "metric", "value", "attack",
    "epsilon", "steps", "step_size", "restarts", "n", "source",
]
_INT_COLUMNS = ["epoch", "step", "steps", "restarts", "n"]
_FLOAT_COLUMNS = ["value", "epsilon", "step_size"]


def metric_row(
    epoch: int,
    step: int,
    split: str,
    metric: str,
    value: float,
    *,
    attack: str = "none",
    epsilon: float = math.nan,
    steps: int = 0,
    step_size: float = math.nan,
    restarts: int = 0,
    n: int = 0,
    source: str = "train",
) -> dict[str, Any]:
    """One row of the tidy metrics table (see docs/architecture.md for the schema)."""
    return {
        "epoch": int(epoch), "step": int(step), "split": split, "metric": metric,
        "value": float(value), "attack": attack, "epsilon": float(epsilon), "steps": int(steps),
        "step_size": float(step_size), "restarts": int(restarts), "n": int(n), "source": source,
    }


def _check_columns(frame: pd.DataFrame) -> None:
    missing = [c for c in METRIC_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"columns {missing} missing")


def _to_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=METRIC_COLUMNS)
    for col in _INT_COLUMNS:
        frame[col] = frame[col].astype("int64")
    for col in _FLOAT_COLUMNS:
        frame[col] = frame[col].astype("float64")
    return frame


class RunStore:
    """A run directory ``<runs_dir>/<name>/``.

    Create one with :meth:`create` (refuses an existing run unless ``overwrite``) or open an
    existing one with :meth:`open`. Metrics and events are held in memory and rewritten whole
    (atomically) on :meth:`flush`; they are small (thousands of rows).
    """

    CONFIG = "config.json"
    MANIFEST = "manifest.json"
    METRICS_PARQUET = "metrics.parquet"
    METRICS_CSV = "metrics.csv"
    EVENTS = "events.jsonl"

    def __init__(self, path: Path):
        self.path = Path(path)
        self._rows: list[dict[str, Any]] = []
        self._events: list[dict[str, Any]] = []
        self._dirty = False
        self._sinks: list[Callable[[list[dict[str, Any]]], None]] = []

    # -- creation ---------------------------------------------------------------------------
    @classmethod
    def create(cls, runs_dir: str | os.PathLike, name: str, *, overwrite: bool = False) -> RunStore:
        """Make the run directory ``runs_dir/name`` now (refusing an existing run unless
        ``overwrite``). ``robustdrop track`` instead checks with :meth:`check_new` before loading
        anything and makes the folder (:meth:`make_directory`) only once the run can start."""
        store = cls(Path(runs_dir) / name)
        store.check_new(overwrite=overwrite)
        store.make_directory()
        if overwrite:
            store.clear()
        return store

    def check_new(self, *, overwrite: bool = False) -> None:
        """Raise :class:`RobustdropError` if a run already lives here (unless ``overwrite``);
        an empty folder (or one holding only a lock file) does not count."""
        path = self.path
        if path.exists() and not path.is_dir():
            raise RobustdropError(f"{path} exists and is not a folder; choose another --name or --runs-dir")
        if not overwrite and path.is_dir() and any(p.name != LOCK_NAME for p in path.iterdir()):
            raise RobustdropError(
                f"run directory {path} already exists; pass --resume {path} to continue it, "
                "--overwrite to replace it, or --name to choose another name"
            )

    def make_directory(self) -> list[Path]:
        """Create the run directory (and missing parents); returns the folders created, outermost
        first (:func:`~robustdrop._files.make_folders`)."""
        return make_folders(self.path)

    def clear(self) -> None:
        """Delete everything in the run directory but its lock file (``--overwrite``, under the lock)."""
        for entry in self.path.iterdir():
            if entry.name == LOCK_NAME:
                continue
            try:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
            except OSError as exc:
                raise FileWriteError(write_error(entry, exc, what="delete")) from exc
        self._rows, self._events, self._dirty = [], [], False

    @classmethod
    def open(cls, path: str | os.PathLike) -> RunStore:
        """Open an existing run directory and load its metrics and events.

        A damaged ``metrics.parquet`` / ``metrics.csv`` / ``events.jsonl`` is a one-line
        :class:`RobustdropError` naming the file and what to do; nothing is changed."""
        path = cls.check_run_dir(path)
        store = cls(path)
        store._rows = store._read_metrics()
        store._events = store._read_events()
        return store

    @classmethod
    def check_run_dir(cls, path: str | os.PathLike) -> Path:
        """``path`` as a Path if it is a run directory (it has a config.json), else a one-line
        :class:`RobustdropError`; reads nothing else."""
        path = Path(path)
        if not (path / cls.CONFIG).is_file():
            raise RobustdropError(
                f"{path} is not a robustdrop run directory (no {cls.CONFIG}); "
                "give the folder that `robustdrop track` created"
            )
        return path

    def _read_metrics(self) -> list[dict[str, Any]]:
        parquet, csv = self.path / self.METRICS_PARQUET, self.path / self.METRICS_CSV
        if parquet.is_file():
            try:
                # one read of the bytes: pyarrow opens a path more than once, and a writer's atomic
                # replace between two opens (a live run read by another process) mixes two files
                frame = pd.read_parquet(io.BytesIO(parquet.read_bytes()))
                _check_columns(frame)
            except Exception as exc:  # pyarrow raises many types for a damaged file
                other = (f"{csv.name} beside it holds the same rows: move {parquet.name} away and run again"
                         if csv.is_file() else "restore it from a copy (or start the run again with --overwrite)")
                raise RobustdropError(f"{parquet} is damaged ({first_line(exc)}); {other}") from None
            return frame.to_dict("records")
        if csv.is_file():
            try:
                frame = pd.read_csv(csv, keep_default_na=False, na_values=[""])
                _check_columns(frame)
            except Exception as exc:
                raise RobustdropError(f"{csv} is damaged ({first_line(exc)}); restore it from a copy (or start the "
                                      "run again with --overwrite)") from None
            return frame.to_dict("records")
        return []

    def _read_events(self) -> list[dict[str, Any]]:
        events = self.path / self.EVENTS
        if not events.is_file():
            return []
        try:
            lines = events.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise RobustdropError(f"cannot read {events} ({first_line(exc)}); restore it from a copy or move it "
                                  "away (its events are then lost) and run again") from None
        out = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except ValueError:
                event = None
            if not isinstance(event, dict) or "kind" not in event:
                raise RobustdropError(f"{events} line {number} is not an event (damaged file): delete that line (or "
                                      "restore the file from a copy) and run again")
            out.append(event)
        return out

    # -- JSON documents ---------------------------------------------------------------------
    def write_json(self, name: str, obj: Any) -> Path:
        target = self.path / name
        atomic_write_text(target, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
        return target

    def read_json(self, name: str) -> Any:
        target = self.path / name
        try:
            return json.loads(target.read_text())
        except FileNotFoundError:
            raise RobustdropError(f"{target} is missing; the run directory is incomplete") from None
        except json.JSONDecodeError as exc:
            raise RobustdropError(f"{target} is not valid JSON ({exc}); restore it or start a new run") from None

    # -- metrics ----------------------------------------------------------------------------
    def log_metrics(self, rows: Iterable[dict[str, Any]]) -> None:
        """Append tidy rows (built with :func:`metric_row`). Written on the next :meth:`flush`;
        handed to every sink (:meth:`add_sink`) at once."""
        new = []
        for row in rows:
            missing = set(METRIC_COLUMNS) - row.keys()
            if missing:
                raise ValueError(f"metric row lacks columns {sorted(missing)}: {row}")
            new.append({k: row[k] for k in METRIC_COLUMNS})
        self._rows.extend(new)
        self._dirty = True
        for sink in list(self._sinks):
            sink(new)

    def add_sink(self, sink: Callable[[list[dict[str, Any]]], None]) -> None:
        """Call ``sink(rows)`` with the rows of every later :meth:`log_metrics` (e.g. TensorBoard)."""
        self._sinks.append(sink)

    def remove_sink(self, sink: Callable[[list[dict[str, Any]]], None]) -> None:
        if sink in self._sinks:
            self._sinks.remove(sink)

    def metrics(self) -> pd.DataFrame:
        """All metric rows so far as a DataFrame with the documented columns."""
        return _to_frame(self._rows)

    @property
    def num_metric_rows(self) -> int:
        return len(self._rows)

    # -- events -----------------------------------------------------------------------------
    def log_event(self, kind: str, *, epoch: int, step: int, **data: Any) -> dict[str, Any]:
        """Record a discrete event (collapse onset, rollback, NaN, ...)."""
        event = {"kind": kind, "epoch": int(epoch), "step": int(step), **data}
        self._events.append(event)
        self._dirty = True
        return event

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        return [e for e in self._events if kind is None or e["kind"] == kind]

    @property
    def num_events(self) -> int:
        return len(self._events)

    def truncate_logs(self, num_metric_rows: int, num_events: int) -> None:
        """Drop rows and events written after a checkpoint (used on resume).

        Fewer metric rows than the checkpoint counted means the metrics file lost rows: a
        :class:`RobustdropError` (the checkpoint would otherwise continue a log with a hole).
        Fewer events is accepted with a warning (a damaged events.jsonl may have been trimmed)."""
        if len(self._rows) < num_metric_rows:
            raise RobustdropError(f"{self.path / self.METRICS_PARQUET} (or .csv) holds {len(self._rows)} rows but the "
                                  f"checkpoint was written after {num_metric_rows}: restore the file from a copy (or "
                                  "start the run again with --overwrite)")
        if len(self._events) < num_events:
            warnings.warn(f"{self.path / self.EVENTS} holds {len(self._events)} events, the checkpoint counted "
                          f"{num_events}; continuing without the missing ones", stacklevel=2)
        self._rows = self._rows[:num_metric_rows]
        self._events = self._events[:num_events]
        self._dirty = True

    def flush(self) -> None:
        """Write metrics (Parquet + CSV) and events atomically."""
        if not self._dirty:
            return
        frame = self.metrics()
        buf = io.BytesIO()
        frame.to_parquet(buf, index=False)
        atomic_write_bytes(self.path / self.METRICS_PARQUET, buf.getvalue())
        atomic_write_text(self.path / self.METRICS_CSV, frame.to_csv(index=False))
        lines = "".join(json.dumps(e, sort_keys=True, default=str) + "\n" for e in self._events)
        atomic_write_text(self.path / self.EVENTS, lines)
        self._dirty = False

    # -- arrays (snapshots, landscapes) -----------------------------------------------------
    def save_arrays(self, kind: str, name: str, **arrays: Any) -> Path:
        """Save named arrays to ``arrays/<kind>/<name>.npz`` (compressed, atomic).

        Scalars and strings are stored as 0-d arrays; load with :meth:`load_arrays`.
        """
        buf = io.BytesIO()
        np.savez_compressed(buf, **{k: np.asarray(v) for k, v in arrays.items()})
        target = self.path / "arrays" / kind / f"{name}.npz"
        atomic_write_bytes(target, buf.getvalue())
        return target

    def load_arrays(self, kind: str, name: str) -> dict[str, np.ndarray]:
        target = self.path / "arrays" / kind / f"{name}.npz"
        with np.load(target, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}

    def list_arrays(self, kind: str) -> list[str]:
        folder = self.path / "arrays" / kind
        return sorted(p.stem for p in folder.glob("*.npz")) if folder.is_dir() else []

    # -- checkpoints ------------------------------------------------------------------------
    def checkpoint_path(self, name: str) -> Path:
        return self.path / "checkpoints" / f"{name}.pt"

    def save_checkpoint(self, name: str, state: dict[str, Any]) -> Path:
        buf = io.BytesIO()
        torch.save(state, buf)
        target = self.checkpoint_path(name)
        atomic_write_bytes(target, buf.getvalue())
        return target

    def load_checkpoint(self, name: str, map_location: str | torch.device = "cpu", **kwargs: Any) -> dict[str, Any]:
        """:func:`load_checkpoint_file` of ``checkpoints/<name>.pt`` (``todo=`` as there)."""
        return load_checkpoint_file(self.checkpoint_path(name), map_location, **kwargs)


def load_checkpoint_file(path: str | os.PathLike, map_location: str | torch.device = "cpu", *,
                         todo: str = "give a checkpoints/*.pt file written by robustdrop") -> dict[str, Any]:
    """Load a checkpoint without executing code (``weights_only=True``). ``todo`` ends the error
    message of an unreadable file (what the caller's user can do)."""
    path = Path(path)
    if not path.is_file():
        raise RobustdropError(f"checkpoint {path} does not exist; check the path or the run's checkpoints/ folder")
    if not zipfile.is_zipfile(path):  # torch.save writes zip archives; torch's errors on other files are its internals
        raise RobustdropError(f"{path} is not a complete checkpoint (not a zip archive as torch.save writes: another "
                              f"kind of file, or truncated); {todo}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt or foreign files
        raise RobustdropError(
            f"cannot read checkpoint {path} ({first_line(exc)}); it is corrupt or not a robustdrop checkpoint: {todo}"
        ) from None
    if not isinstance(state, dict):
        raise RobustdropError(f"checkpoint {path} does not hold a robustdrop state dictionary")
    return state
