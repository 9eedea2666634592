"""Small synthetic run directories with the documented files, written through ``RunStore``.

For tests of anything that reads runs (plots, tables, analyses). No training happens: every
number follows a closed-form curve (the ``*_acc`` functions below), so a test can compute the
value it expects. Layout and vocabulary follow ``docs/architecture.md``.

    from helpers_runs import collapsing_fgsm_run, stable_pgd_run, apart_run  # (or tests.helpers_runs)
    fgsm = collapsing_fgsm_run(tmp_path)          # runs/fgsm, onset at epoch 8 of 12
    pgd = stable_pgd_run(tmp_path)                # runs/pgd10, PGD-10 training, val split
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from robustdrop.engine import make_config
from robustdrop.store import RunStore, metric_row

EPS = 8 / 255
PGD_SPEC = {"epsilon": EPS, "steps": 20, "step_size": 2 / 255, "restarts": 1}
FGSM_SPEC = {"epsilon": EPS, "steps": 1, "step_size": EPS, "restarts": 0}
NOISE_SPEC = {"epsilon": EPS, "steps": 0, "step_size": math.nan, "restarts": 0}
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
PROBE_N, TEST_N, VAL_N = 1000, 10000, 500


# --------------------------------------------------------------------------------------------
# The closed-form curves (probe split; the test split, logged at the last epoch only, is
# probe - TEST_OFFSET; the val split is given separately)
# --------------------------------------------------------------------------------------------
TEST_OFFSET = 0.005


def collapse_pgd_acc(epoch: int, onset: int | None) -> float:
    """PGD accuracy of the collapsing run: rises 0.03/epoch, 0.01 at the onset, 0 after."""
    if onset is None or epoch < onset:
        return 0.10 + 0.03 * epoch
    return 0.01 if epoch == onset else 0.0


def collapse_fgsm_acc(epoch: int, onset: int | None) -> float:
    """FGSM accuracy: above PGD before the onset, high (FGSM no longer hurts) after it."""
    return 0.15 + 0.03 * epoch if onset is None or epoch < onset else 0.85


def collapse_clean_acc(epoch: int, onset: int | None) -> float:
    return 0.40 + 0.03 * epoch if onset is None or epoch < onset else 0.88


def stable_pgd_acc(epoch: int) -> float:
    """PGD accuracy of the stable run on probe/test: rises monotonically."""
    return 0.15 + 0.02 * epoch


def stable_val_pgd_acc(epoch: int) -> float:
    """PGD accuracy of the stable run on val: peaks at epoch 6 (robust overfitting)."""
    return 0.40 - 0.01 * abs(epoch - 6)


def stable_fgsm_acc(epoch: int) -> float:
    return 0.20 + 0.02 * epoch


def stable_clean_acc(epoch: int) -> float:
    return 0.45 + 0.02 * epoch


# --------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------
def _eval_rows(epoch: int, step: int, split: str, n: int, clean: float, fgsm: float, pgd: float) -> list[dict]:
    return [
        metric_row(epoch, step, split, "acc", clean, attack="none", n=n, source="eval"),
        metric_row(epoch, step, split, "acc", fgsm, attack="fgsm", n=n, source="eval", **FGSM_SPEC),
        metric_row(epoch, step, split, "acc", pgd, attack="pgd", n=n, source="eval", **PGD_SPEC),
        metric_row(epoch, step, split, "loss", 1.0 - clean, attack="none", n=n, source="eval"),
    ]


def _snapshot_delta(rng: np.random.Generator, images: np.ndarray, collapsed: bool) -> np.ndarray:
    """Structured δ (object vs background) before the collapse, random signs after it."""
    k, c, h, w = images.shape
    if collapsed:
        signs = rng.choice([-1.0, 1.0], size=(k, c, h, w))
    else:
        yy, xx = np.mgrid[0:h, 0:w]
        blob = ((yy - h / 2) ** 2 + (xx - w / 2) ** 2) < (min(h, w) / 3) ** 2
        signs = np.where(blob, 1.0, -1.0)[None, None].repeat(k, 0).repeat(c, 1)
        signs[:, 1] *= -1  # vary the channels so the colours are not all grey
    return (EPS * signs).astype(np.float16)


def write_synthetic_run(
    runs_dir: str | Path,
    name: str,
    *,
    method: str = "fgsm",
    epochs: int = 12,
    onset: int | None = None,
    train_attack: str | None = None,
    train_steps: int = 1,
    curves: str = "collapse",
    val: bool = False,
    strength: bool = True,
    referee: bool = True,
    snapshot_epochs: Sequence[int] = (),
    landscape_epochs: Sequence[int] = (),
    apart: bool = False,
    train_seconds: float = 10.0,
    eval_seconds: float = 2.0,
    passes: tuple[int, int] = (2, 2),
    steps_per_epoch: int = 20,
    model: str = "preactresnet18",
    dataset: str = "cifar10",
    seed: int = 0,
) -> Path:
    """Write ``<runs_dir>/<name>/`` and return its path.

    * ``curves``: ``"collapse"`` (the ``collapse_*_acc`` functions, with ``onset``) or
      ``"stable"`` (the ``stable_*_acc`` functions).
    * eval rows (``source=eval``): probe every epoch 0..epochs (clean, FGSM, PGD-20 n=1000),
      test at the last epoch (n=10000, probe − ``TEST_OFFSET``), val every epoch if ``val``.
    * train rows: ``loss``, ``acc`` under ``train_attack`` (default: ``method``) with
      ``train_steps``, ``lr``, ``time_train_s``, ``time_eval_s``, ``time_diag_s``; ``cost`` rows
      ``passes_forward``/``passes_backward``.
    * ``strength``: ``strength-ref`` ``ref_acc`` (fgsm every epoch; noise-sign once at epoch 0;
      noise-uniform every epoch) and ``strength`` rows (loss_increase, strength_ratio,
      grad_alignment, cos_fgsm_pgd); ``collapse_score`` and a ``collapse_onset`` event at ``onset``;
      ``referee=False`` leaves the ``strength-ref`` rows out (a run without ``--reference``).
    * ``snapshot_epochs`` / ``landscape_epochs``: arrays ``snapshots``/``landscape`` ``epoch_XXXX``.
    * ``apart``: ``source=apart`` rows, three per epoch (alpha, alpha_omega, alpha_b1..4, lr_psi,
      delta_abs_mean, delta_frac_at_eps).
    """
    store = RunStore.create(runs_dir, name, overwrite=True)
    rng = np.random.default_rng(seed)
    train_attack = train_attack or method
    store.write_json(RunStore.CONFIG, {
        "name": name, "method": method, "model": model, "dataset": dataset, "epochs": epochs,
        "epsilon": EPS, "seed": seed, "train_attack_steps": train_steps,
    })
    store.write_json(RunStore.MANIFEST, {"seed": seed, "synthetic": True, "command": "tests/helpers_runs.py"})

    def accs(epoch: int) -> tuple[float, float, float]:
        if curves == "stable":
            return stable_clean_acc(epoch), stable_fgsm_acc(epoch), stable_pgd_acc(epoch)
        return collapse_clean_acc(epoch, onset), collapse_fgsm_acc(epoch, onset), collapse_pgd_acc(epoch, onset)

    collapsed = lambda e: onset is not None and e >= onset  # noqa: E731
    rows: list[dict[str, Any]] = []
    for epoch in range(0, epochs + 1):
        step = epoch * steps_per_epoch
        clean, fgsm, pgd = accs(epoch)
        rows += _eval_rows(epoch, step, "probe", PROBE_N, clean, fgsm, pgd)
        if epoch == epochs:
            rows += _eval_rows(epoch, step, "test", TEST_N, max(clean - TEST_OFFSET, 0.0), max(fgsm - TEST_OFFSET, 0.0),
                               max(pgd - TEST_OFFSET, 0.0))
        if val:
            v = stable_val_pgd_acc(epoch)
            rows += _eval_rows(epoch, step, "val", VAL_N, clean - 0.01, fgsm - 0.01, v)
        if epoch >= 1:
            tspec = {"epsilon": EPS, "steps": train_steps, "step_size": EPS if train_steps == 1 else 2 / 255,
                     "restarts": 0}
            rows += [
                metric_row(epoch, step, "train", "loss", 1.5 - 0.05 * epoch, attack=train_attack, source="train",
                           **tspec),
                metric_row(epoch, step, "train", "acc", 0.3 + 0.02 * epoch if not collapsed(epoch) else 0.9,
                           attack=train_attack, source="train", **tspec),
                metric_row(epoch, step, "train", "lr", 0.2 * min(epoch, epochs - epoch + 1) / epochs, source="train"),
                metric_row(epoch, step, "train", "time_train_s", train_seconds, source="train"),
                metric_row(epoch, step, "train", "time_eval_s", eval_seconds, source="train"),
                metric_row(epoch, step, "train", "time_diag_s", 1.0, source="train"),
                metric_row(epoch, step, "train", "passes_forward", passes[0], source="cost"),
                metric_row(epoch, step, "train", "passes_backward", passes[1], source="cost"),
            ]
        if strength:
            ref = 0.79 if collapsed(epoch) else 0.75 - 0.012 * epoch
            rows += [] if not referee else [
                metric_row(epoch, step, "probe", "ref_acc", ref, attack="fgsm", n=PROBE_N, source="strength-ref",
                           **FGSM_SPEC),
                metric_row(epoch, step, "probe", "ref_acc", 0.80, attack="noise-uniform", n=PROBE_N,
                           source="strength-ref", **NOISE_SPEC),
            ]
            if epoch == 0 and referee:
                rows.append(metric_row(0, 0, "probe", "ref_acc", 0.794, attack="noise-sign", n=PROBE_N,
                                       source="strength-ref", **NOISE_SPEC))
            inc_fgsm = 0.05 if collapsed(epoch) else 1.0 + 0.02 * epoch
            inc_noise = 0.04
            rows += [
                metric_row(epoch, step, "probe", "loss_increase", inc_fgsm, attack="fgsm", n=PROBE_N,
                           source="strength", **FGSM_SPEC),
                metric_row(epoch, step, "probe", "loss_increase", inc_noise, attack="noise-sign", n=PROBE_N,
                           source="strength", **NOISE_SPEC),
                metric_row(epoch, step, "probe", "strength_ratio", inc_fgsm / inc_noise, attack="fgsm", n=PROBE_N,
                           source="strength", **FGSM_SPEC),
                metric_row(epoch, step, "probe", "grad_alignment", 0.1 if collapsed(epoch) else 0.8, attack="none",
                           n=PROBE_N, source="strength", epsilon=EPS),
                metric_row(epoch, step, "probe", "cos_fgsm_pgd", 0.05 if collapsed(epoch) else 0.7, attack="fgsm",
                           n=PROBE_N, source="strength", **FGSM_SPEC),
                metric_row(epoch, step, "probe", "collapse_score", 1.0 if collapsed(epoch) else 0.1,
                           source="collapse"),
            ]
        if apart and epoch >= 1:
            for j in range(3):
                s = step - steps_per_epoch + (j + 1) * steps_per_epoch // 3
                t = epoch - 1 + (j + 1) / 3
                rows += [
                    metric_row(epoch, s, "train", "alpha", 1e-4 * 3.0 ** t, source="apart"),
                    metric_row(epoch, s, "train", "alpha_omega", 0.5 + 0.01 * t, source="apart"),
                    metric_row(epoch, s, "train", "lr_psi", 0.01, source="apart"),
                    metric_row(epoch, s, "train", "delta_abs_mean", EPS * min(0.2 + 0.05 * t, 1.0), source="apart",
                               epsilon=EPS),
                    metric_row(epoch, s, "train", "delta_frac_at_eps", min(0.1 + 0.05 * t, 1.0), source="apart",
                               epsilon=EPS),
                ]
                rows += [metric_row(epoch, s, "train", f"alpha_b{i}", 1e-3 * i * (1 + 0.1 * t), source="apart")
                         for i in range(1, 5)]
    store.log_metrics(rows)
    if onset is not None:
        store.log_event("collapse_onset", epoch=onset, step=onset * steps_per_epoch,
                        signals={"pgd_drop": 0.3, "strength_ratio": 1.25}, action="warn")

    images = rng.integers(0, 256, size=(4, 3, 8, 8), dtype=np.uint8)
    labels = np.array([9, 2, 0, 8])  # truck, bird, airplane, ship: the paper's Fig. 1 columns
    for epoch in snapshot_epochs:
        store.save_arrays("snapshots", f"epoch_{epoch:04d}", images=images, labels=labels,
                          delta=_snapshot_delta(rng, images, collapsed(epoch)), epsilon=EPS,
                          classes=np.array(CIFAR10_CLASSES))
    t = np.linspace(0.0, 1.0, 11)
    grid = np.linspace(-1.0, 1.0, 9)
    uu, vv = np.meshgrid(grid, grid, indexing="ij")
    for epoch in landscape_epochs:
        curvature = 6.0 if collapsed(epoch) else 1.0
        store.save_arrays(
            "landscape", f"epoch_{epoch:04d}", t=t,
            loss_fgsm=0.5 + (0.2 if collapsed(epoch) else 1.5) * t + curvature * t ** 2 * 0.3,
            loss_noise=0.5 + 0.05 * t,
            grid_u=grid, grid_v=grid,
            loss_2d=0.5 + 0.8 * uu + curvature * (uu ** 2 + 0.2 * vv ** 2),
            epsilon=EPS,
        )
    store.flush()
    return store.path


def collapsing_fgsm_run(runs_dir: str | Path, name: str = "fgsm", *, epochs: int = 12, onset: int = 8,
                        **kw: Any) -> Path:
    """An FGSM run that collapses at ``onset``, with snapshots and landscapes around it."""
    kw.setdefault("snapshot_epochs", (onset - 2, onset - 1, epochs))
    kw.setdefault("landscape_epochs", tuple(range(2, epochs + 1, 2)) + ((onset,) if onset % 2 else ()))
    return write_synthetic_run(runs_dir, name, method="fgsm", epochs=epochs, onset=onset, curves="collapse",
                               train_seconds=10.0, passes=(2, 2), **kw)


def stable_pgd_run(runs_dir: str | Path, name: str = "pgd10", *, epochs: int = 12, **kw: Any) -> Path:
    """A PGD-10 run that does not collapse; its val PGD accuracy peaks at epoch 6."""
    return write_synthetic_run(runs_dir, name, method="pgd", epochs=epochs, onset=None, curves="stable",
                               train_attack="pgd", train_steps=10, val=True, train_seconds=40.0, passes=(11, 11),
                               **kw)


def apart_run(runs_dir: str | Path, name: str = "apart", *, epochs: int = 6, **kw: Any) -> Path:
    """An APART run with ``source=apart`` rows, three per epoch."""
    return write_synthetic_run(runs_dir, name, method="apart", epochs=epochs, curves="stable", apart=True,
                               train_seconds=12.0, passes=(2, 2), **kw)


def small_config(**overrides):
    """The config of a small real training (cnn1, 4 epochs, tiny probe/validation, no diagnostics),
    for the tests that train and compare runs (preemption, extension); ``overrides`` replace values."""
    values = dict(model="cnn1", width=4, epochs=4, batch_size=64, val_size=64, probe_size=64, lr=0.003,
                  optimizer="adam", weight_decay=5e-4, lr_peak_at=0.4, eval_pgd_steps=2, eval_batch_size=128,
                  diagnostics=["none"], epsilon=8 / 255, threads=1)
    values.update(overrides)
    return make_config(**values)
