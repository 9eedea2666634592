"""Training one catalog run, or reusing / resuming it, with the :class:`KeepBest` hook.

Reuse rule: a run directory whose ``config.json`` equals the config the script would use
(``threads`` and the folder of ``reference`` are not compared; keys a run made by an older
robustdrop lacks count as their default; a ``builtin:NAME`` referee must be the file shipped now,
by the SHA-256 in the run's ``reference`` event) and whose ``checkpoints/last.pt``
says ``finished`` is reused; one that stopped early is resumed; anything else is trained anew
(the old directory is replaced). Every run gets the :class:`KeepBest` hook, which keeps the model
of the epoch with the best validation PGD accuracy in ``checkpoints/best_model.pt`` for the tables.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from lib.catalog import catalog, config_for, data_for, reference_deferred, run_dir
from lib.setting import Setting
from robustdrop.api import resume, track
from robustdrop.diagnostics import verify_builtin
from robustdrop.engine import Hook, TrackConfig
from robustdrop.errors import RobustdropError
from robustdrop.store import RunStore

BEST_CHECKPOINT = "best_model"  # checkpoints/best_model.pt, written by KeepBest
WEIGHTS_PREFIX = "weights_epoch_"  # checkpoints/weights_epoch_XXXX.pt, written by EpochWeights


class KeepBest(Hook):
    """Keeps the model weights of the epoch with the highest validation PGD accuracy (probe PGD
    when the run has no validation split) in ``checkpoints/best_model.pt``, with the config, so
    :func:`robustdrop.diagnostics.find_reference` can load it. Ties keep the first epoch, the
    same rule as :func:`robustdrop.plots.compare`'s ``best_*`` columns."""

    name = "analyses-keep-best"

    def __init__(self) -> None:
        super().__init__(every_n_epochs=1)
        self.best = -math.inf
        self.epoch: int | None = None

    def on_epoch_end(self, run: Any, epoch: int) -> None:
        split = next((s for s in ("val", "probe") if f"{s}/acc/pgd" in run.metrics), None)
        if split is None or not run.metrics[f"{split}/acc/pgd"] > self.best:
            return
        self.best, self.epoch = float(run.metrics[f"{split}/acc/pgd"]), int(epoch)
        run.store.save_checkpoint(BEST_CHECKPOINT, {
            "format": "robustdrop-analyses-best-1",
            "config": run.config.to_dict(),
            "epoch": int(epoch),
            "model": {k: v.detach().cpu().clone() for k, v in run.model.state_dict().items()},
            "selected_by": f"{split} {run.eval_specs['pgd'].describe()}",
            "value": self.best,
        })

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = float(state.get("best", -math.inf))
        self.epoch = state.get("epoch")


class EpochWeights(Hook):
    """Keeps the model weights of every epoch in ``checkpoints/weights_epoch_XXXX.pt`` (with the
    config, the epoch and the step), so the referee measurement of Figure 2 can be made after
    training, on the same weights the in-training diagnostic would have seen (:mod:`lib.deferred`).
    A PreActResNet18 is 45 MB per epoch: these files stay on the machine that trained."""

    name = "analyses-epoch-weights"

    def on_epoch_end(self, run: Any, epoch: int) -> None:
        run.store.save_checkpoint(f"{WEIGHTS_PREFIX}{epoch:04d}", {
            "format": "robustdrop-analyses-weights-1",
            "config": run.config.to_dict(),
            "epoch": int(epoch),
            "step": int(run.step),
            "model": {k: v.detach().cpu().clone() for k, v in run.model.state_dict().items()},
        })


def _normalized(cfg: dict[str, Any]) -> dict[str, Any]:
    cfg = {**TrackConfig().to_dict(), **cfg}  # fields added since the run was made: their defaults
    cfg.pop("threads", None)
    if cfg.get("reference"):
        cfg["reference"] = Path(cfg["reference"]).name
    return cfg


def config_difference(stored: dict[str, Any], cfg: TrackConfig) -> list[str]:
    """The fields in which a run's stored ``config.json`` differs from ``cfg`` (``threads`` and the
    folder of ``reference`` are not compared). A run made before a config field existed has the
    field's default (as the engine's resume); raises :class:`RobustdropError` on keys this robustdrop
    does not know."""
    stored = TrackConfig.from_dict(stored).to_dict()
    want, have = _normalized(cfg.to_dict()), _normalized(stored)
    return sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))


def _shipped_sha(reference: str) -> str | None:
    return verify_builtin(reference.split(":", 1)[1])[1].get("sha256")


def _logged_sha(path: Path) -> str | None:
    """The referee's SHA-256 in the run's ``reference`` event (None if it has none)."""
    try:
        events = RunStore.open(path).events("reference")
    except Exception:  # an unreadable run is retrained anyway
        return None
    return events[0].get("sha256") if events else None


def run_state(path: Path, cfg: TrackConfig, *, keep_best: bool = True) -> tuple[str, str]:
    """``(state, why)`` with state ``missing`` | ``different`` | ``partial`` | ``finished``
    (``keep_best``: a finished run must also have the :class:`KeepBest` checkpoint)."""
    config_file = path / RunStore.CONFIG
    if not config_file.is_file():
        return "missing", "no run yet"
    try:
        diff = config_difference(json.loads(config_file.read_text()), cfg)
    except (OSError, json.JSONDecodeError, TypeError, AttributeError):
        return "different", "unreadable config.json"
    except RobustdropError as exc:  # keys this robustdrop does not know
        return "different", str(exc)
    if diff:
        return "different", f"config differs in {diff}"
    if str(cfg.reference or "").startswith("builtin:") and _shipped_sha(cfg.reference) != _logged_sha(path):
        return "different", f"made with another {cfg.reference} than the one shipped now"
    last = path / "checkpoints" / "last.pt"
    if not last.is_file():
        return "different", "no checkpoint"
    try:
        state = torch.load(last, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # a torn or foreign file: train again
        return "different", f"unreadable checkpoint ({type(exc).__name__})"
    if not state.get("finished"):
        return "partial", f"stopped after epoch {state.get('epoch')}"
    if keep_best and not (path / "checkpoints" / f"{BEST_CHECKPOINT}.pt").is_file():
        return "different", "made without the analyses' best-model hook"
    return "finished", "finished"


def train_run(setting: Setting, name: str) -> Path:
    """Reuse, resume or train the catalog run ``name``; returns its directory."""
    spec = catalog(setting)[name]
    cfg = config_for(setting, spec)
    path = run_dir(setting, name)
    state, why = run_state(path, cfg)
    if state == "finished":
        print(f"reusing finished run {path}", flush=True)
        return path
    start = time.perf_counter()
    hooks: list[Hook] = [KeepBest()]
    if spec.uses_reference and reference_deferred(setting):
        hooks.append(EpochWeights())
    if state == "partial":
        print(f"resuming {path} ({why})", flush=True)
        resume(path, hooks=hooks, progress=False, data=data_for(setting))
    else:
        if state == "different":
            print(f"training {path} anew: {why}", flush=True)
        else:
            print(f"training {path}: {spec.what} ({cfg.method}, {cfg.epochs} epochs"
                  + (f", train subset {cfg.train_subset}" if cfg.train_subset else "") + ")", flush=True)
        track(cfg, runs_dir=setting.runs_dir, name=name, overwrite=True, hooks=hooks, progress=False,
              data=data_for(setting))
    print(f"done {path} in {time.perf_counter() - start:.0f}s", flush=True)
    return path
