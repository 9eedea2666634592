"""The paper's Figure 2 from logged data: robustness, perturbation strength and collapse onset."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

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

# Reference-free panels: (panel title, y label, [(source, metric, attack, legend text)]).
_REFERENCE_FREE = [
    (
        "Loss increase on the current model",
        "CE(x+δ) − CE(x)",
        [("strength", "loss_increase", "fgsm", "FGSM"), ("strength", "loss_increase", "noise-sign", "random-sign noise")],
    ),
    (
        "Strength ratio (FGSM / random-sign loss increase; 1 = as weak as noise)",
        "ratio",
        [("strength", "strength_ratio", None, "strength ratio")],
    ),
    (
        "Alignment",
        "cosine",
        [
            ("strength", "grad_alignment", None, "grad alignment cos(∇L(x), ∇L(x+η))"),
            ("strength", "cos_fgsm_pgd", None, "cos(δ_FGSM, δ_PGD)"),
        ],
    ),
]


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
        # metrics such as strength_ratio carry whatever attack the diagnostic names; take the modal one
        rows = df[(df["source"] == source) & (df["metric"] == metric)]
        if rows.empty:
            return None
        attack = str(rows["attack"].mode().iloc[0])
    return pick_curve(df, source=source, metric=metric, attack=attack, splits=("probe", "test", "val", "train"))


def collapse_figure(
    runs: Sequence[PathLike] | PathLike, *, paper: bool = False, reference_free: bool = False
) -> Figure:
    """Build the collapse figure (see :func:`plot_collapse`) without writing it."""
    opened = open_runs(runs)
    single = len(opened) == 1
    colours = run_palette(len(opened))
    with style():
        nrows = 1 + (len(_REFERENCE_FREE) if reference_free else 0)
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
            ref = pick_curve(run.metrics, source="strength-ref", metric="ref_acc", attack="fgsm",
                             splits=("probe", "test", "val"))
            if ref is not None:
                _line(ax, ref, color=_SINGLE["ref"] if single else c, marker="o", markersize=4, linestyle=":",
                      linewidth=1.6,
                      label=f"{prefix}reference model on {ref.attack_label} δ (strength, lower = stronger), "
                            f"{ref.split}")
            else:
                notes.append(f"{tag}ref_acc fgsm (strength-ref)")
            noise_found = False
            for attack in ("noise-sign", "noise-uniform"):
                noise = pick_curve(run.metrics, source="strength-ref", metric="ref_acc", attack=attack,
                                   splits=("probe", "test", "val"))
                if noise is None:
                    continue
                noise_found = True
                _line(ax, noise, color=_SINGLE[attack] if single else c, linestyle="--" if attack == "noise-sign"
                      else (0, (1, 3)), linewidth=1.3, alpha=0.85,
                      label=f"{prefix}reference model on {noise.attack_label}")
            if not noise_found:
                notes.append(f"{tag}ref_acc noise (strength-ref)")
            for a in axes:
                mark_onsets(a, run, "black" if single else c, with_label=a is ax, prefix=prefix)
        if paper:
            _paper_overlay(ax)
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.02, 1.0)
        title = "Robustness and perturbation strength per epoch"
        if single:
            title = f"{opened[0].label}: {title[0].lower()}{title[1:]}"
        add_notes(ax, title, notes)
        figure_legend(fig, [ax])

        if reference_free:
            for a, (panel_title, ylabel, wanted) in zip(axes[1:], _REFERENCE_FREE):
                panel_notes: list[str] = []
                styles = ["-", "--", ":"]
                for i, run in enumerate(opened):
                    prefix = "" if single else f"{run.name}: "
                    for j, (source, metric, attack, text) in enumerate(wanted):
                        curve = _metric_curve(run, source, metric, attack)
                        if curve is None:
                            panel_notes.append(f"{prefix}{metric}" + (f" {attack}" if attack else ""))
                            continue
                        colour = colours[i] if not single else run_palette(len(wanted))[j]
                        _line(a, curve, color=colour, linestyle=styles[j % 3], marker=".", label=f"{prefix}{text}")
                if "ratio" in ylabel:
                    a.axhline(1.0, color="grey", linewidth=0.8, linestyle="--", label="_nolegend_")
                a.set_ylabel(ylabel)
                add_notes(a, panel_title, panel_notes)
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
    reference_free: bool = False,
) -> list[Path]:
    """Figure 2 from logged data; writes ``<out>/collapse.png`` and ``.pdf`` and returns their paths.

    Per epoch and run: the white-box PGD accuracy (``source=eval``, the split among probe/test
    that covers the most epochs; its attack spec, n and split are in the legend), the frozen
    reference model's accuracy on FGSM perturbations crafted against the run (``strength-ref``),
    and on random noise, plus a dash-dot line at each ``collapse_onset`` event. With
    ``reference_free`` three more panels show the measures that need no reference model
    (``source=strength``). With ``paper`` the digitized curves of the paper's Fig. 2 are overlaid.
    Measurements a run did not log are listed in the panel title instead of drawn.
    """
    fig = collapse_figure(runs, paper=paper, reference_free=reference_free)
    return save_figure(fig, out, "collapse")
