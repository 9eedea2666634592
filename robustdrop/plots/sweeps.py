"""Reading a sweep: its tidy table, the per-group table of ``robustdrop compare SWEEP_DIR``, and
``robustdrop plot onset``.

Input is a sweep directory (``sweep.json``: the varied values of each cell are the grid's), or
any list of run directories (and sweep directories): then the varied values are the config
entries that differ between the runs. A **group** is one combination of the varied values other
than ``seed``; its runs are the seeds.

Per run (:func:`run_summary`), on the run's own probe evaluation (``split=probe``, PGD as the run
evaluated it — the attack spec is said in the table's notes):

* ``best_pgd``: the highest probe PGD accuracy over the epochs (its epoch: ``best_epoch``);
* ``final_pgd``: the probe PGD accuracy of the last evaluated epoch;
* ``onset_epoch``: the epoch of the collapse detector's first ``collapse_onset`` event; ``None``
  when it never fired. Only runs with the ``collapse`` diagnostic count (``detector``): a run
  without it has no onset and is left out of the collapse rate;
* ``s_per_epoch``: mean wall seconds of training + evaluation per epoch.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator

from robustdrop.errors import RobustdropError
from robustdrop.formatting import (
    format_eps,
    format_pct_se,
    is_missing,
    latex_table,
    markdown_table,
    text_table,
)
from robustdrop.plots._common import attack_text, new_figure, run_palette, save_figure, style
from robustdrop.plots.runs import PathLike, Run, eval_curve, modal_spec, open_run, seconds_per_epoch, select
from robustdrop.store import SweepRecord, is_sweep_dir

# Config entries that say where or how fast a run ran, not what it is: never "varied".
_NOT_VARIED = ("device", "threads", "data_dir", "name")
GROUP_COLUMNS = ["runs", "collapsed", "detector_runs", "collapse_rate", "onset_median", "onset_min", "onset_max",
                 "best_pgd_mean", "best_pgd_se", "final_pgd_mean", "final_pgd_se", "s_per_epoch"]


@dataclass
class SweepRun:
    """One run of a sweep: its name (the cell), directory, varied values and recorded status."""

    name: str
    path: Path
    values: dict[str, Any]
    status: str = "finished"

    @cached_property
    def run(self) -> Run:
        return open_run(self.path)


@dataclass
class SweepRuns:
    """The runs of one sweep directory, or of a list of run directories."""

    name: str
    runs: list[SweepRun]
    varied: list[str]
    records: list[SweepRecord] = field(default_factory=list)

    @property
    def group_keys(self) -> list[str]:
        return [k for k in self.varied if k != "seed"]


# --------------------------------------------------------------------------------------------
# Opening
# --------------------------------------------------------------------------------------------
def _config(path: Path) -> dict[str, Any] | None:
    try:
        return open_run(path).config
    except RobustdropError:
        return None


def open_sweep_runs(paths: Sequence[PathLike] | PathLike | SweepRuns) -> SweepRuns:
    """The runs of a sweep directory, or of run (and sweep) directories; see the module docstring."""
    if isinstance(paths, SweepRuns):
        return paths
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = [Path(p) for p in paths]
    if not paths:
        raise RobustdropError("no sweep or run directory given")
    records: list[SweepRecord] = []
    runs: list[SweepRun] = []
    for p in paths:
        if is_sweep_dir(p):
            record = SweepRecord.open(p)
            records.append(record)
            for cell, entry in record.cells.items():
                run_dir = record.run_dir(cell)
                if (run_dir / "config.json").is_file():
                    runs.append(SweepRun(cell, run_dir, dict(entry.get("values", {})), str(entry.get("status"))))
        else:
            open_run(p)  # a one-line error for a missing or foreign folder
            runs.append(SweepRun(p.name, p, {}, "finished"))
    if not runs:
        raise RobustdropError(f"no run of {', '.join(map(str, paths))} has started yet; run the sweep first")
    if len(paths) == 1 and records:
        named = {k for e in records[0].cells.values() for k in e.get("values", {})}  # named cells' own values
        varied = sorted(set(records[0].grid) | named)
        return SweepRuns(records[0].name, runs, varied, records)
    # Several folders: what differs between the runs' configs is what varies.
    configs = [_config(r.path) or {} for r in runs]
    keys = sorted({k for c in configs for k in c if k not in _NOT_VARIED})
    varied = [k for k in keys if len({repr(c.get(k)) for c in configs}) > 1]
    for run, cfg in zip(runs, configs):
        run.values = {k: cfg.get(k) for k in varied}
    return SweepRuns(", ".join(p.name for p in paths), runs, varied, records)


# --------------------------------------------------------------------------------------------
# Per run
# --------------------------------------------------------------------------------------------
def run_summary(run: Run | PathLike) -> dict[str, Any]:
    """Best / final probe PGD accuracy, onset and cost of one run (see the module docstring)."""
    run = run if isinstance(run, Run) else open_run(run)
    df = run.metrics
    pgd = eval_curve(df, "pgd", "probe")
    trained = pgd[pgd.index >= 1] if (pgd.index >= 1).any() else pgd
    detector = bool(len(select(df, source="collapse", metric="collapse_score")))
    return {
        "best_pgd": float(trained.max()) if len(trained) else math.nan,
        "best_epoch": int(trained.idxmax()) if len(trained) else None,
        "final_pgd": float(pgd.iloc[-1]) if len(pgd) else math.nan,
        "final_epoch": int(pgd.index[-1]) if len(pgd) else None,
        "epochs": int(df["epoch"].max()) if len(df) else 0,
        "onset_epoch": run.onset_epoch(),
        "detector": detector,
        "s_per_epoch": seconds_per_epoch(df),
    }


def _fmt_value(key: str, value: Any) -> str:
    if is_missing(value):
        return "none"
    if key in ("epsilon", "eval_epsilon", "alpha", "eval_pgd_step_size") and isinstance(value, (int, float)):
        return format_eps(float(value))
    if isinstance(value, list):
        return "+".join(map(str, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def runs_table(paths: Sequence[PathLike] | PathLike | SweepRuns) -> pd.DataFrame:
    """One row per run: ``cell``, the varied values (config names), ``status`` and :func:`run_summary`'s numbers."""
    sr = open_sweep_runs(paths)
    rows = []
    for r in sr.runs:
        rows.append({"cell": r.name, **{k: r.values.get(k) for k in sr.varied}, "status": r.status,
                     **run_summary(r.run)})
    df = pd.DataFrame(rows)
    df.attrs.update(varied=list(sr.varied), name=sr.name)
    return df


