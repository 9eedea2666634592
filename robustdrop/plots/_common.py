"""Shared helpers for figures: naming attack specs, picking a labelled metric curve, the digitized
paper data, seaborn styling and writing PNG + PDF. Reading run directories is
:mod:`robustdrop.plots.runs`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import matplotlib as mpl
import pandas as pd
import seaborn as sns
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from robustdrop.errors import RobustdropError
from robustdrop.formatting import format_eps, is_missing
from robustdrop.plots.runs import PathLike, Run, modal_spec, per_epoch, restrict_to_spec, select

# Split preference when several splits hold the same measurement equally often.
SPLIT_ORDER = ("test", "probe", "val", "train")


# --------------------------------------------------------------------------------------------
# Attack spec strings
# --------------------------------------------------------------------------------------------
_ATTACK_NAMES = {
    "fgsm": "FGSM",
    "rs-fgsm": "RS-FGSM",
    "n-fgsm": "N-FGSM",
    "fgsm+": "FGSM+",
    "apart": "APART",
    "gradalign": "GradAlign",
    "autoattack": "AutoAttack",
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
            if not is_missing(step_size):
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
