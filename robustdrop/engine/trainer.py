"""The training loop: train, evaluate, emit hook events, log, checkpoint, resume."""

from __future__ import annotations

import contextlib
import copy
import math
import os
import platform
import random
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

import robustdrop
from robustdrop.attacks import Attack
from robustdrop.data import ImageData, TrainLoader, load_dataset, probe_indices, train_indices
from robustdrop.engine.config import RUNTIME_FIELDS, TrackConfig, switched_config
from robustdrop.engine.estimate import Estimate, StepTimer, describe_device, time_evaluation
from robustdrop.engine.evaluate import EvalResult, autocast_for, spec_of
from robustdrop.engine.hooks import Hook, RunContext
from robustdrop.engine.interrupt import Abort, Interrupts
from robustdrop.engine.memory import keep_freed_memory
from robustdrop.engine.observer import Observer, eval_rows, make_context, rng_state, set_rng_state
from robustdrop.errors import FileWriteError, RobustdropError, RunInterrupted
from robustdrop.formatting import eps_in_255ths, format_duration
from robustdrop.methods import MethodContext, create_method
from robustdrop.models import create_model
from robustdrop.schedules import Schedule
from robustdrop.store import KEEP_ROLLING, CheckpointSaver, RunStore, load_checkpoint_file, metric_row

# Checkpoints written since mid-epoch checkpoints also carry ``partial_epoch`` and ``elapsed_s``;
# older ones (without) are read as epoch ends.
CHECKPOINT_FORMAT = "robustdrop-checkpoint-1"
ESTIMATE_EXAMPLES_CPU = 32  # probe examples the cost estimate times the evaluation on (CPU; a batch on CUDA)


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


