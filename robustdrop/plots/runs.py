"""Reading run directories: :class:`Run`, selecting rows of the tidy metrics table, and the
per-run numbers the figures, tables and analyses share (a metric's per-epoch curve, the collapse
onset, passes per step, seconds per epoch).

Everything here reads files through :class:`robustdrop.store.RunStore`; nothing imports training
code. Metric names and columns: ``docs/architecture.md``.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from robustdrop.errors import RobustdropError
from robustdrop.store import RunStore

PathLike = str | os.PathLike

# --------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------
@dataclass
class Run:
    """A run directory opened for reading."""

    path: Path
    store: RunStore

    @property
    def name(self) -> str:
        return self.path.name

    @cached_property
    def config(self) -> dict[str, Any]:
        cfg = self.store.read_json(RunStore.CONFIG)
        return cfg if isinstance(cfg, dict) else {}

    @cached_property
    def metrics(self) -> pd.DataFrame:
        return self.store.metrics()

    @property
    def method(self) -> str:
        return config_name(self.config.get("method")) or "?"

    def onset_epochs(self) -> list[int]:
        """Epochs of the ``collapse_onset`` events, in the order they were logged."""
        return [int(e["epoch"]) for e in self.store.events("collapse_onset")]

    def onset_epoch(self) -> int | None:
        """Epoch of the first ``collapse_onset`` event; ``None`` when the detector never fired."""
        onsets = self.onset_epochs()
        return onsets[0] if onsets else None

    @property
    def label(self) -> str:
        method = self.method
        return self.name if method in ("?", self.name) else f"{self.name} ({method})"


def open_run(path: PathLike) -> Run:
    """Open a run directory; a missing or foreign folder is a :class:`RobustdropError`."""
    p = Path(path)
    if not p.exists():
        raise RobustdropError(
            f"run directory {p} does not exist; give a folder written by `robustdrop track` (runs/<name>/)"
        )
    if not p.is_dir():
        raise RobustdropError(f"{p} is a file, not a run directory; give the folder that `robustdrop track` created")
    return Run(p, RunStore.open(p))


def open_runs(paths: Sequence[PathLike] | PathLike) -> list[Run]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    runs = [open_run(p) for p in paths]
    if not runs:
        raise RobustdropError("no run directory given; pass at least one runs/<name>/ folder")
    return runs


def config_name(value: Any) -> str | None:
    """A config entry that may be a plain string or a mapping with a ``name``."""
    if value is None:
        return None
    if isinstance(value, dict):
        for key in ("name", "arch", "architecture", "id"):
            if isinstance(value.get(key), str):
                return value[key]
        return None
    return str(value)


# --------------------------------------------------------------------------------------------
# Selecting rows of the tidy metrics table
# --------------------------------------------------------------------------------------------
def select(
    df: pd.DataFrame,
    *,
    source: str | Iterable[str] | None = None,
    metric: str | Iterable[str] | None = None,
    attack: str | Iterable[str] | None = None,
    split: str | Iterable[str] | None = None,
) -> pd.DataFrame:
    """Rows matching every given column (a string, or any of several)."""
    mask = pd.Series(True, index=df.index)
    for col, want in (("source", source), ("metric", metric), ("attack", attack), ("split", split)):
        if want is None:
            continue
        if isinstance(want, str):
            mask &= df[col] == want
        else:
            mask &= df[col].isin(list(want))
    return df[mask]


def _num_key(x: Any) -> float | None:
    x = float(x)
    return None if math.isnan(x) else round(x, 9)


def spec_key(row: Any) -> tuple:
    """Hashable (epsilon, steps, step_size, restarts) of a metrics row; NaN becomes ``None``."""
    return (_num_key(row["epsilon"]), int(row["steps"]), _num_key(row["step_size"]), int(row["restarts"]))


def with_spec_key(rows: pd.DataFrame) -> pd.DataFrame:
    rows = rows.copy()
    rows["_spec"] = [spec_key(r) for _, r in rows.iterrows()] if len(rows) else []
    return rows


def modal_spec(rows: pd.DataFrame) -> tuple | None:
    """The attack spec that most rows carry (ties: the one logged first)."""
    if rows.empty:
        return None
    keyed = with_spec_key(rows)
    counts = keyed["_spec"].value_counts(sort=False)
    best = max(counts.index, key=lambda k: (counts[k], -list(keyed["_spec"]).index(k)))
    return best


def restrict_to_spec(rows: pd.DataFrame, spec: tuple | None) -> pd.DataFrame:
    if spec is None or rows.empty:
        return rows
    keyed = with_spec_key(rows)
    return keyed[keyed["_spec"] == spec].drop(columns="_spec")


def per_epoch(rows: pd.DataFrame, how: str = "last") -> pd.Series:
    """One value per epoch: the last-logged (highest step) value, or the mean."""
    if rows.empty:
        return pd.Series(dtype="float64")
    rows = rows.sort_values(["epoch", "step"], kind="stable")
    grouped = rows.groupby("epoch")["value"]
    out = grouped.last() if how == "last" else grouped.mean()
    out.index = out.index.astype(int)
    return out.astype("float64")


def fractional_epochs(rows: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """x, y for rows that may be logged several times per epoch.

    An epoch with k rows puts them at ``e-1 + 1/k, ..., e`` so the last one lands on the epoch
    itself (epoch 0 rows sit at 0). One row per epoch gives plain epochs.
    """
    if rows.empty:
        return np.array([]), np.array([])
    rows = rows.sort_values(["epoch", "step"], kind="stable")
    xs: list[float] = []
    ys: list[float] = []
    for epoch, group in rows.groupby("epoch", sort=True):
        k = len(group)
        base = max(int(epoch) - 1, 0) if int(epoch) > 0 else 0
        for i, value in enumerate(group["value"]):
            xs.append(float(epoch) if int(epoch) == 0 or k == 1 else base + (i + 1) / k)
            ys.append(float(value))
    return np.asarray(xs), np.asarray(ys)


# --------------------------------------------------------------------------------------------
# Arrays stored per epoch (snapshots, landscapes)
# --------------------------------------------------------------------------------------------
_EPOCH_NAME = re.compile(r"^epoch_(\d+)$")


def array_epochs(run: Run, kind: str) -> dict[int, str]:
    """``{epoch: name}`` for ``arrays/<kind>/epoch_XXXX.npz``."""
    out: dict[int, str] = {}
    for name in run.store.list_arrays(kind):
        m = _EPOCH_NAME.match(name)
        if m:
            out[int(m.group(1))] = name
    return dict(sorted(out.items()))


def check_epochs(run: Run, kind: str, requested: Sequence[int], available: Sequence[int]) -> None:
    missing = [int(e) for e in requested if int(e) not in set(available)]
    if missing:
        avail = ", ".join(str(e) for e in available) or "none"
        raise RobustdropError(
            f"no {kind} for epoch(s) {', '.join(map(str, missing))} in {run.path}; available epochs: {avail}"
        )


# --------------------------------------------------------------------------------------------
# Per-run numbers shared by figures, tables and the analyses
# --------------------------------------------------------------------------------------------
def metric_curve(df: pd.DataFrame, *, source: str, metric: str, attack: str, split: str) -> pd.Series:
    """Per-epoch values of one measurement (the last logged in each epoch), index = epoch; empty
    when it was not logged."""
    return per_epoch(select(df, source=source, metric=metric, attack=attack, split=split))


def eval_curve(df: pd.DataFrame, attack: str = "pgd", split: str = "probe") -> pd.Series:
    """The run's own per-epoch evaluation accuracy under ``attack`` (``none``, ``fgsm``, ``pgd``) on ``split``."""
    return metric_curve(df, source="eval", metric="acc", attack=attack, split=split)