# --------------------------------------------------------------------------------------------
# The tidy table
# --------------------------------------------------------------------------------------------
def sweep_metrics(paths: Sequence[PathLike] | PathLike | SweepRuns) -> pd.DataFrame:
    """Every run's metrics rows (the documented schema) with ``cell`` and the varied values as
    ``cfg_<key>`` columns in front (prefixed: the metrics have their own ``epsilon``, the attack's).

    >>> df = sweep_metrics("runs/eps-study")                                  # doctest: +SKIP
    >>> pgd = df.query("split == 'probe' and metric == 'acc' and attack == 'pgd'")   # doctest: +SKIP
    >>> pgd.groupby(["cfg_epsilon", "epoch"]).value.mean()                    # doctest: +SKIP
    """
    sr = open_sweep_runs(paths)
    frames = []
    for r in sr.runs:
        m = r.run.metrics
        front = {"cell": r.name, **{f"cfg_{k}": [r.values.get(k)] * len(m) for k in sr.varied}}
        frames.append(pd.concat([pd.DataFrame(front, index=m.index), m], axis=1))
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    df.attrs.update(varied=list(sr.varied), name=sr.name)
    return df


def load_sweep(path: PathLike) -> pd.DataFrame:
    """The tidy table of an existing sweep directory (:func:`sweep_metrics`)."""
    return sweep_metrics([path])


# --------------------------------------------------------------------------------------------
# Per group
# --------------------------------------------------------------------------------------------
def std_error(values: Iterable[float]) -> float:
    """The standard error of the mean of ``values`` over seeds (missing ones left out); NaN for fewer than two."""
    v = pd.Series(values, dtype=float).dropna()
    return float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else math.nan


def _groups(runs: pd.DataFrame, keys: Sequence[str]) -> list[tuple[tuple, pd.DataFrame]]:
    if not keys:
        return [((), runs)]
    key_text = runs[list(keys)].map(repr) if hasattr(runs, "map") else runs[list(keys)].applymap(repr)
    out: dict[tuple, list[int]] = {}
    for i, row in key_text.iterrows():
        out.setdefault(tuple(row), []).append(i)
    return [(tuple(runs.loc[idx[0], k] for k in keys), runs.loc[idx]) for idx in out.values()]


