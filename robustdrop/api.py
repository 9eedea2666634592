"""The Python entry point: everything ``robustdrop track`` does, callable from code.

>>> from robustdrop import make_config, track
>>> store = track(make_config("quick", epochs=5), runs_dir="runs", name="demo")
>>> store.metrics().query("split == 'probe' and metric == 'acc'")
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from robustdrop.data import ImageData
from robustdrop.diagnostics import build_hooks
from robustdrop.engine import Hook, TrackConfig, Trainer, default_run_name
from robustdrop.errors import RobustdropError
from robustdrop.store import RunStore


def output_hooks(config: TrackConfig) -> list[Hook]:
    """Hooks for the run's optional outputs, run after the diagnostics: ``--final-eval`` (logs its rows
    at the end) and then ``--tensorboard`` (writes every row as it is logged)."""
    from robustdrop.engine.attack_eval import FinalEvalHook
    from robustdrop.engine.tensorboard import TensorBoardHook

    hooks: list[Hook] = []
    if config.final_eval:
        hooks.append(FinalEvalHook(config.final_eval, size=config.final_eval_size))
    if config.tensorboard:
        hooks.append(TensorBoardHook())
    return hooks


def track(
    config: TrackConfig,
    *,
    runs_dir: str | os.PathLike = "runs",
    name: str | None = None,
    overwrite: bool = False,
    hooks: Sequence[Hook] | None = None,
    progress: bool = True,
    data: ImageData | None = None,
) -> RunStore:
    """Train a new run with the diagnostics named in ``config.diagnostics`` (plus ``hooks``).

    ``data`` replaces ``config.dataset`` with an in-memory :class:`ImageData` (tests, notebooks).
    Returns the run's :class:`RunStore`.
    """
    config.validate()
    # Before the run directory: a bad reference leaves none (and --reference auto trains or finds its referee here).
    all_hooks = build_hooks(config, data=data, progress=progress) + list(hooks or []) + output_hooks(config)
    store = RunStore.create(runs_dir, name or default_run_name(config), overwrite=overwrite)
    Trainer(config, store, all_hooks, progress=progress, data=data).fit()
    return store


def resume(
    run_dir: str | os.PathLike,
    *,
    hooks: Sequence[Hook] | None = None,
    progress: bool = True,
    data: ImageData | None = None,
    device: str | None = None,
) -> RunStore:
    """Continue a run from its ``checkpoints/last.pt`` with the config it was started with."""
    run_dir = Path(run_dir)
    store = RunStore.open(run_dir)
    config = TrackConfig.from_dict(store.read_json(RunStore.CONFIG))
    if device is not None:
        config.device = device
    if not store.checkpoint_path("last").is_file():
        raise RobustdropError(f"{run_dir} has no checkpoints/last.pt to resume from (it stopped before its first "
                              "epoch ended); start it again with --overwrite")
    all_hooks = build_hooks(config, data=data, progress=progress) + list(hooks or []) + output_hooks(config)
    Trainer(config, store, all_hooks, resume=True, progress=progress, data=data).fit()
    return store
