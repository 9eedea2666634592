"""Diagnostics replayed over saved per-epoch weights: nothing is trained again.

A finished training that kept its weights epoch by epoch can be diagnosed after the fact: each
epoch's weights are loaded into the model and the epoch's end runs as it would have during
training (the same :class:`~robustdrop.engine.Observer`: evaluation, the due hooks under the
guard, the run's seeded generators — seeded by run seed, name and epoch — so a replayed row is
the row an in-training measurement logs, its ``time_s`` aside).

The weights are any iterable of ``(epoch, state_dict)`` pairs (or ``(epoch, state_dict, step)``
triples, ``step`` = the optimizer step at the end of that epoch for the ``step`` column; 0 when
not given), in increasing epoch order, e.g.::

    weights = ((epoch, torch.load(path, weights_only=True)["model"]) for epoch, path in files)
    replay(weights, model, lambda epoch, step: observer.end_epoch(epoch, step))

Users: ``robustdrop diagnose`` and :meth:`robustdrop.Monitor.replay` (the user's checkpoints),
and :func:`replay_run`.

**A finished run** (:func:`replay_run`): diagnostics it did not measure during training, measured
afterwards over its per-epoch weights (``checkpoints/weights_epoch_XXXX.pt`` with
``--save-weights-every 1``, else ``checkpoints/epoch_XXXX.pt`` with ``--checkpoint-every 1``) into
its own metrics: e.g. the referee of Fig. 2 (``strength-ref``) when the run trained beside its
referee instead of after it, or Wong et al.'s check (``wong``) on runs that trained without it.
The context is the trainer's own (:meth:`robustdrop.engine.Trainer.prepare`: data, probe set,
training images, model, method), so a replayed row is the row the attached diagnostic logs
(``time_s`` aside). A replay cannot measure the training steps (``strength``'s
``train-perturbation`` rows) and leaves out diagnostics that read the epoch's evaluation
(``collapse``: ``Diagnostic.replayable``).

A finished replay is the event ``replayed`` in the run's log (diagnostics, referee and its
SHA-256, the rows and events it added), and asking for it again reuses it. Anything after the last
finished replay (an interrupted one) is dropped first, so an interrupted replay starts over; a
replay of diagnostics an earlier replay measured (e.g. against a retrained referee) replaces that
replay's rows. Retraining or extending the run drops the replays with the rest of its log.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import nn

from robustdrop._files import sha256_file
from robustdrop._progress import progress_bar
from robustdrop.diagnostics.referees import AUTO, BUILTIN_PREFIX, auto_referee
from robustdrop.diagnostics.registry import DIAGNOSTICS, create_diagnostic
from robustdrop.diagnostics.selection import select
from robustdrop.engine import EpochEnd, Hook, Observer, TrackConfig, Trainer
from robustdrop.engine.observer import rng_state, set_rng_state
from robustdrop.errors import RobustdropError
from robustdrop.store import RunLock, RunStore, epoch_weights, load_checkpoint_file

if TYPE_CHECKING:
    from robustdrop.data import ImageData

R = TypeVar("R")
Weights = Iterable[tuple[int, Mapping[str, torch.Tensor]] | tuple[int, Mapping[str, torch.Tensor], int]]


def load_weights(model: nn.Module, state: Mapping[str, Any], *, what: str) -> None:
    """Load ``state`` (a model ``state_dict``) into ``model`` exactly: every key present, no
    extra key, every shape equal; else a one-line :class:`RobustdropError` naming ``what``
    (e.g. the checkpoint file) and the first difference. ``model`` is untouched on error."""
    if not isinstance(state, Mapping):
        raise RobustdropError(f"{what} is not a model state_dict (got {type(state).__name__}); give the weights "
                              "as {parameter name: tensor}")
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    if missing or extra:
        part = (f"lacks {missing[:3]}" if missing else "") + (" and " if missing and extra else "") + \
               (f"has {extra[:3]} that the model lacks" if extra else "")
        raise RobustdropError(f"{what} does not fit the model ({type(model).__name__}): it {part}; give the "
                              "model that saved these weights")
    for key, tensor in expected.items():
        got = state[key]
        if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(tensor.shape):
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            raise RobustdropError(f"{what} does not fit the model ({type(model).__name__}): its {key} is {shape}, "
                                  f"the model's is {tuple(tensor.shape)}; give the model that saved these weights")
    model.load_state_dict(state)


def replay(weights: Weights, model: nn.Module, end_epoch: Callable[[int, int], R], *,
           after_epoch: int = 0) -> list[R]:
    """For each ``(epoch, state_dict[, step])`` of ``weights``: load the weights into ``model``
    (:func:`load_weights`) and call ``end_epoch(epoch, step)``; returns what those calls returned.

    Epochs must be whole numbers >= 1, increasing, and after ``after_epoch`` (the epochs already
    recorded, e.g. a resumed replay); anything else is a :class:`RobustdropError` raised before
    that epoch's weights are used. The iterable is consumed lazily (one state in memory at a time).
    """
    out = []
    previous = after_epoch
    for item in weights:
        if not isinstance(item, tuple) or len(item) not in (2, 3):
            raise RobustdropError("replay takes (epoch, state_dict) pairs or (epoch, state_dict, step) triples, "
                                  f"got {type(item).__name__}")
        epoch, state = item[0], item[1]
        step = int(item[2]) if len(item) == 3 else 0
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 1:
            raise RobustdropError(f"replay: epoch {epoch!r} is not a whole number >= 1")
        if epoch <= previous:
            raise RobustdropError(f"replay: epoch {epoch} comes after epoch {previous}; give the weights once per "
                                  "epoch, in increasing order, after the epochs already recorded")
        load_weights(model, state, what=f"the weights of epoch {epoch}")
        out.append(end_epoch(epoch, step))
        previous = epoch
    return out


def replay_hooks(observer: Observer, weights: Weights, *, evaluate: bool = False,
                 on_epoch: Callable[[int, EpochEnd], None] | None = None) -> list[EpochEnd]:
    """:func:`replay` of ``observer``'s hooks (and, with ``evaluate``, its evaluation) over
    ``weights`` loaded into ``observer.run.model``; ``on_epoch(epoch, result)`` after each epoch.
    The caller emits ``on_run_start`` first (``observer.emit("on_run_start")``)."""

    def end(epoch: int, step: int) -> EpochEnd:
        result = observer.end_epoch(epoch, step, evaluate=evaluate)
        if on_epoch is not None:
            on_epoch(epoch, result)
        return result

    return replay(weights, observer.run.model, end)


# ----------------------------------------------------------------------------------------------
# A finished run's per-epoch weights (module docstring)
# ----------------------------------------------------------------------------------------------
REPLAYED_EVENT = "replayed"


def finished_training(path: Path) -> tuple[int, int, int]:
    """``(last epoch, metric rows, events)`` of the finished training of run ``path`` (its
    ``checkpoints/last.pt``); a one-line :class:`RobustdropError` when it has not finished."""
    last = path / "checkpoints" / "last.pt"
    if not last.is_file():
        raise RobustdropError(f"{path} has no checkpoints/last.pt: it has not trained yet; a replay needs a finished run")
    state = load_checkpoint_file(last, map_location="cpu")
    if not state.get("finished"):
        raise RobustdropError(f"{path} has not finished training (stopped after epoch {state.get('epoch')}); a replay "
                              f"needs every epoch: finish it first (robustdrop track --resume {path})")
    return int(state["epoch"]), int(state["num_metric_rows"]), int(state["num_events"])


def epoch_weights_files(path: Path, epochs: int) -> dict[int, Path]:
    """``{epoch: file}`` for epochs ``1..epochs`` of run ``path``: ``weights_epoch_XXXX.pt``, else
    ``epoch_XXXX.pt`` (:func:`robustdrop.store.epoch_weights`); a one-line error naming the missing."""
    kept = epoch_weights(path)
    files = {e: kept.get(e) for e in range(1, epochs + 1)}
    missing = [e for e, f in files.items() if f is None]
    if missing:
        raise RobustdropError(f"{path} lacks the weights of epochs {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                              "(checkpoints/weights_epoch_XXXX.pt or epoch_XXXX.pt); a replay needs every epoch's: "
                              "train it with --save-weights-every 1 (or --checkpoint-every 1)")
    return files  # type: ignore[return-value]


def _reference_value(reference: str | os.PathLike | None, config: TrackConfig, data: ImageData | None,
                     progress: bool) -> str | None:
    """``reference`` as the config keeps it: a run directory or file as an absolute path,
    ``builtin:NAME`` as it is, ``auto`` resolved to the cached referee (trained first if none)."""
    if reference is None:
        return None
    text = str(reference)
    if text.startswith(BUILTIN_PREFIX):
        return text
    if text == AUTO:
        return str(auto_referee(config, data, progress=progress))
    return str(Path(text).expanduser().resolve())


def replay_diagnostics(config: TrackConfig, diagnostics: str | Sequence[str] | None,
                       reference: str | None) -> tuple[TrackConfig, list[Hook]]:
    """The run's config as the replay's context sees it (with ``reference``) and the diagnostics
    to replay, built as :func:`robustdrop.diagnostics.build_hooks` builds them (same options):
    ``diagnostics=None``: those of the run's config (``default`` if it had none) that need the
    reference; else the words given (``--diagnostics`` syntax, e.g. ``["wong:n=256"]``; a
    ``reference`` adds ``strength-ref`` as ``--reference`` does). One-line errors when nothing is
    left or a diagnostic cannot be replayed."""
    config = dataclasses.replace(config, reference=reference) if reference is not None else config
    if diagnostics is None:
        words = config.diagnostics if "none" not in config.diagnostics else ["default"]
        chosen = {n: o for n, o in select(words, reference=reference).items() if DIAGNOSTICS[n].needs_reference}
    else:
        chosen = select(_words(diagnostics), reference=reference)
    _check_chosen(chosen)
    return config, [create_diagnostic(name, config, **options) for name, options in chosen.items()]


def _check_chosen(chosen: Mapping[str, Any]) -> None:
    if not chosen:
        raise RobustdropError("nothing to replay: give reference= (the referee the run's strength-ref diagnostic "
                              "measures against) or diagnostics= (e.g. ['wong'])")
    for name in chosen:
        if not DIAGNOSTICS[name].replayable:
            raise RobustdropError(f"the {name} diagnostic cannot be replayed over saved weights (it reads the epoch's "
                                  f"evaluation and the other diagnostics); leave it out of diagnostics")


def check_replay_words(diagnostics: str | Sequence[str] | None, reference: str | None) -> None:
    """What can be checked of a replay before the run exists (a sweep's replay cell): the
    diagnostics' names and options, that each can be replayed, and that there is something to
    replay (``diagnostics=None`` needs a ``reference``). One-line :class:`RobustdropError`."""
    if diagnostics is None:
        if not reference:
            _check_chosen({})
        return
    _check_chosen(select(_words(diagnostics), reference=reference))


def _referee_identity(hooks: Sequence[Hook]) -> tuple[str | None, str | None]:
    """``(referee path, SHA-256 of its weights file)`` of the hooks that measure against one
    (a referee trained again at the same path is another referee)."""
    for hook in hooks:
        source = getattr(hook, "source", None)
        if getattr(hook, "needs_reference", False) and source is not None:
            return str(source.path), source.sha256 or sha256_file(source.checkpoint)
    return None, None


def _replay_key(hooks: Sequence[Hook]) -> dict[str, Any]:
    reference, sha = _referee_identity(hooks)
    return {"diagnostics": [h.state_key for h in hooks], "reference": reference, "reference_sha256": sha}


def _same_replay(event: Mapping[str, Any], key: Mapping[str, Any]) -> bool:
    return all(event.get(k) == v for k, v in key.items())


def finished_replays(store: RunStore, events_after: int) -> list[dict[str, Any]]:
    """The ``replayed`` events recorded after the training's first ``events_after`` events."""
    return [e for e in store.events()[events_after:] if e["kind"] == REPLAYED_EVENT]


def _settle_log(store: RunStore, rows0: int, events0: int, sources: set[str]) -> list[str]:
    """Make the log the training's plus the finished replays that do not measure ``sources``:
    what an interrupted replay left after the last finished one is dropped, and so are earlier
    replays of the same diagnostics (the later replays are kept, renumbered). Returns the state
    keys of the replays dropped."""
    done = finished_replays(store, events0)
    end_rows, end_events = (done[-1]["rows"][1], done[-1]["events"][1] + 1) if done else (rows0, events0)
    if (store.num_metric_rows, store.num_events) != (end_rows, end_events):
        store.truncate_logs(end_rows, end_events)
    stale = [e for e in done if sources & set(e["sources"])]
    if not stale:
        return []
    rows, events = store.metrics().to_dict("records"), store.events()
    store.truncate_logs(rows0, events0)
    for e in done:  # each replay's block: its rows and events, then its own event
        if e in stale:
            continue
        (r0, r1), (e0, e1) = e["rows"], e["events"]
        start_rows, start_events = store.num_metric_rows, store.num_events
        store.log_metrics(rows[r0:r1])
        for ev in events[e0:e1]:
            store.log_event(**ev)
        store.log_event(**{**e, "rows": [start_rows, store.num_metric_rows],
                           "events": [start_events, store.num_events]})
    return [k for e in stale for k in e["diagnostics"]]


def is_replayed(run_dir: str | os.PathLike, *, reference: str | os.PathLike | None = None,
                diagnostics: str | Sequence[str] | None = None) -> bool:
    """Whether :func:`replay_run` with these arguments would reuse a finished replay of the run
    (``reference="auto"``: one asked for with ``auto``; the cached referee is not looked up)."""
    path = Path(run_dir)
    if not (path / RunStore.CONFIG).is_file():
        return False
    store = RunStore.open(path)
    if str(reference) == AUTO:
        return any(e.get("request") == {"reference": AUTO, "diagnostics": _words(diagnostics)}
                   for e in finished_replays(store, 0))
    config = TrackConfig.from_dict(store.read_json(RunStore.CONFIG))
    _, hooks = replay_diagnostics(config, diagnostics, _reference_value(reference, config, None, False))
    key = _replay_key(hooks)
    return any(_same_replay(e, key) for e in finished_replays(store, 0))


def _words(diagnostics: str | Sequence[str] | None) -> list[str] | None:
    return None if diagnostics is None else [diagnostics] if isinstance(diagnostics, str) else list(diagnostics)


def replay_run(run_dir: str | os.PathLike, *, reference: str | os.PathLike | None = None,
               diagnostics: str | Sequence[str] | None = None, device: str = "auto",
               data_dir: str | None = None, progress: bool = False, data: ImageData | None = None) -> Path:
    """Measure diagnostics over the per-epoch weights of the FINISHED run ``run_dir`` after the
    fact and append their rows to its metrics (module docstring); returns the run directory.

    Args:
        reference: the referee (a run directory, a checkpoint, ``builtin:NAME`` or ``auto``) for
            the diagnostics that need one (``strength-ref``: the paper's Fig. 2, §3).
        diagnostics: ``None``: the run's diagnostics that need ``reference`` (a referee
            measurement deferred until the referee finished); else the diagnostics to replay,
            ``--diagnostics`` words (e.g. ``["wong"]``).
        device: where to measure (``auto``, ``cpu``, ``cuda:N``).
        data_dir: the dataset's folder, when it is elsewhere than the run's config says.
        progress: a progress bar over the epochs (on a terminal; else a line per epoch).
        data: the run's data in memory (tests, notebooks), instead of loading its config's dataset.

    Idempotent: a finished replay with the same diagnostics, options and referee (its SHA-256)
    is reused; an interrupted one starts over. Every check (finished run, every epoch's weights,
    diagnostics, referee, not measured during training already) is made before anything is
    written; while writing the run's :class:`~robustdrop.store.RunLock` is held (a second replay
    of the run waits for it).
    """
    path = RunStore.check_run_dir(run_dir)
    config = TrackConfig.from_dict(RunStore.open(path).read_json(RunStore.CONFIG))
    epochs, rows0, events0 = finished_training(path)
    files = epoch_weights_files(path, epochs)
    config = dataclasses.replace(config, device=device, threads=0,  # the caller's device and threads
                                 data_dir=config.data_dir if data_dir is None else str(data_dir))
    context_config, hooks = replay_diagnostics(config, diagnostics,
                                               _reference_value(reference, config, data, progress))
    key = _replay_key(hooks)
    sources = {h.name for h in hooks}
    # Two replays of one run (two sweep cells) take turns; a run that changed while this one
    # waited (trained again) is checked again.
    with RunLock(path, wait=f"{path}: waiting to replay until its other writer ends"):
        epochs, rows0, events0 = finished_training(path)
        files = epoch_weights_files(path, epochs)
        store = RunStore.open(path)
        during = sorted(sources & set(store.metrics()["source"].iloc[:rows0]))
        if during:
            raise RobustdropError(f"{path} measured {', '.join(during)} during training already; a replay would add "
                                  "its rows twice: leave it out of diagnostics")
        if any(_same_replay(e, key) for e in finished_replays(store, events0)):
            _settle_log(store, rows0, events0, set())  # only what an interrupted replay left is dropped
            store.flush()
            print(f"{path}: reusing the replay of {', '.join(key['diagnostics'])}", flush=True)
            return path
        caller_rng = rng_state()  # the trainer's set-up seeds the global generators: the caller's come back
        try:
            trainer = Trainer(context_config, store, hooks, progress=False, data=data).prepare()
            dropped = _settle_log(store, rows0, events0, sources)
            if dropped:
                print(f"{path}: replacing the earlier replay of {', '.join(dropped)}", flush=True)
            start_rows, start_events = store.num_metric_rows, store.num_events
            _replay_epochs(trainer.observer, files, path, progress)
        finally:
            set_rng_state(caller_rng)
        run = trainer.run
        store.log_event(REPLAYED_EVENT, epoch=run.epoch, step=run.step, **key, sources=sorted(sources),
                        request={"reference": None if reference is None else str(reference),
                                 "diagnostics": _words(diagnostics)},
                        epochs=len(files), rows=[start_rows, store.num_metric_rows],
                        events=[start_events, store.num_events])
        store.flush()
    return path


def _replay_epochs(observer: Observer, files: Mapping[int, Path], path: Path, progress: bool) -> None:
    """The run's events over every epoch's weights, as the trainer emits them: run start, each
    epoch's end (the due hooks, no evaluation: the training logged it), run end."""
    device = observer.run.device

    def weights() -> Iterator[tuple[int, Mapping[str, torch.Tensor], int]]:
        for epoch, file in files.items():
            state = load_checkpoint_file(file, map_location=device)
            yield epoch, state["model"], int(state["step"])

    bar = progress_bar(enabled=progress, total=len(files), desc=f"replay {path.name}", unit="epoch")

    def done(epoch: int, _: EpochEnd) -> None:
        bar.update(1)
        if bar.disable:
            print(f"{path.name}: replayed epoch {epoch}/{len(files)}", flush=True)

    try:
        observer.emit("on_run_start")  # at epoch 0, as in training (strength-ref logs its referee)
        replay_hooks(observer, weights(), on_epoch=done)
        observer.emit("on_run_end")
    finally:
        bar.close()
