"""Checkpoint policy: which checkpoints a run keeps and which one is its result.

A run directory holds, in ``checkpoints/``:

* ``last.pt``: always, the state after the newest finished epoch (what ``--resume`` continues), or
  the state after the newest step when the run was stopped mid-epoch (SIGINT / SIGTERM);
* ``epoch_XXXX.pt``: every ``checkpoint_every`` epochs (kept for good), plus a rolling window of
  the most recent epochs while ``--on-collapse rollback`` may need to go back;
* ``result.pt``: only after a rollback, the checkpoint chosen as the run's result;
* ``best_model.pt``: with ``keep_best=METRIC``, the model weights of the epoch with the best value
  of that epoch metric (``val/acc/pgd``: highest; a ``/loss/`` metric: lowest; ties keep the first);
* ``weights_epoch_XXXX.pt``: with ``save_weights_every=N``, the model weights (no optimizer, no
  RNG) of every N-th epoch, for measurements made after training on the weights training saw.

The best value so far is read back from ``best_model.pt`` itself, so the policy has no state of
its own and a resumed run (even one stopped mid-epoch) keeps choosing as an uninterrupted one.
Both are written before ``last.pt``: a run killed between the two writes redoes the epoch and
writes the same files again.

"The run's result" is ``result.pt`` when there is one, else ``last.pt``
(:func:`result_checkpoint`). The pattern is timm's ``CheckpointSaver``: one small object owns
the file names and the retention rule, the training loop only says "save this epoch".
"""

from __future__ import annotations

import math
import os
import re
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from robustdrop._files import atomic_write
from robustdrop.store.run_store import RunStore

__all__ = [
    "BEST", "KEEP_ROLLING", "LAST", "RESULT", "CheckpointSaver", "epoch_checkpoint_name", "epoch_files", "epoch_weights", "lower_is_better",
    "parse_epoch", "result_checkpoint", "weights_checkpoint_name",
]

LAST = "last"
RESULT = "result"
BEST = "best_model"  # checkpoints/best_model.pt (keep_best)
WEIGHTS_PREFIX = "weights_epoch_"  # checkpoints/weights_epoch_XXXX.pt (save_weights_every)
BEST_FORMAT = "robustdrop-best-1"
WEIGHTS_FORMAT = "robustdrop-weights-1"
KEEP_ROLLING = 3  # recent epoch checkpoints kept for --on-collapse rollback
_EPOCH_NAME = re.compile(r"epoch_(\d+)")


def epoch_checkpoint_name(epoch: int) -> str:
    """``epoch_XXXX``: the checkpoint name (without ``.pt``) of ``epoch``."""
    return f"epoch_{int(epoch):04d}"


def weights_checkpoint_name(epoch: int) -> str:
    """``weights_epoch_XXXX``: the weights-only checkpoint name (without ``.pt``) of ``epoch``."""
    return f"{WEIGHTS_PREFIX}{int(epoch):04d}"


def lower_is_better(metric: str) -> bool:
    """Whether a smaller value of the epoch metric ``metric`` is better (losses)."""
    return "loss" in metric.split("/")[1:2] or metric.split("/")[-1].startswith("loss")


def parse_epoch(name: str | os.PathLike) -> int | None:
    """The epoch of an ``epoch_XXXX`` checkpoint name or path (``.pt`` optional), else None."""
    stem = Path(name).name.removesuffix(".pt")
    match = _EPOCH_NAME.fullmatch(stem)
    return int(match.group(1)) if match else None


def epoch_files(run_dir: str | os.PathLike, *, weights_only: bool = False) -> dict[int, Path]:
    """``{epoch: path}`` of a run's per-epoch checkpoints on disk, ascending: ``epoch_XXXX.pt``
    (``--checkpoint-every``), or with ``weights_only`` ``weights_epoch_XXXX.pt`` (``--save-weights-every``)."""
    folder = Path(run_dir) / "checkpoints"
    prefix = WEIGHTS_PREFIX.removesuffix("epoch_") if weights_only else ""  # "weights_" before "epoch_XXXX"
    found = {parse_epoch(p.stem[len(prefix):]): p for p in folder.glob(f"{prefix}epoch_*.pt")} if folder.is_dir() else {}
    return {e: found[e] for e in sorted(e for e in found if e is not None)}


def epoch_weights(run_dir: str | os.PathLike) -> dict[int, Path]:
    """``{epoch: path}`` of every epoch whose model weights a run kept, ascending:
    ``weights_epoch_XXXX.pt`` (small), else the full ``epoch_XXXX.pt``."""
    weights, full = epoch_files(run_dir, weights_only=True), epoch_files(run_dir)
    return {e: weights.get(e) or full[e] for e in sorted({*weights, *full})}


