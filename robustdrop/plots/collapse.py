"""The paper's Figure 2 from logged data: robustness, perturbation strength and collapse onset."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from robustdrop.plots._common import (
    Curve,
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
from robustdrop.plots.runs import PathLike, Run, open_runs

PAPER_FIG2 = "digitized from the paper's Fig. 2"

# Colours of the paper's Figure 2 (used when a single run is drawn).
_SINGLE = {"robust": "tab:orange", "ref": "tab:blue", "noise-sign": "tab:red", "noise-uniform": "tab:pink"}

# Reference-free panels: (panel title, y label, [(legend text, curve getter)]). Every measure is
# logged by the default `strength` diagnostic on the current model; no referee needed.
def _loss_increase(attack: str) -> Callable[[Run], Curve | None]:
    return lambda run: _metric_curve(run, "strength", "loss_increase", attack)


def _loss_gap(run: Run) -> Curve | None:
    """loss_increase(FGSM) − loss_increase(random-sign noise) per epoch: how much more FGSM hurts
    than noise of its size (0 = no stronger than noise); unlike their ratio, finite and smooth
    when the noise term is near 0."""
    fgsm, noise = _loss_increase("fgsm")(run), _loss_increase("noise-sign")(run)
    if fgsm is None or noise is None:
        return None
    gap = (fgsm.values - noise.values).dropna()
    return Curve(gap, "fgsm", fgsm.spec, fgsm.split, fgsm.n) if len(gap) else None


_REFERENCE_FREE: list[tuple[str, str, list[tuple[str, Callable[[Run], Curve | None]]]]] = [
    ("Loss increase on the current model", "CE(x+δ) − CE(x)",
     [("FGSM", _loss_increase("fgsm")), ("random-sign noise", _loss_increase("noise-sign"))]),
    ("FGSM's loss increase minus random noise's (0 = FGSM no stronger than noise)", "Δ loss increase (nats)",
     [("FGSM − random-sign noise", _loss_gap)]),
    ("Alignment", "cosine",
     [("grad alignment cos(∇L(x), ∇L(x+η))", lambda run: _metric_curve(run, "strength", "grad_alignment", None)),
      ("cos(δ_FGSM, δ_PGD)", lambda run: _metric_curve(run, "strength", "cos_fgsm_pgd", None))]),
]
NO_REFEREE_HINT = "no referee curves: add --reference auto (or builtin:quick, or a PGD run) for the paper's measure"


def _line(ax: Any, curve: Curve, **kw: Any) -> None:
    s = curve.values
    if len(s) == 1:
        # a measurement taken once (e.g. the random-noise reference): a constant line
        ax.axhline(float(s.iloc[0]), **{k: v for k, v in kw.items() if k != "marker"})
    else:
        ax.plot(s.index.to_numpy(), s.to_numpy(), **kw)


def _metric_curve(run: Run, source: str, metric: str, attack: str | None) -> Curve | None:
    df = run.metrics
    if attack is None:
        # metrics such as grad_alignment carry whatever attack the diagnostic names; take the modal one
        rows = df[(df["source"] == source) & (df["metric"] == metric)]
        if rows.empty:
            return None
        attack = str(rows["attack"].mode().iloc[0])
    return pick_curve(df, source=source, metric=metric, attack=attack, splits=("probe", "test", "val", "train"))


def _ref_curve(run: Run, attack: str) -> Curve | None:
    return pick_curve(run.metrics, source="strength-ref", metric="ref_acc", attack=attack,
                      splits=("probe", "test", "val"))


def fit_accuracy_axis(ax: Any) -> None:
    """An accuracy axis from 0 to a little above the highest curve (at most 1): the quick preset's
    accuracies live below 0.4, and the strength gap would vanish on a 0..1 axis."""
    tops = [float(np.nanmax(np.asarray(line.get_ydata(), dtype=float))) for line in ax.get_lines()
            if line.get_gid() != "collapse_onset" and len(line.get_ydata())]
    top = max([t for t in tops if np.isfinite(t)], default=1.0)
    ax.set_ylim(-0.01, min(1.0, math.ceil((top + 0.02) * 20) / 20))


def collapse_figure(
    runs: Sequence[PathLike] | PathLike, *, paper: bool = False, reference_free: bool | None = None
) -> Figure:
    """Build the collapse figure (see :func:`plot_collapse`) without writing it."""
    opened = open_runs(runs)
    single = len(opened) == 1
    colours = run_palette(len(opened))
    with_ref = [_ref_curve(run, "fgsm") is not None for run in opened]
    if reference_free is None:
        reference_free = not all(with_ref)
    panels = [p for p in _REFERENCE_FREE if any(get(run) is not None for run in opened for _, get in p[2])] \
        if reference_free else []
    with style():
        nrows = 1 + len(panels)
        fig = new_figure((11.0, 6.2 if nrows == 1 else 5.2 + 2.3 * nrows))
        ratios = [2.0] + [1.0] * (nrows - 1)
        axes = fig.subplots(nrows, 1, sharex=True, squeeze=False, gridspec_kw={"height_ratios": ratios})[:, 0]
        ax = axes[0]
        notes: list[str] = []
        for i, run in enumerate(opened):
            prefix = "" if single else f"{run.label}: "
            tag = "" if single else f"{run.name}: "
            c = colours[i]
            robust = pick_curve(run.metrics, source="eval", metric="acc", attack="pgd", splits=("probe", "test"))
            if robust is not None:
                _line(ax, robust, color=_SINGLE["robust"] if single else c, marker="s", markersize=4,
                      linewidth=1.8, label=f"{prefix}robust acc, {robust.label}")
            else:
                notes.append(f"{tag}PGD acc (eval)")
            ref = _ref_curve(run, "fgsm")
            if ref is not None:
                _line(ax, ref, color=_SINGLE["ref"] if single else c, marker="o", markersize=4, linestyle=":",
                      linewidth=1.6,
                      label=f"{prefix}reference model on {ref.attack_label} δ (strength, lower = stronger), "
                            f"{ref.split}")
            elif any(with_ref):
                notes.append(f"{tag}referee (strength-ref)")
            for attack in ("noise-sign", "noise-uniform"):
                noise = _ref_curve(run, attack)
                if noise is not None:
                    _line(ax, noise, color=_SINGLE[attack] if single else c, linestyle="--" if attack == "noise-sign"
                          else (0, (1, 3)), linewidth=1.3, alpha=0.85,
                          label=f"{prefix}reference model on {noise.attack_label}")
            for a in axes:
                mark_onsets(a, run, "black" if single else c, with_label=a is ax, prefix=prefix)
        if paper:
            _paper_overlay(ax)
        ax.set_ylabel("accuracy")
        fit_accuracy_axis(ax)
        title = "Robustness and perturbation strength per epoch"
        if single:
            title = f"{opened[0].label}: {title[0].lower()}{title[1:]}"
        if not any(with_ref):
            title += "\n" + NO_REFEREE_HINT
        add_notes(ax, title, notes)
        figure_legend(fig, [ax])

        styles = ["-", "--", ":"]
        for a, (panel_title, ylabel, wanted) in zip(axes[1:], panels):
            for i, run in enumerate(opened):
                prefix = "" if single else f"{run.name}: "
                for j, (text, get) in enumerate(wanted):
                    curve = get(run)
                    if curve is not None:
                        colour = colours[i] if not single else run_palette(len(wanted))[j]
                        _line(a, curve, color=colour, linestyle=styles[j % 3], marker=".", label=f"{prefix}{text}")
            if ylabel.startswith("Δ"):
                a.axhline(0.0, color="grey", linewidth=0.8, linestyle="--", label="_nolegend_")
            a.set_ylabel(ylabel)
            a.set_title(panel_title, fontsize="medium")
            if a.get_legend_handles_labels()[0]:
                a.legend(fontsize="small", loc="best")
        axes[-1].set_xlabel("epoch")
        axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig


def _paper_overlay(ax: Any) -> None:
    table = paper_table("fig2_fgsm_curve.csv")
    x = table["epoch"].to_numpy()
    kw = {"linewidth": 1.0, "alpha": 0.55, "markersize": 4}
    ax.plot(x, table["orange_fgsm_pgd20"], color="tab:orange", marker="x", linestyle="--",
            label=f"paper FGSM-AT, PGD-20 acc ({PAPER_FIG2})", **kw)
    ax.plot(x, table["purple_fgsmplus_pgd20"], color="tab:purple", marker="^", linestyle="--",
            label=f"paper FGSM+, PGD-20 acc ({PAPER_FIG2})", **kw)
    ax.plot(x, table["blue_ref_acc_fgsm"], color="tab:blue", marker="x", linestyle="--",
            label=f"paper referee on FGSM δ ({PAPER_FIG2})", **kw)
    ax.axhline(float(table["red_ref_acc_random_noise"].iloc[0]), color="tab:red", linewidth=1.0, alpha=0.55,
               label=f"paper referee on random noise ({PAPER_FIG2})")


def plot_collapse(
    runs: Sequence[PathLike] | PathLike,
    out: PathLike,
    *,
    paper: bool = False,
    reference_free: bool | None = None,
) -> list[Path]:
    """Figure 2 from logged data; writes ``<out>/collapse.png`` and ``.pdf`` and returns their paths.

    Per epoch and run: the white-box PGD accuracy (``source=eval``, the split among probe/test
    that covers the most epochs; its attack spec, n and split are in the legend), the frozen
    reference model's accuracy on FGSM perturbations crafted against the run (``strength-ref``),
    and on random noise, plus a dash-dot line at each ``collapse_onset`` event; the accuracy axis
    is fitted to the data. Below it, the measures that need no referee (``source=strength``, on
    by default): loss increase of FGSM and random-sign noise, their difference, gradient alignment
    and cos(δ_FGSM, δ_PGD) — drawn when ``reference_free`` is True, or (None, the default) when a
    run has no referee curves; panels nothing was logged for are left out. With ``paper`` the
    digitized curves of the paper's Fig. 2 are overlaid. A measurement only some runs logged is listed in the title.
    """
    fig = collapse_figure(runs, paper=paper, reference_free=reference_free)
    return save_figure(fig, out, "collapse")
