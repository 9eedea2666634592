"""robustdrop's diagnostics on any PyTorch training loop: :class:`Monitor`.

>>> monitor = robustdrop.Monitor(model, epsilon=8/255, probe=test_set, normalize=(mean, std),
...                              reference="builtin:quick", runs_dir="runs", name="my-fgsm")
>>> for epoch in range(1, epochs + 1):
...     for x, y in loader:
...         ...                                   # the user's own step, untouched
...         monitor.observe(x, y, delta=delta)    # optional: the training perturbation
...     report = monitor.epoch_end(epoch)         # evaluation + diagnostics + detector
...     if report.collapse: ...
>>> monitor.close()

The monitor writes an ordinary run directory (``config.json``, ``manifest.json``, metrics,
events, arrays; no checkpoints: the user's loop keeps its own), so every ``robustdrop plot``,
``compare`` and ``export`` command reads it. Everything it measures happens under
:func:`robustdrop.engine.guarded`: the user's training is left exactly as it was. The epoch's end
is the trainer's (:class:`robustdrop.engine.Observer`), so a monitored loop that trains as
``robustdrop track`` does logs the same numbers. Pixel space: probe, ε, attacks, noise and the
referee are in [0, 1] pixels; a model that takes normalized inputs is wrapped for the monitor's
own use (``normalize=(mean, std)``). docs/monitor.md has the whole story.
"""

from __future__ import annotations

import dataclasses
import math
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustdrop.attacks import AttackSpec
from robustdrop.data import Batch, ImageData, probe_from
from robustdrop.diagnostics import AUTO, CollapseDiagnostic, build_hooks
from robustdrop.diagnostics.replay import Weights, replay
from robustdrop.engine import Observer, TrackConfig, check_logits, make_context
from robustdrop.environment import device_name, versions
from robustdrop.errors import RobustdropError
from robustdrop.formatting import eps_in_255ths
from robustdrop.methods import StepOutput, TrainingMethod, available_methods, create_method
from robustdrop.models.user import Normalized, normalization
from robustdrop.store import RunLock, RunStore, metric_row

STATE_FORMAT = "robustdrop-monitor-1"
# TrackConfig fields a Monitor takes as keyword arguments (the rest describe robustdrop's own
# training and stay at their defaults; `model`, `dataset`, `method` only label the run).
CONFIG_FIELDS = (
    "dataset", "model", "method", "alpha", "epochs", "batch_size", "probe_size", "eval_every", "eval_epsilon",
    "eval_pgd_steps", "eval_pgd_step_size", "eval_restarts", "eval_batch_size", "eval_precision", "diagnostics",
    "on_collapse", "seed", "train_subset", "optimizer", "lr", "momentum", "weight_decay", "schedule", "lr_peak_at",
)
ON_COLLAPSE = ("warn", "stop")  # the monitor cannot roll back or switch the user's training