def _epoch_seconds(df: pd.DataFrame, part: str) -> pd.Series:
    """``time_<part>_s`` per training epoch (epoch 0, before training, left out)."""
    s = metric_curve(df, source="train", metric=f"time_{part}_s", attack="none", split="train")
    return s[s.index >= 1]


def train_seconds_per_epoch(df: pd.DataFrame, *, skip_first: bool = False) -> float:
    """Median seconds of an epoch's training steps (``time_train_s``); NaN when not logged.

    The median, not the mean: every epoch trains the same number of steps, so epochs differ only
    by noise (the load of a shared machine, the first epoch's warm-up), which the median ignores.
    ``skip_first`` leaves the first epoch out entirely (warm-up of a short timing run).
    """
    s = _epoch_seconds(df, "train")
    if skip_first and len(s) > 1:
        s = s[s.index > s.index.min()]
    return float(s.median()) if len(s) else math.nan


def seconds_per_epoch(df: pd.DataFrame) -> float:
    """Mean wall seconds of an epoch's training plus evaluation; NaN when not logged.

    The mean, not the median: evaluations may run every few epochs only, and their cost belongs
    in the average epoch.
    """
    train = _epoch_seconds(df, "train")
    if not len(train):
        return math.nan
    return float(train.add(_epoch_seconds(df, "eval").reindex(train.index).fillna(0.0)).mean())


def run_seconds(df: pd.DataFrame) -> float:
    """The run's measured compute time: the sum of its epochs' train + eval + diagnostics seconds."""
    return float(sum(_epoch_seconds(df, part).sum() for part in ("train", "eval", "diag")))


def passes_per_step(df: pd.DataFrame) -> tuple[float, float]:
    """(forward, backward) passes per training step (``source=cost``), averaged over the epochs
    that logged them; NaN where not logged."""
    def mean(metric: str) -> float:
        values = select(df, source="cost", metric=metric)["value"]
        return float(values.mean()) if len(values) else math.nan

    return mean("passes_forward"), mean("passes_backward")


def examples_per_epoch(df: pd.DataFrame) -> int:
    """Training examples per epoch (``n`` of the last training-accuracy row); 0 when not logged."""
    rows = select(df, source="train", metric="acc", split="train")
    return int(rows.sort_values(["epoch", "step"], kind="stable")["n"].iloc[-1]) if len(rows) else 0