def compare_sweep(paths: Sequence[PathLike] | PathLike | SweepRuns) -> pd.DataFrame:
    """One row per group (varied values except ``seed``) aggregated over its runs (seeds).

    Columns: the group's values (config names), then ``runs``; ``collapsed`` / ``detector_runs``
    / ``collapse_rate`` (runs whose collapse detector fired, among those that had it);
    ``onset_median``, ``onset_min``, ``onset_max`` over the collapsed runs; ``best_pgd_mean``,
    ``best_pgd_se``, ``final_pgd_mean``, ``final_pgd_se`` (mean and standard error, std/√n with
    ddof 1, of :func:`run_summary`'s probe PGD accuracies, as fractions); ``s_per_epoch`` (mean).
    ``df.attrs``: ``keys`` (group columns), ``notes`` (how the numbers were obtained).
    """
    sr = open_sweep_runs(paths)
    runs = runs_table(sr)
    keys = sr.group_keys
    rows = []
    for values, g in _groups(runs, keys):
        det = g[g["detector"]]
        onsets = det["onset_epoch"].dropna().astype(float)
        rows.append({
            **dict(zip(keys, values)),
            "runs": len(g),
            "collapsed": int(len(onsets)),
            "detector_runs": int(len(det)),
            "collapse_rate": len(onsets) / len(det) if len(det) else math.nan,
            "onset_median": float(onsets.median()) if len(onsets) else math.nan,
            "onset_min": float(onsets.min()) if len(onsets) else math.nan,
            "onset_max": float(onsets.max()) if len(onsets) else math.nan,
            "best_pgd_mean": float(g["best_pgd"].mean()),
            "best_pgd_se": std_error(g["best_pgd"]),
            "final_pgd_mean": float(g["final_pgd"].mean()),
            "final_pgd_se": std_error(g["final_pgd"]),
            "s_per_epoch": float(g["s_per_epoch"].mean()),
        })
    df = pd.DataFrame(rows, columns=[*keys, *GROUP_COLUMNS])
    df.attrs.update(keys=list(keys), notes=_notes(sr), name=sr.name)
    return df


def _probe_pgd(sr: SweepRuns) -> tuple[str, str]:
    """(the probe PGD attack of the runs, the probe size): one spec, or the spec without ε when
    the runs differ only in ε (each is evaluated at its own ε), e.g. ``PGD-20 (step 2.5/255, ...)``."""
    specs, sizes = set(), set()
    for r in sr.runs:
        rows = select(r.run.metrics, source="eval", metric="acc", attack="pgd", split="probe")
        spec = modal_spec(rows)
        if spec is not None:
            specs.add(spec)
        if len(rows):
            sizes.add(int(rows["n"].iloc[-1]))
    n = "/".join(map(str, sorted(sizes))) or "?"
    if len(specs) == 1:
        return attack_text("pgd", next(iter(specs))), n
    if len({s[1:] for s in specs}) == 1:  # only ε differs
        return attack_text("pgd", (None, *next(iter(specs))[1:])) + " at each run's ε", n
    return " / ".join(sorted(attack_text("pgd", s) for s in specs)) or "PGD", n


def _notes(sr: SweepRuns) -> list[str]:
    """How the numbers were obtained: the probe PGD attack and probe size of the runs."""
    pgd, n = _probe_pgd(sr)
    return [f"accuracies in %: {pgd} on the probe set (n={n}); best = highest over epochs, final = last epoch; "
            "± = standard error over the runs (seeds)",
            "onset = the collapse detector's onset epoch: median (min–max) over collapsed runs; collapsed = runs "
            "where it fired / runs that had the detector"]


