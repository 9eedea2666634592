"""Input-space loss landscapes across epochs: 1-D profiles and 2-D contours."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from robustdrop.errors import RobustdropError
from robustdrop.formatting import format_eps
from robustdrop.plots._common import new_figure, save_figure, style
from robustdrop.plots.runs import PathLike, array_epochs, check_epochs, open_run

KIND = "landscape"


def contour_epochs(epochs: Sequence[int], onset: int | None) -> list[tuple[int, str]]:
    """Up to three epochs for the 2-D panels, each with its role.

    With an onset: the last epoch before it, the first at or after it, and the last epoch after
    that. Without: first, middle and last.
    """
    epochs = sorted(set(int(e) for e in epochs))
    if len(epochs) <= 1:
        return [(e, "only stored epoch") for e in epochs]
    picks: list[tuple[int, str]] = []
    if onset is not None:
        before = [e for e in epochs if e < onset]
        at = [e for e in epochs if e >= onset]
        if before:
            picks.append((before[-1], "before onset"))
        if at:
            picks.append((at[0], "at onset" if at[0] == onset else "first after onset"))
            if len(at) > 1:
                picks.append((at[-1], "after onset"))
        if len(picks) >= 2:
            return picks
    first, middle, last = epochs[0], epochs[len(epochs) // 2], epochs[-1]
    picks = [(first, "first"), (middle, "middle"), (last, "last")]
    seen: set[int] = set()
    return [(e, role) for e, role in picks if not (e in seen or seen.add(e))]


def landscape_figure(run: PathLike, epochs: Sequence[int] | None = None) -> Figure:
    """Build the landscape figure (see :func:`plot_landscape`) without writing it."""
    r = open_run(run)
    stored = array_epochs(r, KIND)
    if not stored:
        raise RobustdropError(
            f"{r.path} has no loss landscapes (arrays/{KIND}/epoch_XXXX.npz); train with the landscape diagnostic on"
        )
    chosen = sorted({int(e) for e in epochs}) if epochs else list(stored)
    check_epochs(r, "landscape", chosen, list(stored))
    data = {e: r.store.load_arrays(KIND, stored[e]) for e in chosen}
    onsets = r.onset_epochs()
    onset = onsets[0] if onsets else None
    panels = contour_epochs(chosen, onset)
    panels = [(e, role) for e, role in panels if {"grid_u", "grid_v", "loss_2d"} <= data[e].keys()]

    with style():
        fig = new_figure((max(11.0, 3.8 * max(len(panels), 1)), 8.2 if panels else 4.2))
        top, bottom = fig.subfigures(2, 1, height_ratios=[1.0, 1.05]) if panels else (fig, None)
        ax_f, ax_n = top.subplots(1, 2, sharey=True)
        norm = Normalize(min(chosen), max(chosen) if max(chosen) > min(chosen) else min(chosen) + 1)
        cmap = "viridis"
        sm = ScalarMappable(norm=norm, cmap=cmap)
        eps = float(np.asarray(data[chosen[0]].get("epsilon", np.nan)))
        for epoch in chosen:
            d = data[epoch]
            colour = sm.to_rgba(epoch)
            is_onset = onset is not None and epoch == onset
            kw = {"color": colour, "linewidth": 2.6 if is_onset else 1.4,
                  "linestyle": "--" if is_onset else "-"}
            label = f"epoch {epoch}" + (" (collapse onset)" if is_onset else "")
            if "loss_fgsm" in d:
                ax_f.plot(np.asarray(d["t"]), np.asarray(d["loss_fgsm"]), label=label, **kw)
            if "loss_noise" in d:
                ax_n.plot(np.asarray(d["t"]), np.asarray(d["loss_noise"]), label=label, **kw)
        ax_f.set_title("along the FGSM direction: L(x + t·δ_FGSM)", fontsize="medium")
        ax_n.set_title("along a random-sign direction: L(x + t·δ_noise)", fontsize="medium")
        for ax in (ax_f, ax_n):
            ax.set_xlabel(f"t (step along the direction, ‖δ‖∞ = ε = {format_eps(eps)})")
        ax_f.set_ylabel("cross-entropy loss (probe mean)")
        cbar = top.colorbar(sm, ax=[ax_f, ax_n], pad=0.01, aspect=25)
        cbar.set_label("epoch")
        if onset is not None:
            cbar.ax.axhline(onset, color="red", linewidth=2)
        if len(chosen) <= 6:
            ax_n.legend(fontsize="small")
        top.suptitle(f"{r.label}: input-space loss profiles" + (f" (collapse onset at epoch {onset})" if onset else ""))

        if bottom is not None:
            axes = bottom.subplots(1, len(panels), squeeze=False)[0]
            for ax, (epoch, role) in zip(axes, panels):
                d = data[epoch]
                u = np.asarray(d["grid_u"], dtype=float)
                v = np.asarray(d["grid_v"], dtype=float)
                z = np.asarray(d["loss_2d"], dtype=float)
                # loss_2d[i, j] is the loss at (grid_u[i], grid_v[j]); contour wants rows along v
                cs = ax.contourf(u, v, z.T, levels=14, cmap="magma")
                ax.contour(u, v, z.T, levels=cs.levels, colors="white", linewidths=0.4, alpha=0.6)
                ax.plot([0], [0], marker="+", color="cyan", markersize=10, mew=2, label="x (clean)")
                ax.set_title(f"epoch {epoch} ({role})", fontsize="medium")
                ax.set_xlabel("u: FGSM direction")
                ax.set_ylabel("v: random-sign direction")
                ax.grid(False)
                cb = bottom.colorbar(cs, ax=ax, pad=0.01)
                cb.set_label("loss")
            bottom.suptitle("2-D loss surface around the probe inputs")
    return fig


def plot_landscape(run: PathLike, out: PathLike, epochs: Sequence[int] | None = None) -> list[Path]:
    """Loss landscapes from ``arrays/landscape/epoch_XXXX.npz``.

    Top: 1-D loss profiles along the FGSM and the random-sign direction, one line per epoch
    coloured by epoch (the onset epoch dashed and thicker). Bottom: 2-D contour panels for up to
    three epochs — before, at and after the collapse onset if the run has one, else first, middle
    and last. ``epochs`` restricts both to those epochs (missing ones raise
    :class:`RobustdropError` listing what is stored). Writes ``<out>/landscape.png`` and ``.pdf``.
    """
    fig = landscape_figure(run, epochs)
    return save_figure(fig, out, "landscape")
