"""The paper's Figure 1: the stored perturbations of a few fixed probe images, one row per epoch."""

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
from robustdrop.plots.runs import PathLike, Run, array_epochs, check_epochs, open_run

KIND = "snapshots"


def default_epochs(available: Sequence[int], onset: int | None) -> list[int]:
    """The paper's choice: the last epoch before the collapse onset and the last epoch.

    Without an onset: the first and the last stored epoch.
    """
    available = sorted(available)
    if not available:
        return []
    if onset is not None:
        before = [e for e in available if e < onset]
        picks = ([before[-1]] if before else []) + [available[-1]]
    else:
        picks = [available[0], available[-1]]
    return sorted(set(picks))


def _onset_role(epoch: int, onset: int | None) -> str:
    if onset is None:
        return ""
    if epoch < onset:
        return "before onset"
    return "onset" if epoch == onset else "after onset"


def _to_hwc(a: np.ndarray) -> np.ndarray:
    return np.transpose(a, (1, 2, 0))


def _class_name(snap: dict[str, np.ndarray], k: int) -> str:
    labels = snap.get("labels")
    if labels is None:
        return f"#{k}"
    label = int(np.asarray(labels)[k])
    classes = snap.get("classes")
    if classes is not None and np.asarray(classes).ndim == 1 and 0 <= label < len(classes):
        return str(np.asarray(classes)[label]).capitalize()
    return f"class {label}"


def perturbations_figure(run: PathLike, epochs: Sequence[int] | None = None, *, max_images: int = 8) -> Figure:
    """Build the perturbation grid (see :func:`plot_perturbations`) without writing it."""
    r: Run = open_run(run)
    stored = array_epochs(r, KIND)
    if not stored:
        raise RobustdropError(
            f"{r.path} has no snapshots (arrays/{KIND}/epoch_XXXX.npz); train with the snapshots diagnostic on"
        )
    onsets = r.onset_epochs()
    onset = onsets[0] if onsets else None
    chosen = [int(e) for e in epochs] if epochs else default_epochs(list(stored), onset)
    check_epochs(r, KIND, chosen, list(stored))
    snaps = {e: r.store.load_arrays(KIND, stored[e]) for e in chosen}
    first = snaps[chosen[0]]
    images = np.asarray(first["images"])
    if images.ndim != 4:
        raise RobustdropError(f"snapshot {stored[chosen[0]]} in {r.path} has images of shape {images.shape}, "
                              "expected K×C×H×W; it was not written by the snapshots diagnostic")
    k_show = min(images.shape[0], max_images)
    channels = images.shape[1]
    eps = float(np.asarray(first.get("epsilon", np.nan)))
    cmap = "gray"

    with style():
        nrows = 1 + len(chosen)
        fig = new_figure((1.55 * k_show + 2.0, 1.65 * nrows + 0.6))
        axes = fig.subplots(nrows, k_show, squeeze=False)
        for k in range(k_show):
            ax = axes[0, k]
            img = images[k]
            if channels == 1:
                ax.imshow(img[0], cmap=cmap, vmin=0, vmax=255)
            else:
                ax.imshow(_to_hwc(img))
            ax.set_title(_class_name(first, k), fontsize="medium")
        axes[0, 0].set_ylabel("original image")
        for row, epoch in enumerate(chosen, start=1):
            snap = snaps[epoch]
            e_eps = float(np.asarray(snap.get("epsilon", eps)))
            delta = np.asarray(snap["delta"], dtype=np.float32)
            scale = e_eps if e_eps > 0 else max(float(np.abs(delta).max()), 1e-12)
            mapped = np.clip((delta + scale) / (2.0 * scale), 0.0, 1.0)
            for k in range(k_show):
                ax = axes[row, k]
                if k >= mapped.shape[0]:
                    ax.set_visible(False)
                    continue
                if channels == 1:
                    ax.imshow(mapped[k, 0], cmap=cmap, vmin=0, vmax=1)
                else:
                    ax.imshow(_to_hwc(mapped[k]))
            frac = float(np.mean(np.abs(delta[:k_show]) >= 0.999 * scale))
            role = _onset_role(epoch, onset)
            axes[row, 0].set_ylabel(f"epoch {epoch}" + (f"\n({role})" if role else "") + f"\n|δ|=ε: {frac:.0%}")
        for ax in axes.ravel():
            ax.set_xticks([])
            ax.set_yticks([])
            ax.grid(False)
        sm = ScalarMappable(norm=Normalize(-eps, eps), cmap=cmap)
        cbar = fig.colorbar(sm, ax=axes[1:, :].ravel().tolist(), shrink=0.9, aspect=15, pad=0.02)
        cbar.set_ticks([-eps, 0.0, eps])
        cbar.set_ticklabels([f"−{eps:.3f}", "0.000", f"+{eps:.3f}"])
        cbar.set_label("δ per channel (−ε → 0, +ε → 1)")
        attack = str(np.asarray(first["attack"])) if "attack" in first else "stored perturbation"
        fig.suptitle(f"{r.label}: {attack} δ at epochs {', '.join(map(str, chosen))} (ε={format_eps(eps)})")
    return fig


def plot_perturbations(run: PathLike, out: PathLike, epochs: Sequence[int] | None = None) -> list[Path]:
    """Figure 1: images of the probe snapshot and their perturbations per epoch.

    Reads ``arrays/snapshots/epoch_XXXX.npz``. Row 1 shows the images with their class names;
    each further row one requested epoch's δ, each channel mapped [−ε, ε] → [0, 1] (grey for
    one-channel data), with a colour bar ±ε. ``epochs=None`` picks the last epoch before the
    collapse onset and the last stored epoch (first and last without an onset). An epoch without a
    snapshot raises :class:`RobustdropError` listing the stored ones. Writes
    ``<out>/perturbations.png`` and ``.pdf``.
    """
    fig = perturbations_figure(run, epochs)
    return save_figure(fig, out, "perturbations")
