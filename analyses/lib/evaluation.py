"""The tables' test-set evaluation of a run's final and best checkpoints, as the analyses' settings
ask for it: :func:`robustdrop.evaluation.evaluate_run_cached` (clean, PGD-k and CW-loss PGD-k
accuracy, standard AutoAttack on the final checkpoint, cached in ``<run>/analyses_eval.json``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lib.catalog import load_data, run_dir
from lib.setting import Setting
from lib.training import BEST_CHECKPOINT
from robustdrop.evaluation import (
    EVAL_CACHE,
    CachedEvaluation,
    cached_checkpoint,
    evaluate_run_cached,
    evaluation_is_cached,
)
from robustdrop.store import RunStore

__all__ = ["EVAL_CACHE", "checkpoint_file", "evaluate_run", "evaluation_cached"]


def _how(setting: Setting, autoattack: bool | None = None) -> CachedEvaluation:
    """The evaluation of the tables: ``eval_n`` images, the setting's seed, the best row from
    :class:`~lib.training.KeepBest`'s checkpoint, AutoAttack on ``aa_n`` unless turned off."""
    aa = setting.autoattack if autoattack is None else autoattack
    return CachedEvaluation(n=setting.eval_n, seed=setting.seed, best=BEST_CHECKPOINT,
                            autoattack_n=setting.aa_n if aa else None, device=setting.device)


def checkpoint_file(path: Path, which: str) -> Path:
    """The checkpoint of run ``path`` that the ``final`` row (``result.pt``, else ``last.pt``) or
    the ``best`` row (``best_model.pt``) evaluates."""
    return cached_checkpoint(path, which, CachedEvaluation(best=BEST_CHECKPOINT))


def evaluation_cached(setting: Setting, name: str) -> bool:
    """Whether both rows of :func:`evaluate_run` are in the run's cache (nothing to compute)."""
    return evaluation_is_cached(run_dir(setting, name), _how(setting, autoattack=False))


def evaluate_run(setting: Setting, name: str) -> dict[str, dict[str, Any]]:
    """The ``final``, ``best`` (and ``autoattack``) rows of the catalog run ``name``."""
    path = run_dir(setting, name)
    return evaluate_run_cached(path, _how(setting), data=lambda: load_data(setting, RunStore.open(path).read_json(
        RunStore.CONFIG)))