# --------------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------------
def sweep_table_cells(df: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """Headers and text cells of :func:`compare_sweep`'s table (accuracies in %, onset "median (min–max)")."""
    keys = df.attrs.get("keys", [])
    headers = [*keys, "runs", "collapsed", "onset ep.", "best PGD %", "final PGD %", "s/epoch"]
    cells = []
    for r in df.to_dict("records"):
        onset = ""
        if not is_missing(r["onset_median"]):
            lo, hi = int(r["onset_min"]), int(r["onset_max"])
            onset = f"{r['onset_median']:g}" + (f" ({lo}–{hi})" if lo != hi else "")
        collapsed = f"{int(r['collapsed'])}/{int(r['detector_runs'])}" if r["detector_runs"] else "n/a"
        cells.append([*(_fmt_value(k, r[k]) for k in keys), str(int(r["runs"])), collapsed, onset,
                      format_pct_se(r["best_pgd_mean"], r["best_pgd_se"]),
                      format_pct_se(r["final_pgd_mean"], r["final_pgd_se"]),
                      "" if is_missing(r["s_per_epoch"]) else f"{r['s_per_epoch']:.1f}"])
    return headers, cells


def format_sweep_table(df: pd.DataFrame, fmt: str = "terminal") -> str:
    """Render :func:`compare_sweep`'s table: ``terminal`` (aligned text), ``csv`` (raw numbers,
    accuracies as fractions), ``markdown`` or ``latex`` (booktabs); notes below the table."""
    notes = df.attrs.get("notes", [])
    if fmt == "csv":
        return df.to_csv(index=False)
    headers, cells = sweep_table_cells(df)
    if fmt == "terminal":
        return text_table(headers, cells) + "".join(f"{n}\n" for n in notes)
    if fmt == "markdown":
        return markdown_table(headers, cells) + "\n" + "".join(f"{n}.\n" for n in notes)
    if fmt == "latex":
        return latex_table(headers, cells, "; ".join(notes) + ".")
    raise RobustdropError(f"unknown table format {fmt!r}; use one of terminal, csv, markdown, latex")


# --------------------------------------------------------------------------------------------
# plot onset
# --------------------------------------------------------------------------------------------
def _group_label(keys: Sequence[str], values: Sequence[Any]) -> str:
    return ", ".join(f"{k}={_fmt_value(k, v)}" for k, v in zip(keys, values)) or "all runs"


def onset_figure(paths: Sequence[PathLike] | PathLike | SweepRuns):
    """Left: each run's onset epoch per group (box + points; runs without a collapse in a "none"
    row on top). Right: probe PGD accuracy per epoch, mean over the group's runs with a band of
    ±1 standard error (thin lines: the single runs)."""
    sr = open_sweep_runs(paths)
    runs = runs_table(sr)
    keys = sr.group_keys
    groups = _groups(runs, keys)
    by_cell = {r.name: r.run for r in sr.runs}
    colors = run_palette(len(groups))
    with style():
        fig = new_figure((12, 4.2 + 0.15 * len(groups)))
        ax_onset, ax_curve = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.4]})
        max_epoch = int(runs["epochs"].max()) if len(runs) else 1
        none_y = max_epoch + 1.5
        rng = np.random.default_rng(0)  # jitter only
        labels = []
        for i, (values, g) in enumerate(groups):
            labels.append(_group_label(keys, values))
            det = g[g["detector"]]
            onsets = det["onset_epoch"].dropna().astype(float).to_numpy()
            if len(onsets):
                ax_onset.boxplot([onsets], positions=[i], widths=0.5, showfliers=False,
                                 medianprops={"color": colors[i]})
            ys = np.concatenate([onsets, np.full(len(det) - len(onsets), none_y)])
            if len(ys):
                ax_onset.scatter(i + rng.uniform(-0.12, 0.12, len(ys)), ys, color=colors[i], s=22, zorder=3)
            curves = pd.concat([eval_curve(by_cell[c].metrics, "pgd", "probe").rename(c) for c in g["cell"]], axis=1)
            for c in curves:
                ax_curve.plot(curves.index, 100 * curves[c].values, color=colors[i], lw=0.6, alpha=0.35)
            mean = 100 * curves.mean(axis=1)
            se = 100 * curves.std(axis=1, ddof=1) / np.sqrt(curves.notna().sum(axis=1))
            ax_curve.plot(mean.index, mean.values, color=colors[i], lw=2, label=f"{labels[-1]} (n={len(g)})")
            if len(g) > 1:
                ax_curve.fill_between(mean.index, (mean - se).values, (mean + se).values, color=colors[i], alpha=0.2)
        ax_onset.axhline(max_epoch + 0.75, color="0.6", lw=0.8, ls=":")
        ax_onset.set_xticks(range(len(groups)), labels, rotation=20 if len(groups) > 3 else 0, ha="right"
                            if len(groups) > 3 else "center", fontsize="small")
        ticks = [int(t) for t in MaxNLocator(nbins=6, integer=True).tick_values(1, max_epoch) if 1 <= t <= max_epoch]
        ax_onset.set_yticks([*ticks, none_y], [*map(str, ticks), "none"])
        ax_onset.set_ylim(0, none_y + 1)
        ax_onset.set_xlim(-0.6, len(groups) - 0.4)
        ax_onset.set_ylabel("collapse onset epoch")
        ax_onset.set_title("onset per run (detector's first onset; none = no collapse)", fontsize="small")
        ax_curve.set_xlabel("epoch")
        pgd, n = _probe_pgd(sr)
        ax_curve.set_ylabel(f"probe PGD accuracy (%, n={n})")
        ax_curve.set_title(f"{pgd}: mean ± 1 s.e. over runs (thin: single runs)", fontsize="small")
        ax_curve.legend(fontsize="x-small")
        fig.suptitle(sr.name, fontsize="small", style="italic")
    return fig


def plot_onset(paths: Sequence[PathLike] | PathLike | SweepRuns, out: PathLike, stem: str = "onset") -> list[Path]:
    """Write :func:`onset_figure` as ``<out>/<stem>.png`` and ``.pdf``; returns the paths."""
    return save_figure(onset_figure(paths), out, stem)


__all__ = [
    "GROUP_COLUMNS", "SweepRun", "SweepRuns", "compare_sweep", "format_sweep_table", "load_sweep",
    "onset_figure", "open_sweep_runs", "plot_onset", "run_summary", "runs_table", "sweep_metrics", "sweep_table_cells",
]
