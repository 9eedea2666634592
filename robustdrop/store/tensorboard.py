"""Metric rows as TensorBoard scalars (the optional extra ``pip install 'robustdrop[tensorboard]'``).

One scalar per metric row, at ``global_step`` = the row's optimizer ``step``; the tag says where
the number comes from, unambiguously:

* the engine's own rows (``source`` = ``train``, ``eval``, ``cost``): ``{split}/{metric}[/{attack}]``,
  e.g. ``probe/acc/pgd``, ``probe/acc/clean``, ``test/loss/fgsm``, ``train/loss/fgsm`` (the
  training perturbation: the method's name), ``train/lr``, ``train/time_train_s``. A run fixes
  one spec per evaluation attack, so the attack's name is enough;
* every other source (diagnostics, methods, ``final-eval``, ``evaluate``):
  ``{source}/{split}/{metric}[/{label}]``, e.g. ``strength/probe/grad_alignment/noise-uniform``,
  ``strength-ref/probe/ref_acc/pgd-20``, ``apart/train/alpha``, ``evaluate/test/acc/autoattack``,
  ``evaluate/test/acc/pgd-50x10``.

The attack part is present when the row has an attack, and for ``acc`` / ``loss`` rows measured
clean (``clean``). Outside the engine's rows, ``label`` spells out the spec: ``{attack}``, then
``-{steps}`` if more than one step, ``x{restarts}`` if more than one restart, and ``-eps{ε·255}``
if ε differs from the run's. The scalar ``epoch`` is written at every step that closes an epoch
(from the ``train/loss`` row), so steps can be read as epochs.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from robustdrop.errors import RobustdropError

ENGINE_SOURCES = ("train", "eval", "cost")
MEASURED = ("acc", "loss")  # metrics that are always "under" something (clean if no attack)


def import_summary_writer():
    """``torch.utils.tensorboard.SummaryWriter``, or a one-line :class:`RobustdropError`."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise RobustdropError("TensorBoard output needs the tensorboard package; install it with "
                              "`pip install 'robustdrop[tensorboard]'`") from None
    return SummaryWriter


def attack_label(row: dict[str, Any], run_epsilon: float | None = None) -> str | None:
    """The attack part of a non-engine tag (see the module docstring), or ``None``."""
    attack = row["attack"]
    if attack == "none":
        return "clean" if row["metric"] in MEASURED else None
    label = str(attack)
    if int(row["steps"]) > 1:
        label += f"-{int(row['steps'])}"
    if int(row["restarts"]) > 1:
        label += f"x{int(row['restarts'])}"
    eps = float(row["epsilon"])
    if run_epsilon is not None and not math.isnan(eps) and abs(eps - run_epsilon) > 1e-9:
        label += f"-eps{eps * 255:.3g}"
    return label


def tensorboard_tag(row: dict[str, Any], run_epsilon: float | None = None) -> str:
    """The TensorBoard tag of a metric row (the scheme of the module docstring)."""
    if row["source"] in ENGINE_SOURCES:
        parts = [row["split"], row["metric"]]
        attack = row["attack"]
        label = attack if attack != "none" else ("clean" if row["metric"] in MEASURED else None)
    else:
        parts = [row["source"], row["split"], row["metric"]]
        label = attack_label(row, run_epsilon)
    if label is not None:
        parts.append(label)
    return "/".join(str(p) for p in parts)


class TensorBoardWriter:
    """Writes metric rows as scalars into ``log_dir`` (flushed after every :meth:`write`).

    Args:
        log_dir: the event folder.
        run_epsilon: the run's ε (tags spell out other radii).
        purge_step: on resume, the first step after the checkpoint: TensorBoard discards events
            that an interrupted process wrote at or after it.
    """

    def __init__(self, log_dir: str | os.PathLike, *, run_epsilon: float | None = None, purge_step: int | None = None):
        summary_writer = import_summary_writer()
        self.log_dir = Path(log_dir)
        self.run_epsilon = run_epsilon
        try:
            self.writer = summary_writer(log_dir=str(self.log_dir), purge_step=purge_step)
        except OSError as exc:
            raise RobustdropError(f"cannot write TensorBoard events to {self.log_dir} ({exc.strerror}); "
                                  "check the folder's permissions or free space") from None

    def write(self, rows: Iterable[dict[str, Any]]) -> None:
        for row in rows:
            step = int(row["step"])
            self.writer.add_scalar(tensorboard_tag(row, self.run_epsilon), float(row["value"]), step)
            if row["source"] == "train" and row["split"] == "train" and row["metric"] == "loss":
                self.writer.add_scalar("epoch", float(row["epoch"]), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def export_tensorboard(run: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write every metric row of the run directory ``run`` as TensorBoard scalars into
    ``out_dir/<run name>/`` (same tags as ``--tensorboard``); returns that folder. Refuses a
    folder that already holds events (TensorBoard would show both)."""
    from robustdrop.store.run_store import RunStore

    store = RunStore.open(run)
    target = Path(out_dir) / store.path.resolve().name
    if target.is_dir() and any(target.glob("events.out.tfevents.*")):
        raise RobustdropError(f"{target} already holds TensorBoard events; remove it or give another --tensorboard DIR")
    config = store.read_json(RunStore.CONFIG)
    eps = config.get("epsilon")
    writer = TensorBoardWriter(target, run_epsilon=float(eps) if isinstance(eps, (int, float)) else None)
    try:
        writer.write(store.metrics().to_dict("records"))
    finally:
        writer.close()
    return target
