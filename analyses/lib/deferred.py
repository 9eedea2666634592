"""The referee measurement of Figure 2 made after training, from per-epoch weights.

Where Figure 2's referee is a catalog run (paper scale, --smoke: ``lib.catalog.reference_deferred``,
the GPU plan, run_all and fig2_strength alike), Figure 2's runs train WITHOUT the referee, so
they run at the same time as the referee's own training instead of after it, and keep each epoch's
weights (:class:`lib.training.EpochWeights`). Once both are finished, :func:`measure_run` replays
every diagnostic that needs the reference (``strength-ref``) over those weights
(:func:`robustdrop.diagnostics.replay.replay_hooks`, the context built as the trainer builds it): the same
diagnostic object, options, probe set, random generators (seeded by run seed, name and epoch) and
epoch/step numbers as during training, so the rows it appends to the run's metrics are the ones an
in-training measurement logs (its ``time_s`` aside). What differs: the collapse detector ran
without the ``ref_weak`` signal during training (it fires on the other signals).

The run's log gets the event ``reference_measured`` (referee, epochs); a measurement that was
interrupted is made again from the start (the rows after the training's are dropped first).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from lib.catalog import load_data, ref_name, run_dir
from lib.setting import Setting
from lib.training import WEIGHTS_PREFIX
from robustdrop.data import probe_indices
from robustdrop.diagnostics import DIAGNOSTICS, create_diagnostic, select
from robustdrop.diagnostics.replay import replay_hooks
from robustdrop.engine import Observer, TrackConfig, make_context, resolve_device
from robustdrop.errors import RobustdropError
from robustdrop.methods import create_method
from robustdrop.models import create_model
from robustdrop.store import RunStore, epoch_files, load_checkpoint_file

MEASURED_EVENT = "reference_measured"


def weights_files(path: Path) -> dict[int, Path]:
    """``{epoch: checkpoints/weights_epoch_XXXX.pt}`` of a run."""
    return epoch_files(path, weights_only=True)


def is_measured(path: Path) -> bool:
    """Whether the run's log holds a finished deferred measurement."""
    return (path / RunStore.CONFIG).is_file() and bool(RunStore.open(path).events(MEASURED_EVENT))


def _training_log_size(path: Path) -> tuple[int, int]:
    """``(metric rows, events)`` the finished training wrote (from its last checkpoint)."""
    state = torch.load(path / "checkpoints" / "last.pt", map_location="cpu", weights_only=True, mmap=True)
    if not state.get("finished"):
        raise RobustdropError(f"{path} has not finished training; the referee measurement needs every epoch")
    return int(state["num_metric_rows"]), int(state["num_events"])


def reference_hooks(cfg: TrackConfig, reference: Path) -> list:
    """The diagnostics that need a reference, built as :func:`robustdrop.diagnostics.build_hooks`
    would build them for this run with ``--reference reference`` (same options)."""
    with_ref = dataclasses.replace(cfg, reference=str(reference))
    chosen = select(cfg.diagnostics if "none" not in cfg.diagnostics else ["default"], reference=str(reference))
    return [create_diagnostic(name, with_ref, **options) for name, options in chosen.items()
            if DIAGNOSTICS[name].needs_reference]


def measure_run(setting: Setting, name: str) -> Path:
    """Measure run ``name`` on the referee (the catalog's reference run) after the fact; returns
    the run directory. Every epoch's weights must be there."""
    path = run_dir(setting, name)
    reference = run_dir(setting, ref_name(setting))
    if is_measured(path):  # a retrained run starts a new log, without the event
        print(f"reusing the referee measurement of {path}", flush=True)
        return path
    store = RunStore.open(path)
    cfg = TrackConfig.from_dict(store.read_json(RunStore.CONFIG))
    files = weights_files(path)
    missing = sorted(set(range(1, cfg.epochs + 1)) - set(files))
    if missing:
        raise RobustdropError(f"{path} lacks the weights of epochs {missing[:5]} (checkpoints/{WEIGHTS_PREFIX}*.pt); "
                              "train it again with the GPU plan (deferred referee)")
    rows, events = _training_log_size(path)
    store.truncate_logs(rows, events)  # an interrupted measurement left rows behind: start over
    hooks = reference_hooks(cfg, reference)

    device = resolve_device(setting.device)
    channels_last = cfg.channels_last and device.type == "cuda"
    data = load_data(setting, cfg.to_dict())
    probe = probe_indices(data.test_y, min(cfg.probe_size, len(data.test_y)), cfg.seed)
    model = create_model(cfg.model, num_classes=data.num_classes, in_channels=data.image_shape[0],
                         image_size=data.image_shape[1], width=cfg.width, depth=cfg.depth).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    # The trainer's context, built the trainer's way (robustdrop.engine.make_context).
    run = make_context(cfg, store, model, device=device, data=data, method=create_method(cfg),
                       probe=(data.test_x[probe].to(device), data.test_y[probe].to(device)),
                       channels_last=channels_last)
    observer = Observer(run, hooks)
    observer.emit("on_run_start")  # at epoch 0: logs the "reference" event, as in training

    def weights():
        for epoch, file in sorted(files.items()):
            if epoch <= cfg.epochs:
                state = load_checkpoint_file(file, map_location=device)
                yield epoch, state["model"], int(state["step"])

    replay_hooks(observer, weights(),
                 on_epoch=lambda epoch, _: print(f"{name}: referee measured at epoch {epoch}", flush=True))
    store.log_event(MEASURED_EVENT, epoch=run.epoch, step=run.step, reference=str(reference),
                    diagnostics=[h.state_key for h in hooks], epochs=len(files))
    store.flush()
    return path
