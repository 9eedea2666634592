"""One catalog run trained in this process, by the package's one rule (:mod:`robustdrop.reuse`).

Kept only for ``gpu_plan.py`` and ``lib/plan.py`` until they run the catalog's cells as a sweep
(:func:`lib.catalog.run_cells`, as every other script does); nothing else uses it.
"""

from __future__ import annotations

from pathlib import Path

from lib.catalog import catalog, config_for, data_for
from lib.setting import Setting
from robustdrop.api import ensure
from robustdrop.engine import TrackConfig
from robustdrop.reuse import config_difference, decide

__all__ = ["config_difference", "run_state", "train_run"]

# The GPU plan's words for decide()'s actions.
_STATES = {"start": "missing", "retrain": "different", "resume": "partial", "reuse": "finished"}


def run_state(path: Path, cfg: TrackConfig) -> tuple[str, str]:
    """``(state, why)``: :func:`robustdrop.reuse.decide`'s action in the GPU plan's words."""
    decision = decide(path, cfg)
    return _STATES[decision.action], decision.why


def train_run(setting: Setting, name: str) -> Path:
    """Reuse, resume or train the catalog run ``name`` (its cell's config); returns its directory."""
    store, _ = ensure(config_for(setting, catalog(setting)[name]), runs_dir=setting.runs_dir, name=name,
                      progress=False, data=data_for(setting),
                      log=lambda d: print(f"{name}: {d.action} ({d.why})", flush=True))
    return store.path
