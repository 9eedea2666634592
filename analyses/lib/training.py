"""Training one catalog run, or reusing / resuming it, by the package's one rule.

Whether a run directory is reused, resumed or trained anew is :func:`robustdrop.reuse.decide`
(resolved configs compared field by field; threads, device and the like not compared; a
``builtin:NAME`` referee must be the file shipped now). Every catalog run keeps the model of its
best validation PGD epoch (``keep_best``, the store's checkpoint policy) for the tables, and
Figure 2's runs with a deferred referee keep every epoch's weights (``save_weights_every=1``) for
:mod:`lib.deferred`; both are part of the run's config (:func:`lib.catalog.config_for`).
"""

from __future__ import annotations

import time
from pathlib import Path

from lib.catalog import catalog, config_for, data_for, run_dir
from lib.setting import Setting
from robustdrop.api import ensure
from robustdrop.engine import TrackConfig
from robustdrop.reuse import config_difference, decide
from robustdrop.store import BEST
from robustdrop.store.checkpoints import WEIGHTS_PREFIX

BEST_CHECKPOINT = BEST  # checkpoints/best_model.pt (keep_best)
__all__ = ["BEST_CHECKPOINT", "WEIGHTS_PREFIX", "config_difference", "run_state", "train_run"]

# The analyses' words for decide()'s actions (plan.py and make_reference.py read them).
_STATES = {"start": "missing", "retrain": "different", "resume": "partial", "reuse": "finished"}


def run_state(path: Path, cfg: TrackConfig) -> tuple[str, str]:
    """``(state, why)`` with state ``missing`` | ``different`` | ``partial`` | ``finished``
    (:func:`robustdrop.reuse.decide`'s start / retrain / resume / reuse)."""
    decision = decide(path, cfg)
    return _STATES[decision.action], decision.why


def train_run(setting: Setting, name: str) -> Path:
    """Reuse, resume or train the catalog run ``name``; returns its directory."""
    spec = catalog(setting)[name]
    cfg = config_for(setting, spec)
    path = run_dir(setting, name)
    decision = decide(path, cfg)
    if decision.action == "reuse":
        print(f"reusing finished run {path}", flush=True)
        return path
    start = time.perf_counter()
    if decision.action == "resume":
        print(f"resuming {path} ({decision.why})", flush=True)
    elif decision.action == "retrain":
        print(f"training {path} anew: {decision.why}", flush=True)
    else:
        print(f"training {path}: {spec.what} ({cfg.method}, {cfg.epochs} epochs"
              + (f", train subset {cfg.train_subset}" if cfg.train_subset else "") + ")", flush=True)
    ensure(cfg, runs_dir=setting.runs_dir, name=name, progress=False, data=data_for(setting))
    print(f"done {path} in {time.perf_counter() - start:.0f}s", flush=True)
    return path
