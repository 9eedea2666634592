"""The tables' cached evaluation of one catalog run (:func:`robustdrop.evaluation.evaluate_run_cached`
with :func:`lib.catalog.table_evaluation`).

Kept only for ``gpu_plan.py``, ``lib/plan.py`` and ``lib/precision.py`` until they move to the
sweep; the tables call the package directly.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from lib.catalog import load_data, run_dir, table_evaluation
from lib.setting import Setting
from robustdrop.evaluation import (
    EVAL_CACHE,
    CachedEvaluation,
    cached_checkpoint,
    evaluate_run_cached,
    evaluation_is_cached,
)
from robustdrop.store import BEST, RunStore

__all__ = ["EVAL_CACHE", "checkpoint_file", "evaluate_run", "evaluation_cached"]


def checkpoint_file(path: Path, which: str) -> Path:
    """The checkpoint of run ``path`` that the ``final`` or the ``best`` row evaluates."""
    return cached_checkpoint(path, which, CachedEvaluation(best=BEST))


def evaluation_cached(setting: Setting, name: str) -> bool:
    """Whether the final and best rows of :func:`evaluate_run` are cached (nothing to compute)."""
    return evaluation_is_cached(run_dir(setting, name), table_evaluation(replace(setting, autoattack=False)))


def evaluate_run(setting: Setting, name: str) -> dict[str, dict[str, Any]]:
    """The ``final``, ``best`` (and ``autoattack``) rows of the catalog run ``name``."""
    path = run_dir(setting, name)
    return evaluate_run_cached(path, table_evaluation(setting), data=lambda: load_data(
        setting, RunStore.open(path).read_json(RunStore.CONFIG)))
