"""Accuracy curves over training (clean / FGSM / PGD) and APART's learned generator ψ."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from robustdrop.errors import RobustdropError
from robustdrop.plots._common import (
    add_notes,
    figure_legend,
    mark_onsets,
    new_figure,
    paper_table,
    pick_curve,
    run_palette,
    save_figure,
    style,
)
from robustdrop.plots.runs import PathLike, fractional_epochs, open_run, open_runs, select

PAPER_E4 = "digitized from the paper's PGD-10 vs APART figure"

_PANELS = [("none", "Clean accuracy"), ("fgsm", "FGSM accuracy"), ("pgd", "PGD accuracy")]


# --------------------------------------------------------------------------------------------
# clean / FGSM / PGD accuracy
# --------------------------------------------------------------------------------------------
def curves_figure(runs: Sequence[PathLike] | PathLike, *, paper: bool = False) -> Figure:
    """Build the accuracy-curve figure (see :func:`plot_curves`) without writing it."""
    opened = open_runs(runs)
    colours = run_palette(len(opened))
    with style():
        fig = new_figure((15.0, 5.4))
        axes = fig.subplots(1, 3, sharex=True)
        for ax, (attack, title) in zip(axes, _PANELS):
            curves = [pick_curve(r.metrics, source="eval", metric="acc", attack=attack) for r in opened]
            specs = {c.attack_label for c in curves if c is not None}
            shared_spec = specs.pop() if len(specs) == 1 else None
            notes: list[str] = []
            for run, curve, colour in zip(opened, curves, colours):
                if curve is None:
                    notes.append(run.name)
                    continue
                what = f"{curve.split}, n={curve.n}" if curve.n else curve.split
                label = f"{run.label} ({what})" if shared_spec else f"{run.label}: {curve.label}"
                s = curve.values
                ax.plot(s.index.to_numpy(), s.to_numpy(), color=colour, linewidth=1.6,
                        marker="." if len(s) <= 60 else None, label=label)
                mark_onsets(ax, run, colour, with_label=attack == "pgd", prefix=f"{run.name}: ")
            if paper and attack == "pgd":
                table = paper_table("fig_pgd_curve_200.csv")
                x = table["epoch"].to_numpy()
                ax.plot(x, table["pgd10"], color="tab:blue", linestyle="--", marker="x", alpha=0.55, linewidth=1.0,
                        label=f"paper PGD-10 training, PGD-20 test acc ({PAPER_E4})")
                ax.plot(x, table["apart"], color="tab:red", linestyle="--", marker="x", alpha=0.55, linewidth=1.0,
                        label=f"paper APART, PGD-20 test acc ({PAPER_E4})")
            add_notes(ax, f"{title}" + (f"\n{shared_spec}" if shared_spec and attack != "none" else ""), notes)
            ax.set_xlabel("epoch")
            ax.set_ylabel("accuracy")
        axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))
        figure_legend(fig, list(axes), ncol=2 if paper else 3)
        fig.suptitle("Accuracy over training" if len(opened) > 1 else f"{opened[0].label}: accuracy over training")
    return fig


def plot_curves(runs: Sequence[PathLike] | PathLike, out: PathLike, *, paper: bool = False) -> list[Path]:
    """Clean, FGSM and PGD accuracy per epoch for one or more runs, one panel each.

    Each run's curve comes from ``source=eval`` on the split that covers the most epochs (ties:
    test, then probe, then val), for the attack spec most of its rows carry; split, n and spec
    are in the legend or panel title. Collapse onsets are marked. ``paper=True`` overlays the
    digitized PGD-10 and APART curves of the paper's 200-epoch figure on the PGD panel. Writes
    ``<out>/curves.png`` and ``.pdf``.
    """
    fig = curves_figure(runs, paper=paper)
    return save_figure(fig, out, "curves")


# --------------------------------------------------------------------------------------------
# APART ψ
# --------------------------------------------------------------------------------------------
_LAYER = re.compile(r"^alpha_b(\d+)$")


def _plot_rows(ax: Any, rows: Any, **kw: Any) -> bool:
    x, y = fractional_epochs(rows)
    if len(x) == 0:
        return False
    ax.plot(x, y, marker="." if len(x) <= 60 else None, **kw)
    return True


def _log_if_wide(ax: Any, values: list[np.ndarray]) -> None:
    vals = np.concatenate([v for v in values if len(v)]) if values else np.array([])
    vals = vals[np.isfinite(vals)]
    if len(vals) and (vals > 0).all() and vals.max() / vals.min() > 30:
        ax.set_yscale("log")


def apart_figure(run: PathLike) -> Figure:
    """Build the APART figure (see :func:`plot_apart`) without writing it."""
    r = open_run(run)
    df = r.metrics
    # The trainer logs a method's internals with source = the method's name (apart, fgsm+).
    apart = df[df["source"] == r.method]
    if apart.empty or r.method not in ("apart", "fgsm+"):
        raise RobustdropError(
            f"{r.path} has no APART metrics; `plot apart` needs a run trained with --method apart or fgsm+"
        )
    with style():
        fig = new_figure((12.5, 8.0))
        (ax_a, ax_b), (ax_lr, ax_d) = fig.subplots(2, 2, sharex=True)

        # (a) input step size and init scale
        notes: list[str] = []
        drawn = []
        for metric, label, colour in (("alpha", "α (input step size)", "tab:blue"),
                                      ("alpha_omega", "α_ω (learned-init scale)", "tab:orange")):
            rows = select(apart, metric=metric)
            if _plot_rows(ax_a, rows, color=colour, label=label):
                drawn.append(rows["value"].to_numpy())
            else:
                notes.append(metric)
        _log_if_wide(ax_a, drawn)
        add_notes(ax_a, "Input perturbation step sizes", notes)
        ax_a.set_ylabel("value")

        # (b) layer-wise step sizes
        layers = sorted({m for m in apart["metric"].unique() if _LAYER.match(m)}, key=lambda m: int(_LAYER.match(m)[1]))
        palette = run_palette(len(layers))
        drawn = []
        for metric, colour in zip(layers, palette):
            rows = select(apart, metric=metric)
            _plot_rows(ax_b, rows, color=colour, label=f"α_b{_LAYER.match(metric)[1]}")
            drawn.append(rows["value"].to_numpy())
        _log_if_wide(ax_b, drawn)
        add_notes(ax_b, "Layer-wise step sizes (one per residual block)", [] if layers else ["alpha_b<i>"])
        if layers:
            ax_b.legend(fontsize="x-small", ncol=2 if len(layers) > 4 else 1)

        # (c) learning rates
        notes = []
        if not _plot_rows(ax_lr, select(apart, metric="lr_psi"), color="tab:purple", label="lr of ψ (lr_psi)"):
            notes.append("lr_psi")
        _plot_rows(ax_lr, select(df, source="train", metric="lr", split="train"), color="grey", linestyle="--",
                   label="model lr")
        add_notes(ax_lr, "Learning rates", notes)
        ax_lr.set_ylabel("learning rate")
        ax_lr.set_xlabel("epoch")

        # (d) size of the perturbations and training accuracy on them
        notes = []
        rows = select(apart, metric="delta_abs_mean")
        eps = rows["epsilon"].dropna()
        if not rows.empty and len(eps) and float(eps.iloc[-1]) > 0:
            rows = rows.assign(value=rows["value"] / rows["epsilon"])
            label = "mean |δ| / ε"
        else:
            label = "mean |δ|"
        if not _plot_rows(ax_d, rows, color="tab:green", label=label):
            notes.append("delta_abs_mean")
        if not _plot_rows(ax_d, select(apart, metric="delta_frac_at_eps"), color="tab:olive", linestyle="--",
                          label="fraction of |δ| = ε"):
            notes.append("delta_frac_at_eps")
        _plot_rows(ax_d, select(df, source="train", metric="acc", split="train"), color="black", linestyle=":",
                   label="train acc on its perturbations")
        add_notes(ax_d, "Perturbation size and training accuracy", notes)
        ax_d.set_ylim(-0.02, 1.05)
        ax_d.set_xlabel("epoch")

        for ax in (ax_a, ax_lr, ax_d):
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize="small")
        for ax in (ax_a, ax_b, ax_lr, ax_d):
            mark_onsets(ax, r, "black", with_label=False)
        fig.suptitle(f"{r.label}: APART perturbation generator ψ over training")
    return fig


def plot_apart(run: PathLike, out: PathLike) -> list[Path]:
    """APART's ψ over training (``source=apart`` rows) in four panels.

    (a) α and α_ω, (b) the layer-wise α_b<i>, (c) lr_psi with the model's lr, (d) mean |δ|/ε,
    the fraction of |δ| at ε and the training accuracy on the training perturbations. Rows logged
    several times per epoch are spread over the epoch. A run without ``source=apart`` rows raises
    :class:`RobustdropError`. Writes ``<out>/apart.png`` and ``.pdf``.
    """
    fig = apart_figure(run)
    return save_figure(fig, out, "apart")