# ----------------------------------------------------------------------------------------------
# What epoch_end returns
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EpochReport:
    """One epoch's values and the collapse detector's state.

    ``values``: the epoch's channel (``run.metrics``): ``probe/acc/none|fgsm|pgd``,
    ``probe/loss/...``, ``strength/strength_ratio``, ``strength/grad_alignment``,
    ``strength/cos_fgsm_pgd``, ``strength-ref/ref_acc_fgsm`` (with a referee),
    ``collapse/collapse_score``, ... (docs/monitor.md lists them). ``warning`` / ``collapse``:
    the early / confirmatory rule has fired (this epoch or before), at ``warning_epoch`` /
    ``onset_epoch``. ``stop``: with ``on_collapse="stop"``, the detector's reason to stop
    (the monitor never stops the training itself).
    """

    epoch: int
    step: int
    values: dict[str, float]
    warning: bool = False
    warning_epoch: int | None = None
    collapse: bool = False
    onset_epoch: int | None = None
    stop: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def clean_acc(self) -> float | None:
        return self.values.get("probe/acc/none")

    @property
    def fgsm_acc(self) -> float | None:
        return self.values.get("probe/acc/fgsm")

    @property
    def pgd_acc(self) -> float | None:
        return self.values.get("probe/acc/pgd")

    def line(self) -> str:
        """One line for a log: the probe accuracies, cos(δ_FGSM, δ_PGD), the referee on FGSM δ vs noise,
        the detector. (Not the FGSM/noise loss ratio: it is ill-conditioned once noise barely moves the loss.)"""
        parts = [f"epoch {self.epoch}"]
        accs = [(k, self.values.get(f"probe/acc/{a}")) for k, a in (("clean", "none"), ("fgsm", "fgsm"), ("pgd", "pgd"))]
        if any(v is not None for _, v in accs):
            parts.append("probe " + " ".join(f"{k} {v:.3f}" for k, v in accs if v is not None))
        cos = self.values.get("strength/cos_fgsm_pgd")
        if cos is not None:
            parts.append(f"cos(δ_FGSM, δ_PGD) {cos:.2f}")
        ref_fgsm, ref_noise = self.values.get("strength-ref/ref_acc_fgsm"), self.values.get("strength-ref/ref_acc_noise")
        if ref_fgsm is not None and ref_noise is not None:
            parts.append(f"referee on FGSM δ {ref_fgsm:.3f} vs noise {ref_noise:.3f}")
        if self.collapse:
            parts.append(f"COLLAPSE (onset epoch {self.onset_epoch})")
        elif self.warning:
            parts.append(f"collapse warning (epoch {self.warning_epoch})")
        return " | ".join(parts)


# ----------------------------------------------------------------------------------------------
# The training method, as far as the monitor knows it
# ----------------------------------------------------------------------------------------------
class ObservedTraining(TrainingMethod):
    """The user's training method, described, never run: its name and perturbation spec label the
    training-perturbation rows (``attack=train-perturbation``, ε, steps, step size)."""

    def __init__(self, name: str, spec: AttackSpec):
        self.name = name
        self._spec = spec

    def perturbation_spec(self) -> AttackSpec:
        return self._spec


def _method(config: TrackConfig) -> TrainingMethod:
    """A registered method's own object (its spec, e.g. FGSM at ε with step α), else a description."""
    if config.method in available_methods():
        return create_method(config)
    step = config.alpha if config.alpha is not None else math.nan
    return ObservedTraining(config.method, AttackSpec(config.method, config.epsilon, 0, step, 0))