@dataclass
class EpochProgress:
    """The epoch in progress: what a mid-epoch checkpoint holds beyond model, optimizer, method,
    hooks and RNG states to continue the epoch at its next step exactly.

    ``generator``: the data generator's state before the epoch drew its permutation and
    augmentation (drawing again from it gives the same batches); ``steps_done``: the epoch's steps
    already taken; ``loss_sum``, ``correct`` (device scalars), ``seen``: the epoch's training
    accumulators; ``lr``: the last step's LR; ``train_s``, ``diag_s``: wall time spent so far.
    """

    generator: torch.Tensor
    loss_sum: torch.Tensor
    correct: torch.Tensor
    steps_done: int = 0
    seen: int = 0
    lr: float = 0.0
    train_s: float = 0.0
    diag_s: float = 0.0

    @classmethod
    def start(cls, generator: torch.Generator, device: torch.device) -> EpochProgress:
        zero = torch.zeros((), device=device)
        return cls(generator.get_state(), zero, zero.clone())

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.clone(), "loss_sum": self.loss_sum.detach().cpu(),
                "correct": self.correct.detach().cpu(), "steps_done": self.steps_done, "seen": self.seen,
                "lr": self.lr, "train_s": self.train_s, "diag_s": self.diag_s}

    @classmethod
    def from_state(cls, state: dict[str, Any], device: torch.device) -> EpochProgress:
        return cls(state["generator"], state["loss_sum"].to(device), state["correct"].to(device),
                   int(state["steps_done"]), int(state["seen"]), float(state["lr"]), float(state["train_s"]),
                   float(state["diag_s"]))


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
        self.run = make_context(cfg, self.store, self.model, device=self.device, data=data, probe=self.probe,
                                method=self.method, optimizer=self.optimizer, train_images=self.train_images,
                                train_labels=data.train_y[train_idx],
                                steps_per_epoch=steps_per_epoch, channels_last=self._channels_last)
        # Evaluation, the hook guard and events: the one home shared with the Monitor and the replay.
        self.observer = Observer(self.run, self.hooks, val=self.val, test=self.test)
        self.eval_attacks: list[Attack | None] = self.observer.attacks
        return self

    # ------------------------------------------------------------------------------------------
    # checkpoints
    # ------------------------------------------------------------------------------------------
    def _state(self, finished: bool, progress: EpochProgress | None = None) -> dict[str, Any]:
        """Everything to continue the run: at an epoch end, or (``progress``) in the middle of an
        epoch, where ``epoch`` counts the finished epochs and ``partial_epoch`` the one in progress."""
        return {
            "format": CHECKPOINT_FORMAT,
            "config": self.config.to_dict(),
            "epoch": self.epoch - 1 if progress is not None else self.epoch,
            "step": self.step,
            "finished": finished,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "method": self.method.state_dict(),
            "switches": self._switches,
            "hooks": {h.state_key: h.state_dict() for h in self.hooks},
            "hooks_by": "state_key",
            "rng": rng_state(),
            "data_generator": self.data_generator.get_state(),
            "num_metric_rows": self.store.num_metric_rows,
            "num_events": self.store.num_events,
            "partial_epoch": progress.state_dict() if progress is not None else None,
            "elapsed_s": self._elapsed(),
        }

    def _checkpoint_saver(self) -> CheckpointSaver:
        cfg = self.config
        return CheckpointSaver(self.store, every=cfg.checkpoint_every,
                               rolling=KEEP_ROLLING if cfg.on_collapse == "rollback" else 0)

    def _save_checkpoint(self, finished: bool = False) -> None:
        self._checkpoint_saver().save(self._state(finished), self.epoch)

    def _load_checkpoint(self) -> bool:
        """Restore from ``last.pt`` (an epoch end or a mid-epoch state); returns whether the run had
        already finished. A config with more epochs than the checkpoint's extends the run."""
        path = self.store.checkpoint_path("last")
        state = self.store.load_checkpoint(
            "last", map_location=self.device,
            todo="copy an older checkpoints/epoch_XXXX.pt over it if there is one, or start the run again with --overwrite")
        if state.get("format") != CHECKPOINT_FORMAT:
            raise RobustdropError(f"{path} is not a {CHECKPOINT_FORMAT} checkpoint")
        # Fields added to TrackConfig after the checkpoint was written take their defaults on both
        # sides (from_dict fills them), so a newer robustdrop still resumes an older run.
        saved, current = TrackConfig.from_dict(state["config"]).to_dict(), self.config.to_dict()
        extending = saved["epochs"] < current["epochs"]
        same = set(RUNTIME_FIELDS) | ({"epochs", "schedule_epochs"} if extending else set())
        diff = sorted(k for k in saved if k not in same and saved[k] != current.get(k))
        if diff:
            raise RobustdropError(f"checkpoint does not match the run's config.json (differs in {diff}); "
                                  "restore config.json or start a new run")
        if extending:
            if state["finished"] and state["epoch"] < saved["epochs"]:
                raise RobustdropError(f"{self.store.path} was stopped at epoch {state['epoch']} of {saved['epochs']} "
                                      "(see its events.jsonl); a stopped run cannot be extended: start a new run")
            planned = TrackConfig.from_dict(saved).extended(self.config.epochs)
            if planned.schedule_epochs != self.config.schedule_epochs:
                raise RobustdropError(f"--schedule-epochs of an extended run must stay {planned.schedule_epochs}")
        for switch in state.get("switches", []):  # continue with the method the run had switched to
            self._switch_method(switch["to"])
        self._switches = list(state.get("switches", []))
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.method.load_state_dict(state["method"])
        except (RuntimeError, KeyError, ValueError) as exc:
            raise RobustdropError(f"checkpoint does not fit the model/method ({str(exc).splitlines()[0][:160]}); "
                                  "it belongs to another run") from None
        self.schedule.load_state_dict(state["schedule"])
        by_key = state.get("hooks_by") == "state_key"  # older checkpoints keyed hook states by name
        for hook in self.hooks:
            key = hook.state_key if by_key else hook.name
            if key in state["hooks"]:
                hook.load_state_dict(state["hooks"][key])
        set_rng_state(state["rng"])
        self.data_generator.set_state(state["data_generator"])
        self.run.epoch, self.run.step = state["epoch"], state["step"]
        partial = state.get("partial_epoch")
        self._progress = EpochProgress.from_state(partial, self.device) if partial else None
        self._last_is_epoch_end = self._progress is None
        self._elapsed0 = float(state.get("elapsed_s", 0.0))
        self.store.truncate_logs(state["num_metric_rows"], state["num_events"])
        self.store.log_event("resume", epoch=self.epoch, step=self.step,
                             **({"steps_into_epoch": self._progress.steps_done} if self._progress else {}))
        if extending:
            self._extended_from = saved["epochs"]
            self._record_extension(saved)
        return bool(state["finished"])

    def _record_extension(self, saved: dict[str, Any]) -> None:
        """The extension is an event, and config.json becomes the extended config; the manifest's
        ``config_history`` lists every change (what, from, to, at which epoch, by which command)."""
        cfg = self.config
        changes = {k: [saved.get(k), getattr(cfg, k)] for k in ("epochs", "schedule_epochs")
                   if saved.get(k) != getattr(cfg, k)}
        self.store.log_event("extend", epoch=self.epoch, step=self.step, from_epochs=saved["epochs"],
                             to_epochs=cfg.epochs)
        on_disk = self.store.read_json(RunStore.CONFIG)
        self.store.write_json(RunStore.CONFIG, {**on_disk, **{k: new for k, (_, new) in changes.items()}})
        manifest = self.store.read_json(RunStore.MANIFEST)
        history = manifest.setdefault("config_history", [])
        entry = {"epoch": self.epoch, "step": self.step, "changes": changes}
        if not history or {k: history[-1].get(k) for k in entry} != entry:  # not twice for one extension
            history.append({**entry, "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                            "command": sys.argv})
            self.store.write_json(RunStore.MANIFEST, manifest)

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
            finished = self._load_checkpoint()
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
            self._handle_stop()
        elif self.run.switch_request is not None and not last:
            self._handle_switch()
        if finished:
            self._emit("on_run_end")
        self.store.flush()
        self._save_checkpoint(finished=finished)
        self._progress, self._last_is_epoch_end = None, True
        self._print_summary(times)
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
        bar = tqdm(total=n, initial=p.steps_done, desc=self._bar_text(p), leave=False, disable=not self.progress,
                   dynamic_ncols=True)
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
                aside += self._report_estimate(timer)
                timer = None
            if i % 20 == 0 or i == n - 1:
                mean_loss = p.loss_sum.item() / p.seen
                self._check_finite(mean_loss)
                bar.set_postfix(loss=f"{mean_loss:.3f}", acc=f"{p.correct.item() / p.seen:.3f}", lr=f"{p.lr:.3g}")
                bar.set_description(self._bar_text(p), refresh=False)
            bar.update(1)
        bar.close()
        if timer is not None and timer.finish():  # an epoch shorter than the warm-up
            aside += self._report_estimate(timer)
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

    def _eval_sets(self, epoch: int) -> list[tuple[str, tuple[torch.Tensor, torch.Tensor], list[Attack | None]]]:
        """What the run evaluates at the end of ``epoch``: ``(split, (images, labels), attacks)``."""
        return self.observer.eval_sets(epoch)

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
        self._checkpoint_saver().save_mid_epoch(self._state(finished=False, progress=p))
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
    # cost and progress
    # ------------------------------------------------------------------------------------------
    def _elapsed(self) -> float:
        """Wall time of the run's training loop so far, across resumes."""
        now = time.perf_counter() - self._loop_start if self._loop_start is not None else 0.0
        return self._elapsed0 + now

    def _estimate(self, timer: StepTimer, *, epoch: int, steps_done: int) -> Estimate:
        """The cost of the run from step ``steps_done`` of ``epoch`` on (see engine/estimate.py)."""
        cfg, n = self.config, len(self.loader)
        timed_on = next((s for s in (self.probe, self.val, self.test) if len(s[1])), self.probe)
        slice_n = ESTIMATE_EXAMPLES_CPU if self.device.type == "cpu" else cfg.eval_batch_size
        per_example = time_evaluation(self.model, *timed_on, self.eval_attacks, device=self.device,
                                      autocast=self._autocast, channels_last=self._channels_last, n=slice_n)
        eval_s = sum(len(labels) * sum(per_example[spec_of(a).attack] for a in attacks)
                     for e in range(epoch, cfg.epochs + 1) for _, (_, labels), attacks in self._eval_sets(e))
        steps_left = (cfg.epochs - epoch + 1) * n - steps_done
        return Estimate(device=describe_device(self.device), on_cpu=self.device.type == "cpu",
                        seconds_per_step=timer.seconds_per_step, steps_timed=timer.timed, steps_per_epoch=n,
                        epochs=cfg.epochs, epochs_left=steps_left / n, train_s=steps_left * timer.seconds_per_step,
                        eval_s=eval_s, eval_examples_timed=min(slice_n, len(timed_on[1])),
                        diagnostics=any(type(h).on_epoch_end is not Hook.on_epoch_end for h in self.hooks))

    def _report_estimate(self, timer: StepTimer) -> float:
        """Print the cost estimate (one line) and record it as an event; returns the seconds it took."""
        start = time.perf_counter()
        p = self._progress
        steps_before = p.steps_done - timer.steps  # the estimate starts where this process started
        self.estimate = self._estimate(timer, epoch=self.epoch, steps_done=max(steps_before, 0))
        self.store.log_event("estimate", epoch=self.epoch, step=self.step, **self.estimate.as_event())
        tqdm.write(self.estimate.line(), file=sys.stdout)
        sys.stdout.flush()
        return time.perf_counter() - start

    def dry_run(self) -> Estimate:
        """The cost estimate of the whole run from a few training steps of this (prepared, never
        fitted) trainer's model, and the evaluation timed on a probe slice. Writes nothing."""
        self.prepare()
        self.model.train()
        timer = StepTimer(self.device)
        timer.begin()
        for batch in self.loader.epoch(torch.Generator().manual_seed(self.config.seed)):
            self._step(batch)
            if timer.tick():
                break
        timer.finish()
        return self._estimate(timer, epoch=1, steps_done=0)

    def _remaining(self, done: float) -> float | None:
        """Estimated wall time left when ``done`` epochs (a fraction mid-epoch) are behind us."""
        left = self.config.epochs - done
        if done >= 1 and self._elapsed() > 0:  # measured: training, evaluation and diagnostics
            return self._elapsed() / done * left
        if self.estimate is not None:
            return self.estimate.total_s * left / max(self.estimate.epochs_left, 1e-9)
        return None

    def _run_progress(self, done: float) -> str:
        """Run-level progress: epochs done (whole, else the run's percentage), wall time elapsed
        (across resumes) and estimated time left."""
        left = self._remaining(done)
        rest = f", ~{format_duration(left)} left" if left is not None else ""
        where = (f"{int(done)}/{self.config.epochs} epochs" if done == int(done)
                 else f"{100 * done / self.config.epochs:.0f}% of {self.config.epochs} epochs")
        return f"{where}, {format_duration(self._elapsed())} elapsed{rest}"

    def _bar_text(self, p: EpochProgress) -> str:
        done = self.epoch - 1 + p.steps_done / max(len(self.loader), 1)
        return f"epoch {self.epoch}/{self.config.epochs} (run {self._run_progress(done)})"

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

    def _handle_stop(self) -> None:
        reason, rollback = self._stop
        self.store.log_event("stop", epoch=self.epoch, step=self.step, reason=reason)
        if rollback is None:
            return
        # last.pt still holds the previous epoch (or, after a mid-epoch resume, part of this one):
        # this epoch is saved after the stop is handled.
        saver = self._checkpoint_saver()
        source = saver.rollback_source(rollback, last_epoch=self.epoch - 1 if self._last_is_epoch_end else None)
        if source is None:
            self.store.log_event("rollback_failed", epoch=self.epoch, step=self.step, to_epoch=rollback)
            return
        result = saver.keep_as_result(source)
        to_epoch = int(load_checkpoint_file(result)["epoch"])
        self.store.log_event("rollback", epoch=self.epoch, step=self.step, to_epoch=to_epoch,
                             checkpoint=f"checkpoints/{result.name}")

    def _switch_method(self, to: str) -> None:
        """Train with the method of ``to`` (a ``--switch-to`` spec) from now on, same model and optimizer."""
        method = create_method(switched_config(self.config, to))
        method.setup(self.model, self._method_context)
        self.method = self.run.method = method

    def _handle_switch(self) -> None:
        reason, to = self.run.switch_request
        self.run.switch_request = None
        before = self.method.name
        self._switch_method(to)
        self._switches.append({"epoch": self.epoch, "to": to})
        self.store.log_event("method_switch", epoch=self.epoch, step=self.step, to=to, method=self.method.name,
                             previous=before, spec=self.method.perturbation_spec().as_columns(), reason=reason)
        print(f"switched training from {before} to {to} after epoch {self.epoch}: {reason}", flush=True)

    def _print_summary(self, times: dict[str, float]) -> None:
        loss, acc, _, lr = self._train_stats
        parts = [f"epoch {self.epoch:>3}/{self.config.epochs}", f"train loss {loss:.3f} acc {acc:.3f} lr {lr:.3g}"]
        for split in ("probe", "val", "test"):
            here = [r for r in self._eval if r.split == split]
            if here:
                accs = " ".join(f"{'clean' if r.spec.attack == 'none' else r.spec.attack}"
                                f"{'' if r.spec.steps <= 1 else f'-{r.spec.steps}'} {r.acc:.3f}" for r in here)
                parts.append(f"{split}(n={here[0].n}) {accs}")
        parts.append(f"{sum(times.values()):.1f}s (train {times['train']:.1f}, eval {times['eval']:.1f}, "
                     f"diag {times['diag']:.1f})")
        parts.append(f"run {self._run_progress(self.epoch)}")
        print(" | ".join(parts), flush=True)
        if self._stop is not None:
            print(f"stopped: {self._stop[0]}", flush=True)

    def _manifest(self) -> dict[str, Any]:
        commit = None
        with contextlib.suppress(Exception):
            commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                    cwd=os.path.dirname(os.path.abspath(robustdrop.__file__))).stdout.strip() or None
        device_name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else platform.processor() or "cpu"
        return {
            "seed": self.config.seed,
            "robustdrop": robustdrop.__version__,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "numpy": np.__version__,
            "device": str(self.device),
            "device_name": device_name,
            "threads": torch.get_num_threads(),
            "amp_bf16": self.device.type == "cuda" and self.config.amp,
            "eval_bf16": self.device.type == "cuda" and self.config.eval_precision == "bf16",
            "channels_last": self._channels_last,
            "git_commit": commit,
            "host": socket.gethostname(),
            "start_time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": sys.argv,
            "dataset": {"name": self.data.name, "train": len(self.train_images), "val": len(self.val[1]),
                        "probe": len(self.probe[1]), "test": len(self.test[1]), "classes": self.data.classes},
        }