def result_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The run's result: ``checkpoints/result.pt`` if present, else ``checkpoints/last.pt``;
    None when the run has neither (it has not finished an epoch)."""
    store = RunStore(Path(run_dir))
    for name in (RESULT, LAST):
        path = store.checkpoint_path(name)
        if path.is_file():
            return path
    return None


class CheckpointSaver:
    """Saves a run's checkpoints by the policy in the module docstring.

    Args:
        store: the run directory.
        every: keep ``epoch_XXXX.pt`` for good every ``every`` epochs (0 = never).
        rolling: also keep the ``rolling`` most recent epochs (0 = none; :data:`KEEP_ROLLING`
            under ``--on-collapse rollback``).
        keep_best: an epoch metric's name (``val/acc/pgd``): keep ``best_model.pt`` by it.
        weights_every: keep ``weights_epoch_XXXX.pt`` every ``weights_every`` epochs (0 = never).

    Examples:
        >>> saver = CheckpointSaver(store, every=10, rolling=KEEP_ROLLING)
        >>> saver.save(state, epoch=4)  # last.pt, epoch_0004.pt; epoch_0001.pt removed
        >>> saver.rollback_source(2, last_epoch=4)  # checkpoints/epoch_0002.pt
    """

    def __init__(self, store: RunStore, *, every: int = 0, rolling: int = 0, keep_best: str | None = None,
                 weights_every: int = 0):
        if every < 0 or rolling < 0 or weights_every < 0:
            raise ValueError(f"every, rolling and weights_every must be >= 0, got {every}, {rolling}, {weights_every}")
        self.store = store
        self.every = int(every)
        self.rolling = int(rolling)
        self.keep_best = keep_best
        self.weights_every = int(weights_every)

    def is_permanent(self, epoch: int) -> bool:
        """Whether ``epoch_XXXX.pt`` of ``epoch`` is kept for good."""
        return self.every > 0 and epoch % self.every == 0

    def save(self, state: dict[str, Any], epoch: int, metrics: Mapping[str, float] | None = None) -> None:
        """Write ``last.pt`` and, by the policy, ``epoch_XXXX.pt``, ``best_model.pt`` (by the
        epoch's ``metrics``, the run's channel) and ``weights_epoch_XXXX.pt``; drop the epoch that
        left the rolling window (unless it is a permanent one)."""
        if self.weights_every and epoch % self.weights_every == 0:
            self.store.save_checkpoint(weights_checkpoint_name(epoch), _weights(state, WEIGHTS_FORMAT))
        if self.keep_best and metrics is not None:
            self._keep_if_best(state, metrics)
        self.store.save_checkpoint(LAST, state)
        if self.is_permanent(epoch) or self.rolling:
            self.store.save_checkpoint(epoch_checkpoint_name(epoch), state)
        stale = epoch - self.rolling
        if self.rolling and stale > 0 and not self.is_permanent(stale):
            self.store.checkpoint_path(epoch_checkpoint_name(stale)).unlink(missing_ok=True)

    def best(self) -> tuple[float, int | None]:
        """``(value, epoch)`` of ``best_model.pt`` (``(nan, None)`` when there is none yet)."""
        path = self.store.checkpoint_path(BEST)
        if not path.is_file():
            return math.nan, None
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return float(state.get("value", math.nan)), state.get("epoch")

    def _keep_if_best(self, state: dict[str, Any], metrics: Mapping[str, float]) -> None:
        value = metrics.get(self.keep_best)
        if value is None:
            split = self.keep_best.split("/")[0] + "/"
            if any(k.startswith(split) for k in metrics):  # that split was measured, this name was not: a typo?
                known = ", ".join(sorted(k for k in metrics if k.startswith(split)))
                warnings.warn(f"keep_best: no metric {self.keep_best!r} this epoch (there are: {known}); "
                              "checkpoints/best_model.pt is not written", stacklevel=2)
            return  # not measured this epoch (eval_every)
        if math.isnan(float(value)):
            return
        best, _ = self.best()
        better = value < best if lower_is_better(self.keep_best) else value > best
        if math.isnan(best) or better:
            self.store.save_checkpoint(BEST, {**_weights(state, BEST_FORMAT), "selected_by": self.keep_best,
                                              "value": float(value)})

    def save_mid_epoch(self, state: dict[str, Any]) -> None:
        """Write ``last.pt`` only: a state in the middle of an epoch (a preempted run) is never an
        ``epoch_XXXX.pt`` (those are epoch ends, what rollback and ``--checkpoint-every`` keep)."""
        self.store.save_checkpoint(LAST, state)

    def epochs(self) -> list[int]:
        """Epochs that have an ``epoch_XXXX.pt`` on disk, ascending."""
        return list(epoch_files(self.store.path))

    def rollback_source(self, to_epoch: int, *, last_epoch: int | None) -> Path | None:
        """The checkpoint to keep as the result when rolling back to ``to_epoch``: the newest
        ``epoch_XXXX.pt`` at or before it, else ``last.pt`` if it holds the end of ``last_epoch <=
        to_epoch`` (``last_epoch=None``: last.pt holds a mid-epoch state, never a result); None
        when neither exists."""
        candidates = [e for e in self.epochs() if e <= to_epoch]
        if candidates:
            return self.store.checkpoint_path(epoch_checkpoint_name(max(candidates)))
        last = self.store.checkpoint_path(LAST)
        if last_epoch is not None and last_epoch <= to_epoch and last.is_file():
            return last
        return None

    def keep_as_result(self, source: Path) -> Path:
        """Copy ``source`` to ``result.pt`` (atomically; the run's result from now on); returns its path."""
        target = self.store.checkpoint_path(RESULT)
        with open(source, "rb") as src:
            atomic_write(target, lambda f: shutil.copyfileobj(src, f))
        return target


def _weights(state: dict[str, Any], fmt: str) -> dict[str, Any]:
    """The model-only part of a training state: config, epoch, step and the weights on the CPU."""
    return {"format": fmt, "config": state.get("config"), "epoch": int(state["epoch"]), "step": int(state["step"]),
            "model": {k: v.detach().cpu().clone() for k, v in state["model"].items()}}
