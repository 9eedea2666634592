"""Shared helpers for figures and tables: reading runs, picking metric series, naming attack
specs, seaborn styling and writing PNG + PDF.

Everything here reads run directories through :class:`robustdrop.store.RunStore`; nothing imports
training code.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any

import matplotlib as mpl
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from robustdrop.errors import RobustdropError
from robustdrop.formatting import format_eps
from robustdrop.store import RunStore

PathLike = str | os.PathLike

SPEC_COLUMNS = ["epsilon", "steps", "step_size", "restarts"]

# Split preference when several splits hold the same measurement equally often.
SPLIT_ORDER = ("test", "probe", "val", "train")


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
# Attack spec strings
# --------------------------------------------------------------------------------------------
_ATTACK_NAMES = {
    "fgsm": "FGSM",
    "rs-fgsm": "RS-FGSM",
    "n-fgsm": "N-FGSM",
    "fgsm+": "FGSM+",
    "apart": "APART",
    "noise-sign": "random-sign noise",
    "noise-uniform": "uniform noise",
    "train-perturbation": "training perturbation",
}


def attack_text(attack: str, spec: tuple | None) -> str:
    """``PGD-20 (ε=8/255, step 2/255, 1 restart)``, ``FGSM (ε=8/255)``, ``clean``, ..."""
    if attack == "none":
        return "clean"
    eps, steps, step_size, restarts = spec if spec is not None else (None, 0, None, 0)
    parts = [f"ε={format_eps(eps)}"] if eps is not None else []
    if attack == "pgd":
        name = f"PGD-{steps}" if steps else "PGD"
        if step_size is not None:
            parts.append(f"step {format_eps(step_size)}")
        r = max(int(restarts), 1)
        parts.append(f"{r} restart" + ("" if r == 1 else "s"))
    else:
        name = _ATTACK_NAMES.get(attack, attack)
        if attack in ("fgsm", "noise-sign", "noise-uniform"):
            if step_size is not None and eps is not None and abs(step_size - eps) > 1e-9:
                parts.append(f"step {format_eps(step_size)}")
        else:
            if steps and steps > 1:
                parts.append(f"{steps} steps")
            if step_size is not None:
                parts.append(f"step {format_eps(step_size)}")
            if restarts and restarts > 1:
                parts.append(f"{restarts} restarts")
    return f"{name} ({', '.join(parts)})" if parts else name


def eval_text(split: str, n: int | None) -> str:
    return f"n={int(n)} {split}" if n else split


@dataclass
class Curve:
    """A per-epoch series with the provenance to label it."""

    values: pd.Series  # index: epoch
    attack: str
    spec: tuple | None
    split: str
    n: int | None

    @property
    def attack_label(self) -> str:
        return attack_text(self.attack, self.spec)

    @property
    def label(self) -> str:
        return f"{self.attack_label}, {eval_text(self.split, self.n)}"


def pick_curve(
    df: pd.DataFrame,
    *,
    source: str,
    metric: str,
    attack: str,
    splits: Sequence[str] = SPLIT_ORDER,
    how: str = "last",
) -> Curve | None:
    """The per-epoch curve of one measurement, on one split and one attack spec.

    The spec is the one most rows carry; the split is the one (among ``splits``) that covers the
    most epochs, ties broken by the order of ``splits``. ``None`` when nothing was logged.
    """
    rows = select(df, source=source, metric=metric, attack=attack, split=splits)
    if rows.empty:
        return None
    spec = modal_spec(rows)
    rows = restrict_to_spec(rows, spec)
    present = [s for s in splits if (rows["split"] == s).any()]
    split = max(present, key=lambda s: (rows.loc[rows["split"] == s, "epoch"].nunique(), -present.index(s)))
    rows = rows[rows["split"] == split]
    n_values = rows["n"][rows["n"] > 0]
    n = int(n_values.mode().iloc[0]) if len(n_values) else None
    return Curve(per_epoch(rows, how), attack, spec, split, n)


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
# Paper data
# --------------------------------------------------------------------------------------------
def paper_table(name: str) -> pd.DataFrame:
    """A digitized table shipped in ``robustdrop/plots/paper_data/``."""
    ref = resources.files("robustdrop.plots").joinpath("paper_data", name)
    with ref.open("r", encoding="utf-8") as f:
        return pd.read_csv(f, comment="#")


# --------------------------------------------------------------------------------------------
# Style and output
# --------------------------------------------------------------------------------------------
def _style_rc() -> dict[str, Any]:
    rc: dict[str, Any] = {}
    rc.update(sns.axes_style("whitegrid"))
    rc.update(sns.plotting_context("notebook", font_scale=0.85))
    rc.update({
        "axes.prop_cycle": mpl.cycler(color=sns.color_palette("colorblind")),
        "legend.frameon": True,
        "legend.framealpha": 0.9,
        "savefig.dpi": 150,
        "pdf.fonttype": 42,
        "figure.constrained_layout.use": False,
    })
    return rc


@contextlib.contextmanager
def style() -> Iterator[None]:
    """Seaborn ``whitegrid`` look, applied locally (global rcParams are left alone)."""
    with mpl.rc_context(_style_rc()):
        yield


def new_figure(figsize: tuple[float, float]) -> Figure:
    """A pyplot-free figure on the non-interactive Agg canvas."""
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def run_palette(n: int) -> list[tuple[float, float, float]]:
    return list(sns.color_palette("colorblind", max(n, 1)))


def save_figure(fig: Figure, out: PathLike, stem: str) -> list[Path]:
    """Write ``<out>/<stem>.png`` and ``.pdf``; returns both paths."""
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise RobustdropError(f"--out {out_dir} is a file; give a folder to write the figures into")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.png", out_dir / f"{stem}.pdf"]
    with style():
        for p in paths:
            fig.savefig(p)
    return paths


def add_notes(ax: Any, title: str, notes: Sequence[str]) -> None:
    """Axis title with a second line listing what was not logged (so nothing silently vanishes)."""
    if notes:
        shown = list(notes[:3]) + ([f"+{len(notes) - 3} more"] if len(notes) > 3 else [])
        title = f"{title}\nnot logged: " + "; ".join(shown)
    ax.set_title(title, fontsize="medium")


def mark_onsets(ax: Any, run: Run, color: Any, *, with_label: bool, prefix: str = "") -> None:
    """Vertical dash-dot line at each collapse onset (gid ``collapse_onset``)."""
    for i, epoch in enumerate(run.onset_epochs()):
        label = f"{prefix}collapse onset (epoch {epoch})" if with_label and i == 0 else "_nolegend_"
        line = ax.axvline(epoch, color=color, linestyle="-.", linewidth=1.4, alpha=0.9, label=label)
        line.set_gid("collapse_onset")
        if with_label:
            ax.annotate(
                f"onset {epoch}", xy=(epoch, 1.0), xycoords=("data", "axes fraction"), xytext=(3, -12),
                textcoords="offset points", fontsize="small", color=color,
            )


def figure_legend(fig: Figure, axes: Sequence[Any], *, ncol: int = 2) -> None:
    """One legend under the figure with the distinct labels of ``axes`` (in drawing order)."""
    seen: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    if seen:
        fig.legend(list(seen.values()), list(seen.keys()), loc="outside lower center", ncol=min(ncol, len(seen)),
                   fontsize="small")