# ----------------------------------------------------------------------------------------------
# The monitor
# ----------------------------------------------------------------------------------------------
class Monitor:
    """robustdrop's per-epoch evaluation, diagnostics and collapse detector on a training loop
    that robustdrop does not run.

    Args:
        model: the user's model (never modified; its mode, gradients, buffers and the global random
            states are as before after every call).
        epsilon: the L∞ radius in [0, 1] pixel units (8/255), also with ``normalize``.
        probe: what to evaluate on (:func:`robustdrop.data.probe_from`): a Dataset, a DataLoader, ``(images,
            labels)`` tensors (uint8, or float in [0, 1]) or a dataset name; of a larger set the
            seeded class-balanced ``probe_size`` subset that ``track`` takes.
        normalize: ``(mean, std)`` when the model takes ``(x - mean) / std`` (per channel).
        reference: a referee for ``strength-ref``: ``builtin:quick``, a run directory or checkpoint.
        runs_dir, name: the run directory ``runs_dir/name``, made at the first write (an existing one is
            refused then, unless :meth:`load_state_dict` continues it or ``overwrite``).
        steps_per_epoch: optimizer steps per epoch, when known (``len(loader)``): the strength
            diagnostic then samples the training perturbation at least once per epoch.
        callback: called with each :class:`EpochReport`.
        overwrite: replace an existing run directory of that name.
        progress: print one line per epoch (:meth:`EpochReport.line`).
        **config: TrackConfig fields of :data:`CONFIG_FIELDS`, e.g. ``epochs`` (the last epoch gets
            the referee's PGD ceiling as in ``track``), ``probe_size`` (1000), ``seed`` (0),
            ``diagnostics`` (``["default"]``; ``["all"]`` adds landscapes), ``eval_pgd_steps`` (20),
            ``eval_pgd_step_size`` (2/255), ``on_collapse`` (``warn`` | ``stop``), ``method`` (a
            label; a registered one, e.g. ``fgsm``, gives its perturbation spec), ``dataset``, ``model``.

    Raises:
        RobustdropError: bad input, before anything is written: a model output that is not
            ``(N, classes)``, a probe of the wrong dtype or range, ε <= 0 or not finite, an
            unknown referee or diagnostic.
    """

    def __init__(self, model: nn.Module, /, *, epsilon: float, probe: Any, normalize: Any = None,
                 reference: str | None = None, runs_dir: str | Path = "runs", name: str | None = None,
                 steps_per_epoch: int | None = None, callback: Callable[[EpochReport], Any] | None = None,
                 overwrite: bool = False, progress: bool = True, classes: Sequence[str] | None = None, **config: Any):
        if not isinstance(model, nn.Module):
            raise RobustdropError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.config = _config(model, epsilon, reference, config)
        self.device = _device_of(model)
        images, labels, names, dataset = probe_from(probe, probe_size=self.config.probe_size, seed=self.config.seed,
                                                     classes=classes)
        # config.json says what was used: the device, the probe's size and (unless labelled) its source
        self.config.device, self.config.probe_size = str(self.device), len(labels)
        if "dataset" not in config:
            self.config.dataset = dataset
        self.normalization = normalization(normalize, images.shape[1], self.device)
        self.view = model if self.normalization is None else Normalized(model, *self.normalization)
        num_classes = check_logits(self.view, images, labels, self.device)
        if names and len(names) != num_classes:
            raise RobustdropError(f"the model has {num_classes} outputs but the probe names {len(names)} classes; "
                                  "give classes= with one name per output")
        data = ImageData(self.config.dataset, images[:0], labels[:0], images, labels,
                         names or [str(c) for c in range(num_classes)])
        self.store = RunStore(Path(runs_dir) / (name or _default_name(model, self.config)))
        if self.store.path.exists() and not self.store.path.is_dir():
            raise RobustdropError(f"{self.store.path} exists and is not a folder; choose another name or runs_dir")
        # An existing run is refused at the first write unless load_state_dict continues it (a
        # resumed training makes its Monitor before it reads its checkpoint).
        self.overwrite = overwrite
        if steps_per_epoch is not None and steps_per_epoch < 1:
            raise RobustdropError(f"steps_per_epoch must be at least 1 (len(loader)), got {steps_per_epoch}")
        hooks = build_hooks(self.config)
        run = make_context(self.config, self.store, self.view, device=self.device, data=data,
                           probe=(images.to(self.device), labels.to(self.device)), method=_method(self.config),
                           steps_per_epoch=steps_per_epoch or 0)
        self.observer = Observer(run, hooks)
        self.observer.emit("on_run_start")  # a referee that does not fit the probe fails here, nothing written
        self.callback = callback
        self.progress = progress
        self.epoch = 0  # the last epoch recorded
        self._steps = 0  # observe() calls so far (the step column)
        self._lock: RunLock | None = None
        self._closed = False
        self._train = _TrainStats()
        self._mark = time.perf_counter()  # the last epoch end (time_train_s = the wall time since, minus ours)
        self._own_s = 0.0  # the monitor's own seconds since then (observe)

    # -- the run -------------------------------------------------------------------------------
    @property
    def run(self):
        """The :class:`~robustdrop.engine.RunContext` the diagnostics see."""
        return self.observer.run

    @property
    def path(self) -> Path:
        """The run directory."""
        return self.store.path

    def _start(self) -> None:
        """Make the run directory, lock it and write config, manifest and the start's events (once)."""
        if self._lock is not None:
            return
        if self._closed:
            raise RobustdropError(f"this Monitor of {self.path} was closed; make a new one (and load_state_dict "
                                  "its state) to record more epochs")
        try:
            self.store.check_new(overwrite=self.overwrite)
        except RobustdropError:
            raise RobustdropError(f"run directory {self.path} already exists; continue it with "
                                  "monitor.load_state_dict(state) before training, or pass overwrite=True or "
                                  "another name") from None
        self.store.make_directory()
        self._lock = RunLock(self.path).acquire()
        if self.overwrite:
            events = self.store.events()
            self.store.clear()
            for e in events:  # clear() forgets the start's events (the referee's); they belong to this run
                self.store.log_event(**e)
        self._write_config()
        self.store.write_json(RunStore.MANIFEST, self._manifest())
        self.store.flush()

    def _write_config(self) -> None:
        """config.json: the resolved TrackConfig; with unknown ``epochs``, the epochs recorded so far."""
        values = self.config.to_dict()
        if not values["epochs"]:
            values["epochs"] = self.epoch
        self.store.write_json(RunStore.CONFIG, values)

    def _manifest(self) -> dict[str, Any]:
        run = self.run
        normalize = None if self.normalization is None else [t.tolist() for t in self.normalization]
        return {
            "seed": self.config.seed, **versions(), "device": str(self.device), "device_name": device_name(self.device),
            "threads": torch.get_num_threads(), "host": socket.gethostname(),
            "start_time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": sys.argv,
            "dataset": {"name": self.config.dataset, "probe": len(run.probe[1]), "classes": run.data.classes},
            "monitor": {"model": f"{type(self.model).__module__}.{type(self.model).__qualname__}",
                        "normalize": normalize, "steps_per_epoch": run.steps_per_epoch or None,
                        "epsilon_units": "pixels in [0, 1]"},
        }

    # -- the training loop's calls ---------------------------------------------------------------
    def observe(self, x: torch.Tensor, y: torch.Tensor, delta: torch.Tensor | None = None, *,
                loss: torch.Tensor | float | None = None, logits: torch.Tensor | None = None) -> None:
        """Record one optimizer step (call it once per step, after the step).

        ``x``: the step's clean inputs and ``delta`` the training perturbation added to them, both
        in the MODEL's input space, as the loop has them: with ``normalize``, ``x`` normalized and
        ``delta`` in normalized units (``(x + delta)`` is what the model saw); the monitor converts
        them to pixels (``x·std + mean``, ``delta·std``). ``loss`` (the step's mean loss) and
        ``logits`` (on ``x + delta``) give the epoch's training loss and accuracy rows. Cheap: the
        strength diagnostic samples δ every ``train_every`` (10) steps, the rest is a count.
        """
        start = time.perf_counter()
        self._steps += 1
        run = self.run
        run.step = self._steps
        if loss is not None or logits is not None:
            self._train.add(y, loss, logits)
        due = [h for h in self.observer.hooks if h.wants_step(self._steps)] if delta is not None else []
        if due:
            self._start()
            batch, out = self._pixels(x, y, delta, loss, logits)
            self.observer.emit("on_train_step", batch, out, hooks=due)
        self._own_s += time.perf_counter() - start

    def _pixels(self, x: torch.Tensor, y: torch.Tensor, delta: torch.Tensor, loss: Any, logits: Any
                ) -> tuple[Batch, StepOutput]:
        x, delta = x.detach().to(self.device), delta.detach().to(self.device)
        if self.normalization is not None:
            mean, std = (t.view(1, -1, 1, 1) for t in self.normalization)
            x, delta = x * std + mean, delta * std
        loss = torch.as_tensor(math.nan if loss is None else loss).detach()
        logits = torch.empty(0) if logits is None else logits.detach()
        return (Batch(x=x, y=y.detach().to(self.device), index=torch.empty(0, dtype=torch.int64), crop=None),
                StepOutput(loss=loss, logits=logits, delta=delta))

    def epoch_end(self, epoch: int, *, step: int | None = None) -> EpochReport:
        """The end of ``epoch`` (1-based, after the previous one): the probe evaluation (clean,
        FGSM, PGD as in ``track``), the diagnostics due, the collapse detector; rows and events
        written to the run directory. ``step``: the optimizer step now (default: observe() calls).
        Returns the :class:`EpochReport` (also given to ``callback``)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 1:
            raise RobustdropError(f"epoch_end: epoch must be a whole number >= 1, got {epoch!r}")
        if epoch <= self.epoch:
            raise RobustdropError(f"epoch_end({epoch}): epoch {self.epoch} is already recorded; epochs must increase")
        train_s = time.perf_counter() - self._mark - self._own_s
        self._start()
        step = self._steps if step is None else int(step)
        end = self.observer.end_epoch(epoch, step, before_hooks=lambda _: self._log_train(epoch, step))
        self.epoch = epoch
        seconds = {"train": train_s, "eval": end.eval_s, "diag": end.diag_s}
        self.store.log_metrics([metric_row(epoch, step, "train", f"time_{k}_s", v) for k, v in seconds.items()])
        report = self._report(epoch, step, seconds)
        if not self.config.epochs:
            self._write_config()
        self.store.flush()
        if self.progress:
            print(report.line(), flush=True)
        if self.callback is not None:
            self.callback(report)
        self._mark, self._own_s = time.perf_counter(), 0.0
        return report

    def _log_train(self, epoch: int, step: int) -> None:
        """The epoch's training loss / accuracy rows (from observe's ``loss`` / ``logits``), as
        ``track`` logs them; the channel's ``train/loss``, ``train/acc``."""
        spec = self.run.method.perturbation_spec().as_columns()
        spec["attack"] = self.run.method.name
        rows = []
        for metric, value in self._train.means().items():
            rows.append(metric_row(epoch, step, "train", metric, value, n=self._train.seen, **spec))
            self.run.metrics[f"train/{metric}"] = value
        self.store.log_metrics(rows)
        self._train = _TrainStats()

    def _report(self, epoch: int, step: int, seconds: dict[str, float]) -> EpochReport:
        detector = next((h.detector for h in self.observer.hooks if isinstance(h, CollapseDiagnostic)), None)
        stop = self.run.stop_request
        self.run.stop_request = None
        return EpochReport(epoch=epoch, step=step, values=dict(self.run.metrics),
                           warning=bool(detector and detector.warned),
                           warning_epoch=detector.warning if detector else None,
                           collapse=bool(detector and detector.fired), onset_epoch=detector.onset if detector else None,
                           stop=stop[0] if stop else None, seconds=seconds)

    def replay(self, weights: Weights) -> list[EpochReport]:
        """:meth:`epoch_end` for saved weights: each ``(epoch, state_dict[, step])`` is loaded into
        the model, in increasing epoch order (:func:`robustdrop.diagnostics.replay.replay`). The
        model's weights are those of the last epoch afterwards."""
        return replay(weights, self.model, lambda epoch, step: self.epoch_end(epoch, step=step or None),
                      after_epoch=self.epoch)

    def close(self) -> None:
        """End the run: ``on_run_end`` of the hooks, the files written, the lock released."""
        if self._closed:
            return
        if self._lock is not None:
            self.observer.emit("on_run_end")
            self.store.flush()
            self._lock.release()
            self._lock = None
        self._closed = True

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- resume ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What continues this run in a later process: the run position, the hooks' states (the
        collapse detector's among them) and the log lengths. Store it in the training's own
        checkpoint after :meth:`epoch_end`; plain types and tensors (``torch.load(weights_only=True)``)."""
        return {
            "format": STATE_FORMAT, "epoch": self.epoch, "step": self._steps,
            "hooks": {h.state_key: h.state_dict() for h in self.observer.hooks},
            "num_metric_rows": self.store.num_metric_rows, "num_events": self.store.num_events,
            "train": self._train.state_dict(), "config": self.config.to_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the run ``state`` came from (a new Monitor with the same arguments, before the
        next observe / epoch_end): the run directory is reopened and its rows and events after the
        state was taken are dropped, so the resumed run has no epoch twice and none missing."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise RobustdropError("load_state_dict: not a Monitor state (give what Monitor.state_dict() returned)")
        if self._lock is not None or self.epoch:
            raise RobustdropError("load_state_dict: call it on a new Monitor, before its first observe / epoch_end")
        saved, current = dict(state["config"]), self.config.to_dict()
        diff = sorted(k for k in current if k != "epochs" and saved.get(k) != current[k])
        if diff:
            raise RobustdropError(f"load_state_dict: the state was taken with other settings (differs in {diff}); "
                                  "make the Monitor with the same arguments")
        RunStore.check_run_dir(self.path)
        self._lock = RunLock(self.path).acquire()
        store = RunStore.open(self.path)
        store.truncate_logs(int(state["num_metric_rows"]), int(state["num_events"]))
        self.store = self.run.store = store
        for hook in self.observer.hooks:
            if hook.state_key in state["hooks"]:
                hook.load_state_dict(state["hooks"][hook.state_key])
        self.epoch, self._steps = int(state["epoch"]), int(state["step"])
        self.run.epoch, self.run.step = self.epoch, self._steps
        self._train.load_state_dict(state.get("train", {}))
        self.store.log_event("resume", epoch=self.epoch, step=self._steps)
        self._write_config()
        self.store.flush()


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
class _TrainStats:
    """The epoch's training loss and accuracy from observe()'s ``loss`` / ``logits`` (sums on the device)."""

    def __init__(self) -> None:
        self.sums: dict[str, Any] = {}
        self.counts: dict[str, int] = {}

    def _add(self, key: str, total: Any, n: int) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + total
        self.counts[key] = self.counts.get(key, 0) + n

    def add(self, y: torch.Tensor, loss: Any, logits: torch.Tensor | None) -> None:
        n = len(y)
        if loss is not None:
            self._add("loss", torch.as_tensor(loss).detach().float() * n, n)
        if logits is not None:
            self._add("acc", (logits.detach().argmax(1) == y.to(logits.device)).sum().float(), n)

    @property
    def seen(self) -> int:
        return max(self.counts.values(), default=0)

    def means(self) -> dict[str, float]:
        return {k: float(self.sums[k]) / self.counts[k] for k in ("loss", "acc") if self.counts.get(k)}

    def state_dict(self) -> dict[str, Any]:
        return {"sums": {k: float(v) for k, v in self.sums.items()}, "counts": dict(self.counts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sums = dict(state.get("sums", {}))
        self.counts = {k: int(v) for k, v in state.get("counts", {}).items()}


def _config(model: nn.Module, epsilon: Any, reference: str | None, options: dict[str, Any]) -> TrackConfig:
    """The run's TrackConfig: ``options`` (of :data:`CONFIG_FIELDS`) over the defaults; validated
    as ``track`` validates (with the model / method labels and unknown epochs set aside)."""
    unknown = sorted(set(options) - set(CONFIG_FIELDS))
    if unknown:
        raise RobustdropError(f"Monitor has no option {unknown[0]!r}; its options: {', '.join(CONFIG_FIELDS)}")
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not math.isfinite(epsilon) \
            or not 0 < epsilon <= 1:
        raise RobustdropError(f"epsilon must be a finite number in (0, 1], in pixel units (e.g. 8/255, also with "
                              f"normalize=), got {epsilon!r}")
    if reference == AUTO:
        raise RobustdropError("reference='auto' trains a referee of a robustdrop model on a robustdrop dataset; for "
                              "your training give builtin:quick, or a robustdrop run directory or checkpoint")
    values = {"model": type(model).__name__, "method": "custom", "epochs": 0, "diagnostics": ["default"],
              **options, "epsilon": float(epsilon), "reference": reference, "val_size": 0, "test_every": 0,
              "checkpoint_every": 0, "device": "auto"}
    if values.get("on_collapse", "warn") not in ON_COLLAPSE:
        raise RobustdropError(f"on_collapse={values['on_collapse']!r}: the monitor can warn or stop (report.stop); "
                              "it cannot roll back or switch your training — act on report.collapse yourself")
    if isinstance(values["diagnostics"], str):
        values["diagnostics"] = [values["diagnostics"]]
    config = TrackConfig.from_dict(values)
    checkable = dataclasses.replace(config, model=TrackConfig.model, epochs=max(config.epochs, 1),
                                    method=config.method if config.method in available_methods() else "fgsm")
    if config.epochs < 0:
        raise RobustdropError(f"epochs must be >= 1 (or left out), got {config.epochs}")
    checkable.validate()
    config.reference = checkable.reference  # "none" -> None
    return config


def _device_of(model: nn.Module) -> torch.device:
    tensor = next(iter(model.parameters()), None)
    if tensor is None:
        tensor = next(iter(model.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _default_name(model: nn.Module, config: TrackConfig) -> str:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"monitor-{type(model).__name__}-eps{eps_in_255ths(config.epsilon)}-{stamp}"
