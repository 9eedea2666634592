"""The training loop: train, evaluate, emit hook events, log, checkpoint, resume.

Its parts live beside it: what a checkpoint holds and restoring from it (:mod:`.checkpoint`), the
cost estimate and the progress text (:mod:`.report`), a hook's stop / rollback / switch requests
(:mod:`.control`), the end of an epoch's evaluation and hook events (:mod:`.observer`), SIGINT /
SIGTERM (:mod:`.interrupt`).
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import numpy as np
import torch
from torch import nn

from robustdrop._progress import progress_bar
from robustdrop.attacks import Attack
from robustdrop.data import ImageData, TrainLoader, load_dataset, probe_indices, train_indices
from robustdrop.engine.checkpoint import EpochProgress, checkpoint_saver, load_run_checkpoint, run_state
from robustdrop.engine.config import TrackConfig
from robustdrop.engine.control import handle_stop, handle_switch
from robustdrop.engine.estimate import Estimate, StepTimer
from robustdrop.engine.evaluate import EvalResult, autocast_for
from robustdrop.engine.hooks import Hook, RunContext
from robustdrop.engine.interrupt import Abort, Interrupts
from robustdrop.engine.memory import keep_freed_memory
from robustdrop.engine.observer import Observer, eval_rows, make_context
from robustdrop.engine.report import bar_text, dry_run_estimate, print_summary, report_estimate
from robustdrop.environment import manifest
from robustdrop.errors import FileWriteError, RobustdropError, RunInterrupted
from robustdrop.formatting import eps_in_255ths
from robustdrop.methods import MethodContext, create_method
from robustdrop.models import create_model
from robustdrop.schedules import Schedule
from robustdrop.store import RunStore, metric_row


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise RobustdropError(f"--device {name}: unknown device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RobustdropError(f"--device {name} asked for, but CUDA is not available here; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise RobustdropError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                              f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if device.type not in ("cpu", "cuda"):
        raise RobustdropError(f"--device {name} is not supported; use auto, cpu, cuda or cuda:N")
    return device


def make_optimizer(config: TrackConfig, model: nn.Module, steps_per_epoch: int) -> tuple[torch.optim.Optimizer, Schedule]:
    """The model's optimizer and its LR schedule over ``config.epochs`` epochs. With
    ``--cycle-momentum`` the schedule's ``apply`` also sets SGD's momentum (CyclicLR's cycle_momentum)."""
    if config.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                    weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = Schedule.from_config(config, config.lr, steps_per_epoch * config.epochs, steps_per_epoch,
                                    cycle_momentum=config.cycle_momentum)
    return optimizer, schedule


def default_run_name(config: TrackConfig) -> str:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{config.method}-{config.model}-eps{eps_in_255ths(config.epsilon)}-{stamp}"


class Trainer:
    """Runs one training run into a :class:`RunStore`.

    Hooks receive :attr:`run`, the :class:`RunContext` the trainer builds in :meth:`prepare` and keeps
    current (``epoch``, ``step``, the ``metrics`` channel); the trainer itself is never handed to a hook.

    :meth:`prepare` does everything that can fail on the user's input (device, data and its sizes,
    model, optimizer, method) and writes nothing, so a caller can call it before making the run
    directory; :meth:`fit` prepares if needed, then trains. On SIGINT / SIGTERM :meth:`fit`
    finishes the current step, writes a mid-epoch checkpoint and raises
    :class:`~robustdrop.errors.RunInterrupted`; ``resume`` continues from it exactly.

    Args:
        config: the resolved config.
        store: the run directory (made by the caller before :meth:`fit`).
        hooks: diagnostics to emit events to.
        resume: continue from the store's ``checkpoints/last.pt``; a config with more ``epochs``
            than the checkpoint's extends the run (see :meth:`TrackConfig.extended`).
        progress: show a progress bar per epoch (summary lines are printed either way).
    """

    def __init__(self, config: TrackConfig, store: RunStore, hooks: Sequence[Hook] = (), *, resume: bool = False,
                 progress: bool = True, data: ImageData | None = None):
        self.config = config.validate()
        self.store = store
        self.hooks = list(hooks)
        keys = [h.state_key for h in self.hooks]
        twice = sorted({k for k in keys if keys.count(k) > 1})
        if twice:
            raise RobustdropError(f"several hooks have the state key {twice[0]!r} (checkpoints keep one state per key); "
                                  "give them different options or override Hook.state_key")
        self.resume = resume
        self.progress = progress
        self.data = data
        self.run: RunContext | None = None
        self._switches: list[dict[str, Any]] = []  # method switches so far: {"epoch", "to"} (checkpointed)
        self.started = False  # training began (a failed start before it leaves nothing worth keeping)
        self._eval: list[EvalResult] = []  # the epoch's evaluation, for the metrics rows and the summary
        self._interrupts = Interrupts()
        self._progress: EpochProgress | None = None  # the epoch in progress (restored from a mid-epoch checkpoint)
        self._elapsed0 = 0.0  # wall time of the run before this process (from the checkpoint)
        self._loop_start: float | None = None
        self._timer: StepTimer | None = None  # the warm-up timer until the cost estimate is out
        self.estimate: Estimate | None = None
        self._extended_from: int | None = None  # planned epochs before this resume extended the run
        self._last_is_epoch_end = True  # whether checkpoints/last.pt holds an epoch end (not a mid-epoch state)

    # The loop's counters and a hook's stop request live on the RunContext; read-only here.
    @property
    def epoch(self) -> int:
        return self.run.epoch

    @property
    def step(self) -> int:
        return self.run.step

    @property
    def _stop(self) -> tuple[str, int | None] | None:
        return self.run.stop_request

    # ------------------------------------------------------------------------------------------
    # set-up
    # ------------------------------------------------------------------------------------------
    def prepare(self) -> Trainer:
        """Resolve the device, load the data and check the config against it, build the model,
        optimizer, schedule and method. Writes nothing; a second call does nothing."""
        if self.run is not None:
            return self
        cfg = self.config
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = resolve_device(cfg.device)
        on_cuda = self.device.type == "cuda"
        if not on_cuda:
            keep_freed_memory()  # a CPU step otherwise page-faults its buffers anew (engine/memory.py)
        self._channels_last = cfg.channels_last and on_cuda
        self._autocast = autocast_for(self.device, cfg.amp)  # the training steps only
        if on_cuda:
            torch.backends.cudnn.benchmark = True

        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)

        if self.data is None:
            self.data = load_dataset(cfg.dataset, data_dir=cfg.data_dir)
        data = self.data
        cfg.check_data(len(data.train_y), len(data.test_y), data.name)
        train_idx, val_idx = train_indices(len(data.train_y), cfg.val_size, cfg.seed, cfg.train_subset)
        self.train_images = data.train_x[train_idx]
        self.loader = TrainLoader(self.train_images, data.train_y[train_idx], cfg.batch_size, device=self.device,
                                  augment=cfg.augment, pad=4, pad_value=cfg.pad_value, channels_last=self._channels_last)
        self.val = (data.train_x[val_idx].to(self.device), data.train_y[val_idx].to(self.device))
        probe = probe_indices(data.test_y, cfg.probe_size, cfg.seed)
        self.probe = (data.test_x[probe].to(self.device), data.test_y[probe].to(self.device))
        self.test = (data.test_x.to(self.device), data.test_y.to(self.device))
        self.data_generator = torch.Generator().manual_seed(cfg.seed)

        channels, height, _ = data.train_x.shape[1:]
        self.model = create_model(cfg.model, num_classes=data.num_classes, in_channels=channels,
                                  image_size=height, width=cfg.width, depth=cfg.depth).to(self.device)
        if self._channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        steps_per_epoch = len(self.loader)
        total = steps_per_epoch * cfg.epochs
        self.optimizer, self.schedule = make_optimizer(cfg, self.model, steps_per_epoch)
        self.method = create_method(cfg)
        self._method_context = MethodContext(len(train_idx), tuple(data.train_x.shape[1:]), total, steps_per_epoch,
                                             self.device)
        self.method.setup(self.model, self._method_context)
        self.saver = checkpoint_saver(cfg, self.store)  # the store's checkpoint policy with this run's options
        self.run = make_context(cfg, self.store, self.model, device=self.device, data=data, probe=self.probe,
                                method=self.method, optimizer=self.optimizer, train_images=self.train_images,
                                train_labels=data.train_y[train_idx],
                                steps_per_epoch=steps_per_epoch, channels_last=self._channels_last)
        # Evaluation, the hook guard and events: the one home shared with the Monitor and the replay.
        self.observer = Observer(self.run, self.hooks, val=self.val, test=self.test)
        self.eval_attacks: list[Attack | None] = self.observer.attacks
        return self

    # ------------------------------------------------------------------------------------------
    # checkpoints (what they hold, restoring, extending: engine/checkpoint.py)
    # ------------------------------------------------------------------------------------------
    def _save_checkpoint(self, finished: bool = False) -> None:
        self.saver.save(run_state(self, finished), self.epoch, metrics=self.run.metrics)

    # ------------------------------------------------------------------------------------------
    # hooks
    # ------------------------------------------------------------------------------------------
    def _emit(self, event: str, *args: Any, hooks: Sequence[Hook] | None = None) -> float:
        return self.observer.emit(event, *args, hooks=hooks)

    # ------------------------------------------------------------------------------------------
    # the loop
    # ------------------------------------------------------------------------------------------
    def fit(self) -> RunStore:
        """Train (or continue) the run to ``config.epochs``; returns the store.

        Raises:
            RunInterrupted: SIGINT / SIGTERM arrived; a checkpoint to resume from was written first.
            RobustdropError: bad input or environment (one line); a write failure during training
                says that the last checkpoint is intact and how to continue.
        """
        with self._interrupts:
            try:
                return self._fit()
            except FileWriteError as exc:
                if not self.started:
                    raise
                raise FileWriteError(f"{exc}; the run's last checkpoint is intact: once fixed, continue it with "
                                     f"`robustdrop track --resume {self.store.path}`") from exc

    def _fit(self) -> RunStore:
        self.prepare()
        cfg = self.config
        if self.resume:
            finished = load_run_checkpoint(self)
            if finished and self._extended_from is None:
                print(f"{self.store.path}: the run already finished at epoch {self.epoch}; nothing to resume")
                return self.store
            where = (f"in epoch {self.epoch + 1} after step {self._progress.steps_done} of {len(self.loader)}"
                     if self._progress else f"after epoch {self.epoch}")
            extended = (f", extended from {self._extended_from} to {cfg.epochs} epochs"
                        if self._extended_from is not None else "")
            print(f"resuming {self.store.path} {where} (step {self.step}){extended}", flush=True)
        else:
            self.store.write_json(RunStore.CONFIG, cfg.to_dict())
            self.store.write_json(RunStore.MANIFEST, self._manifest())
        self._emit("on_run_start")
        self.started = True
        self._loop_start = time.perf_counter()
        self._timer = StepTimer(self.device)
        while self.epoch < cfg.epochs:
            self.run.epoch += 1
            self.run.metrics.clear()
            times = self._train_epoch()
            finished = self._end_epoch(times)
            if finished:
                break
            if self._interrupts.requested:  # arrived during the epoch's end: its checkpoint is the resume point
                raise self._interrupted(f"after epoch {self.epoch}")
        return self.store

    def _end_epoch(self, times: dict[str, float]) -> bool:
        """Evaluate, run the diagnostics, log, checkpoint; returns whether the run is finished.

        A signal during evaluation or diagnostics aborts them: the state at the end of the epoch's
        steps (hook states and logs as before the evaluation) is checkpointed instead."""
        cfg = self.config
        last = self.epoch == cfg.epochs
        if self._interrupts.requested:
            self._stop_mid_epoch()
        before = self._snapshot()
        try:
            with self._interrupts.abortable():
                start = time.perf_counter()
                self._evaluate_epoch()
                times["eval"] = time.perf_counter() - start
                due = [h for h in self.hooks if h.wants_epoch(self.epoch, last=last)]
                times["diag"] += self._emit("on_epoch_end", self.epoch, hooks=due)
        except Abort:
            self._restore(before)
            self._stop_mid_epoch()
        self._log_epoch(times)
        finished = last or self._stop is not None
        if self._stop is not None:
            handle_stop(self)
        elif self.run.switch_request is not None and not last:
            handle_switch(self)
        if finished:
            self._emit("on_run_end")
        self.store.flush()
        self._save_checkpoint(finished=finished)
        self._progress, self._last_is_epoch_end = None, True
        print_summary(self, times)
        return finished

    def _step(self, batch: Any) -> tuple[float, Any]:
        """One optimizer step of the method on ``batch``; returns (the step's LR, its StepOutput)."""
        lr = self.schedule.apply(self.optimizer)
        with self._autocast():
            out = self.method.train_step(self.model, batch, self.optimizer)
        self.schedule.step()
        self.run.step += 1
        return lr, out

    def _train_epoch(self) -> dict[str, float]:
        model = self.model
        model.train()
        step_hooks = [h for h in self.hooks if h.every_n_steps > 0]
        p = self._progress or EpochProgress.start(self.data_generator, self.device)
        if self._progress is not None:  # a mid-epoch checkpoint: draw the epoch again, skip what was done
            self.data_generator.set_state(p.generator)
        self._progress = p
        n = len(self.loader)
        bar = progress_bar(total=n, initial=p.steps_done, desc=bar_text(self, p), leave=False, enabled=self.progress)
        timer = self._timer
        if timer is not None:
            timer.begin()
        start, diag, aside = time.perf_counter(), 0.0, 0.0
        for i, batch in enumerate(self.loader.epoch(self.data_generator, start=p.steps_done), p.steps_done):
            if self._interrupts.requested:
                bar.close()
                p.train_s, p.diag_s = p.train_s + time.perf_counter() - start - diag - aside, p.diag_s + diag
                self._stop_mid_epoch()
            p.lr, out = self._step(batch)
            p.loss_sum += out.loss * len(batch.y)
            p.correct += (out.logits.argmax(1) == batch.y).sum()
            p.seen += len(batch.y)
            p.steps_done = i + 1
            due = [h for h in step_hooks if h.wants_step(self.step)]
            if due:
                diag += self._emit("on_train_step", batch, out, hooks=due)
            if timer is not None and timer.tick():
                aside += report_estimate(self, timer)
                timer = None
            if i % 20 == 0 or i == n - 1:
                mean_loss = p.loss_sum.item() / p.seen
                self._check_finite(mean_loss)
                bar.set_postfix(loss=f"{mean_loss:.3f}", acc=f"{p.correct.item() / p.seen:.3f}", lr=f"{p.lr:.3g}")
                bar.set_description(bar_text(self, p), refresh=False)
            bar.update(1)
        bar.close()
        if timer is not None and timer.finish():  # an epoch shorter than the warm-up
            aside += report_estimate(self, timer)
        p.train_s += time.perf_counter() - start - diag - aside
        p.diag_s += diag
        loss, acc = p.loss_sum.item() / p.seen, p.correct.item() / p.seen
        self._train_stats = (loss, acc, p.seen, p.lr)
        self.run.metrics.update({"train/loss": loss, "train/acc": acc, "train/lr": p.lr})
        return {"train": p.train_s, "diag": p.diag_s}

    def _check_finite(self, loss: float) -> None:
        if not math.isfinite(loss):
            self.store.log_event("nan_loss", epoch=self.epoch, step=self.step)
            self.store.flush()
            raise RobustdropError(
                f"training loss became {loss} at epoch {self.epoch}, step {self.step}; lower --lr (now {self.config.lr}) "
                f"or --epsilon; the last good checkpoint is {self.store.checkpoint_path('last')} (resume with --resume)"
            )

    def _evaluate_epoch(self) -> None:
        self._eval = self.observer.evaluate(self.epoch)

    # ------------------------------------------------------------------------------------------
    # interruption
    # ------------------------------------------------------------------------------------------
    def _snapshot(self) -> tuple[dict[str, Any], int, int, Any, Any]:
        """What the epoch's end changes besides files: hook states, log lengths, a stop or switch request."""
        states = copy.deepcopy({h.state_key: h.state_dict() for h in self.hooks})
        return states, self.store.num_metric_rows, self.store.num_events, self.run.stop_request, self.run.switch_request

    def _restore(self, snapshot: tuple[dict[str, Any], int, int, Any, Any]) -> None:
        states, rows, events, stop, switch = snapshot
        for hook in self.hooks:
            hook.load_state_dict(states[hook.state_key])
        self.store.truncate_logs(rows, events)
        self.run.stop_request, self.run.switch_request = stop, switch

    def _stop_mid_epoch(self) -> None:
        """Checkpoint the epoch in progress (``last.pt`` only) and raise :class:`RunInterrupted`."""
        p = self._progress
        self.store.flush()
        self.saver.save_mid_epoch(run_state(self, finished=False, progress=p))
        n = len(self.loader)
        where = f"in epoch {self.epoch} after step {p.steps_done} of {n}" if p.steps_done < n else \
            f"after the training steps of epoch {self.epoch} (its evaluation runs on resume)"
        raise self._interrupted(where)

    def _interrupted(self, where: str) -> RunInterrupted:
        signum = self._interrupts.signum
        name = RunInterrupted(signum, "").signal_name
        return RunInterrupted(signum, f"stopped by {name} {where}; checkpoint saved: continue with "
                                      f"`robustdrop track --resume {self.store.path}`")

    # ------------------------------------------------------------------------------------------
    # cost and progress (the estimate and the progress text: engine/report.py); the epoch's rows
    # ------------------------------------------------------------------------------------------
    def _elapsed(self) -> float:
        """Wall time of the run's training loop so far, across resumes."""
        now = time.perf_counter() - self._loop_start if self._loop_start is not None else 0.0
        return self._elapsed0 + now

    def dry_run(self) -> Estimate:
        """The cost estimate of the whole run from a few training steps of this (prepared, never
        fitted) trainer's model, and the evaluation timed on a probe slice. Writes nothing."""
        self.prepare()
        return dry_run_estimate(self)

    def _log_epoch(self, times: dict[str, float]) -> None:
        loss, acc, seen, lr = self._train_stats
        spec = self.method.perturbation_spec().as_columns()
        spec["attack"] = self.method.name
        rows = [
            metric_row(self.epoch, self.step, "train", "loss", loss, n=seen, **spec),
            metric_row(self.epoch, self.step, "train", "acc", acc, n=seen, **spec),
            metric_row(self.epoch, self.step, "train", "lr", lr),
        ]
        if self.config.cycle_momentum:  # the momentum of the epoch's last step, like lr
            rows.append(metric_row(self.epoch, self.step, "train", "momentum",
                                   self.optimizer.param_groups[0]["momentum"]))
        rows += [metric_row(self.epoch, self.step, "train", f"time_{k}_s", v) for k, v in times.items()]
        rows += [
            metric_row(self.epoch, self.step, "train", "passes_forward", self.method.forward_passes, source="cost"),
            metric_row(self.epoch, self.step, "train", "passes_backward", self.method.backward_passes, source="cost"),
        ]
        rows += [metric_row(self.epoch, self.step, "train", k, v, source=self.method.name, epsilon=self.config.epsilon)
                 for k, v in self.method.epoch_metrics().items()]
        rows += eval_rows(self.epoch, self.step, self._eval)
        self.store.log_metrics(rows)

    def _manifest(self) -> dict[str, Any]:
        """The machine's facts (:func:`robustdrop.environment.manifest`) and this run's."""
        return {
            "seed": self.config.seed,
            **manifest(self.device),
            "amp_bf16": self.device.type == "cuda" and self.config.amp,
            "eval_bf16": self.device.type == "cuda" and self.config.eval_precision == "bf16",
            "channels_last": self._channels_last,
            "dataset": {"name": self.data.name, "train": len(self.train_images), "val": len(self.val[1]),
                        "probe": len(self.probe[1]), "test": len(self.test[1]), "classes": self.data.classes},
        }
