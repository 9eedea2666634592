"""The Python entry point: everything ``robustdrop track`` does, callable from code.

>>> from robustdrop import make_config, track
>>> store = track(make_config("quick", epochs=5), runs_dir="runs", name="demo")
>>> store.metrics().query("split == 'probe' and metric == 'acc'")

A start validates everything it can before it writes anything (the config, the diagnostics and
reference, the device, the data and the sizes it allows, the model and method); a start that fails
later, before training began, removes the run directory it made. While a run writes, it holds the
run directory's lock (:class:`~robustdrop.store.RunLock`): one writer per run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from robustdrop.data import ImageData
from robustdrop.diagnostics import AUTO, build_hooks
from robustdrop.engine import Hook, TrackConfig, Trainer, default_run_name
from robustdrop.engine.estimate import Estimate
from robustdrop.errors import RobustdropError
from robustdrop.reuse import Decision, decide
from robustdrop.store import RunLock, RunStore


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
    Returns the run's :class:`RunStore`. Raises :class:`RobustdropError` on bad input (nothing is
    left on disk) and :class:`~robustdrop.errors.RunInterrupted` after a SIGINT / SIGTERM checkpoint.
    """
    trainer = _prepared(config, runs_dir, name, overwrite, hooks, progress, data)
    store = trainer.store
    created = store.make_directory()
    try:
        with RunLock(store.path):
            store.check_new(overwrite=overwrite)  # again, now that it is ours: another start may have won
            if overwrite:
                store.clear()
            trainer.fit()
    except BaseException:
        if not trainer.started:  # failed before training began: leave the runs directory as it was
            _remove(created)
        raise
    return store


def resume(
    run_dir: str | os.PathLike,
    *,
    hooks: Sequence[Hook] | None = None,
    progress: bool = True,
    data: ImageData | None = None,
    device: str | None = None,
    threads: int | None = None,
    epochs: int | None = None,
) -> RunStore:
    """Continue a run from its ``checkpoints/last.pt`` (an epoch end or a mid-epoch state) with the
    config it was started with; ``device`` / ``threads`` apply to this call only.

    ``epochs`` larger than planned extends the run (``cyclic-repeat``, ``constant``, ``piecewise``;
    see :meth:`TrackConfig.extended`): recorded as an ``extend`` event, in config.json and in the
    manifest's ``config_history``. A one-cycle ``cyclic`` run is refused with the alternative.
    """
    run_dir = Path(run_dir)
    RunStore.check_run_dir(run_dir)
    with RunLock(run_dir):
        store = RunStore.open(run_dir)
        config = TrackConfig.from_dict(store.read_json(RunStore.CONFIG))
        if device is not None:
            config.device = device
        if threads is not None:
            config.threads = threads
        if epochs is not None:
            config = config.extended(epochs)
        config.validate()
        if not store.checkpoint_path("last").is_file():
            raise RobustdropError(f"{run_dir} has no checkpoints/last.pt to resume from (it stopped before its first "
                                  "step); start it again with --overwrite")
        all_hooks = build_hooks(config, data=data, progress=progress) + list(hooks or []) + output_hooks(config)
        Trainer(config, store, all_hooks, resume=True, progress=progress, data=data).fit()
    return store


def ensure(
    config: TrackConfig,
    *,
    runs_dir: str | os.PathLike = "runs",
    name: str | None = None,
    hooks: Sequence[Hook] | None = None,
    progress: bool = True,
    data: ImageData | None = None,
    log: Callable[[Decision], None] | None = None,
) -> tuple[RunStore, Decision]:
    """The run ``config`` asks for in ``<runs_dir>/<name>``: reused when a finished one is there,
    resumed when it stopped early, else trained (anew) — the one rule, :func:`robustdrop.reuse.decide`.
    A resumed run takes ``config``'s device and threads. ``log`` is called with the decision
    before it is carried out. Returns the store and the decision taken."""
    config.validate()
    path = Path(runs_dir) / (name or default_run_name(config))
    decision = decide(path, config)
    if log is not None:
        log(decision)
    if decision.action == "reuse":
        return RunStore.open(path), decision
    if decision.action == "resume":
        return resume(path, hooks=hooks, progress=progress, data=data, device=config.device,
                      threads=config.threads), decision
    return track(config, runs_dir=runs_dir, name=path.name, overwrite=True, hooks=hooks, progress=progress,
                 data=data), decision


def dry_run(
    config: TrackConfig,
    *,
    runs_dir: str | os.PathLike = "runs",
    name: str | None = None,
    overwrite: bool = False,
    hooks: Sequence[Hook] | None = None,
    data: ImageData | None = None,
    verbose: bool = False,
) -> Estimate:
    """Everything a start checks, plus the cost estimate from a few timed training steps, without
    writing anything (``--dry-run``). With ``verbose``, prints the resolved config and the estimate.

    ``--reference auto`` is not resolved (that may train and cache a referee): the estimate then
    leaves out the reference diagnostic, and the verbose output says so."""
    config.validate()
    auto = config.reference == AUTO
    timed = dataclasses.replace(config, reference=None) if auto else config
    trainer = _prepared(timed, runs_dir, name or default_run_name(config), overwrite, hooks, False, data)
    estimate = trainer.dry_run()
    if verbose:
        data = trainer.data
        print("resolved configuration:")
        print(json.dumps(config.to_dict(), indent=2, sort_keys=True))
        print(f"data: {data.name}, {len(trainer.train_images)} training examples ({trainer.run.steps_per_epoch} "
              f"steps of {config.batch_size} per epoch), probe {len(trainer.probe[1])}, validation "
              f"{len(trainer.val[1])}, test {len(trainer.test[1])}; model {config.model}, method {config.method}")
        print(estimate.line())
        if auto:
            print("--reference auto: a dry run neither trains nor looks up the referee; the estimate leaves out "
                  "its diagnostic (a first run of this setting also trains the referee, see docs/referee.md)")
        print(f"dry run: nothing was written (the run would go to {trainer.store.path})")
    return estimate


def _prepared(config: TrackConfig, runs_dir: str | os.PathLike, name: str | None, overwrite: bool,
              hooks: Sequence[Hook] | None, progress: bool, data: ImageData | None) -> Trainer:
    """A trainer for a new run, every check done and nothing written (its run directory not made)."""
    config.validate()
    store = RunStore(Path(runs_dir) / (name or default_run_name(config)))
    store.check_new(overwrite=overwrite)  # before loading data or training a referee: an existing run fails fast
    # A bad reference fails here; --reference auto finds (or trains and caches) its referee here.
    all_hooks = build_hooks(config, data=data, progress=progress) + list(hooks or []) + output_hooks(config)
    return Trainer(config, store, all_hooks, progress=progress, data=data).prepare()


def _remove(created: list[Path]) -> None:
    """Remove the folders a failed start made (outermost first, as ``make_folders`` lists them)."""
    if created:
        with contextlib.suppress(OSError):
            shutil.rmtree(created[0])
