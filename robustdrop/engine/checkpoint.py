"""A run's checkpoint: what it holds, restoring a :class:`~robustdrop.engine.Trainer` from it, and
recording an extension (a resume with more epochs than the checkpoint's).

A checkpoint (``checkpoints/last.pt`` and its copies, format :data:`CHECKPOINT_FORMAT`) holds the
resolved config, the epoch and step counters, model, optimizer, LR schedule, method and hook states,
the method switches so far, every global RNG state (:func:`~robustdrop.engine.observer.rng_state`),
the data generator's state, the lengths of ``metrics`` and ``events`` (resume truncates them back),
the wall time so far and, mid-epoch, the epoch in progress (:class:`EpochProgress`). Which files
are kept is the store's checkpoint policy (:class:`~robustdrop.store.CheckpointSaver`). Resuming
from it continues the run exactly: the same batches, RNG draws and metrics as without the stop.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import torch

from robustdrop.engine.config import RUNTIME_FIELDS, TrackConfig
from robustdrop.engine.control import switch_method
from robustdrop.engine.observer import rng_state, set_rng_state
from robustdrop.errors import RobustdropError
from robustdrop.store import KEEP_ROLLING, CheckpointSaver, RunStore

if TYPE_CHECKING:
    from robustdrop.engine.trainer import Trainer

# Checkpoints written since mid-epoch checkpoints also carry ``partial_epoch`` and ``elapsed_s``;
# older ones (without) are read as epoch ends.
CHECKPOINT_FORMAT = "robustdrop-checkpoint-1"


@dataclass
class EpochProgress:
    """The epoch in progress: what a mid-epoch checkpoint holds beyond model, optimizer, method,
    hooks and RNG states to continue the epoch at its next step exactly.

    ``generator``: the data generator's state before the epoch drew its permutation and
    augmentation (drawing again from it gives the same batches); ``steps_done``: the epoch's steps
    already taken; ``loss_sum``, ``correct`` (device scalars), ``seen``: the epoch's training
    accumulators; ``lr``: the last step's LR; ``train_s``, ``diag_s``: wall time spent so far.
    """

    generator: torch.Tensor
    loss_sum: torch.Tensor
    correct: torch.Tensor
    steps_done: int = 0
    seen: int = 0
    lr: float = 0.0
    train_s: float = 0.0
    diag_s: float = 0.0

    @classmethod
    def start(cls, generator: torch.Generator, device: torch.device) -> EpochProgress:
        zero = torch.zeros((), device=device)
        return cls(generator.get_state(), zero, zero.clone())

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.clone(), "loss_sum": self.loss_sum.detach().cpu(),
                "correct": self.correct.detach().cpu(), "steps_done": self.steps_done, "seen": self.seen,
                "lr": self.lr, "train_s": self.train_s, "diag_s": self.diag_s}

    @classmethod
    def from_state(cls, state: dict[str, Any], device: torch.device) -> EpochProgress:
        return cls(state["generator"], state["loss_sum"].to(device), state["correct"].to(device),
                   int(state["steps_done"]), int(state["seen"]), float(state["lr"]), float(state["train_s"]),
                   float(state["diag_s"]))


def checkpoint_saver(config: TrackConfig, store: RunStore) -> CheckpointSaver:
    """The store's checkpoint policy with the run's options (rolling copies for ``--on-collapse rollback``)."""
    return CheckpointSaver(store, every=config.checkpoint_every,
                           rolling=KEEP_ROLLING if config.on_collapse == "rollback" else 0,
                           keep_best=config.keep_best, weights_every=config.save_weights_every)


def run_state(trainer: Trainer, finished: bool, progress: EpochProgress | None = None) -> dict[str, Any]:
    """Everything to continue the run: at an epoch end, or (``progress``) in the middle of an
    epoch, where ``epoch`` counts the finished epochs and ``partial_epoch`` the one in progress."""
    t = trainer
    return {
        "format": CHECKPOINT_FORMAT,
        "config": t.config.to_dict(),
        "epoch": t.epoch - 1 if progress is not None else t.epoch,
        "step": t.step,
        "finished": finished,
        "model": t.model.state_dict(),
        "optimizer": t.optimizer.state_dict(),
        "schedule": t.schedule.state_dict(),
        "method": t.method.state_dict(),
        "switches": t._switches,
        "hooks": {h.state_key: h.state_dict() for h in t.hooks},
        "hooks_by": "state_key",
        "rng": rng_state(),
        "data_generator": t.data_generator.get_state(),
        "num_metric_rows": t.store.num_metric_rows,
        "num_events": t.store.num_events,
        "partial_epoch": progress.state_dict() if progress is not None else None,
        "elapsed_s": t._elapsed(),
    }


def _check_config(state: dict[str, Any], config: TrackConfig, store: RunStore) -> tuple[dict[str, Any], bool]:
    """The checkpoint's config (defaults filled) and whether ``config`` extends it; raises when the
    checkpoint is not one, belongs to another config, or cannot be extended to ``config.epochs``."""
    if state.get("format") != CHECKPOINT_FORMAT:
        raise RobustdropError(f"{store.checkpoint_path('last')} is not a {CHECKPOINT_FORMAT} checkpoint")
    # Fields added to TrackConfig after the checkpoint was written take their defaults on both
    # sides (from_dict fills them), so a newer robustdrop still resumes an older run.
    saved, current = TrackConfig.from_dict(state["config"]).to_dict(), config.to_dict()
    extending = saved["epochs"] < current["epochs"]
    same = set(RUNTIME_FIELDS) | ({"epochs", "schedule_epochs"} if extending else set())
    diff = sorted(k for k in saved if k not in same and saved[k] != current.get(k))
    if diff:
        raise RobustdropError(f"checkpoint does not match the run's config.json (differs in {diff}); "
                              "restore config.json or start a new run")
    if extending:
        if state["finished"] and state["epoch"] < saved["epochs"]:
            raise RobustdropError(f"{store.path} was stopped at epoch {state['epoch']} of {saved['epochs']} "
                                  "(see its events.jsonl); a stopped run cannot be extended: start a new run")
        planned = TrackConfig.from_dict(saved).extended(config.epochs)
        if planned.schedule_epochs != config.schedule_epochs:
            raise RobustdropError(f"--schedule-epochs of an extended run must stay {planned.schedule_epochs}")
    return saved, extending


def load_run_checkpoint(trainer: Trainer) -> bool:
    """Restore ``trainer`` (prepared) from ``last.pt`` (an epoch end or a mid-epoch state); returns
    whether the run had already finished. A config with more epochs than the checkpoint's extends the run."""
    t = trainer
    state = t.store.load_checkpoint(
        "last", map_location=t.device,
        todo="copy an older checkpoints/epoch_XXXX.pt over it if there is one, or start the run again with --overwrite")
    saved, extending = _check_config(state, t.config, t.store)
    for switch in state.get("switches", []):  # continue with the method the run had switched to
        switch_method(t, switch["to"])
    t._switches = list(state.get("switches", []))
    try:
        t.model.load_state_dict(state["model"])
        t.optimizer.load_state_dict(state["optimizer"])
        t.method.load_state_dict(state["method"])
    except (RuntimeError, KeyError, ValueError) as exc:
        raise RobustdropError(f"checkpoint does not fit the model/method ({str(exc).splitlines()[0][:160]}); "
                              "it belongs to another run") from None
    t.schedule.load_state_dict(state["schedule"])
    by_key = state.get("hooks_by") == "state_key"  # older checkpoints keyed hook states by name
    for hook in t.hooks:
        key = hook.state_key if by_key else hook.name
        if key in state["hooks"]:
            hook.load_state_dict(state["hooks"][key])
    set_rng_state(state["rng"])
    t.data_generator.set_state(state["data_generator"])
    t.run.epoch, t.run.step = state["epoch"], state["step"]
    partial = state.get("partial_epoch")
    t._progress = EpochProgress.from_state(partial, t.device) if partial else None
    t._last_is_epoch_end = t._progress is None
    t._elapsed0 = float(state.get("elapsed_s", 0.0))
    t.store.truncate_logs(state["num_metric_rows"], state["num_events"])
    t.store.log_event("resume", epoch=t.epoch, step=t.step,
                      **({"steps_into_epoch": t._progress.steps_done} if t._progress else {}))
    if extending:
        t._extended_from = saved["epochs"]
        record_extension(t.store, t.config, saved, epoch=t.epoch, step=t.step)
    return bool(state["finished"])


def record_extension(store: RunStore, config: TrackConfig, saved: dict[str, Any], *, epoch: int, step: int) -> None:
    """The extension is an event, and config.json becomes the extended config; the manifest's
    ``config_history`` lists every change (what, from, to, at which epoch, by which command)."""
    changes = {k: [saved.get(k), getattr(config, k)] for k in ("epochs", "schedule_epochs")
               if saved.get(k) != getattr(config, k)}
    store.log_event("extend", epoch=epoch, step=step, from_epochs=saved["epochs"], to_epochs=config.epochs)
    on_disk = store.read_json(RunStore.CONFIG)
    store.write_json(RunStore.CONFIG, {**on_disk, **{k: new for k, (_, new) in changes.items()}})
    manifest = store.read_json(RunStore.MANIFEST)
    history = manifest.setdefault("config_history", [])
    entry = {"epoch": epoch, "step": step, "changes": changes}
    if not history or {k: history[-1].get(k) for k in entry} != entry:  # not twice for one extension
        history.append({**entry, "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                        "command": sys.argv})
        store.write_json(RunStore.MANIFEST, manifest)
