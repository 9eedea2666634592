"""The training loop: train, evaluate, emit hook events, log, checkpoint, resume."""

from __future__ import annotations

import contextlib
import math
import os
import platform
import random
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

import robustdrop
from robustdrop.attacks import FGSM, PGD, Attack
from robustdrop.data import ImageData, TrainLoader, load_dataset, probe_indices, split_validation
from robustdrop.engine.config import TrackConfig, switched_config
from robustdrop.engine.evaluate import EvalResult, autocast_for, evaluate, spec_of
from robustdrop.engine.hooks import Hook, RunContext
from robustdrop.engine.memory import keep_freed_memory
from robustdrop.errors import RobustdropError
from robustdrop.formatting import eps_in_255ths
from robustdrop.methods import MethodContext, create_method
from robustdrop.models import create_model
from robustdrop.schedules import Schedule
from robustdrop.store import KEEP_ROLLING, CheckpointSaver, RunStore, load_checkpoint_file, metric_row

CHECKPOINT_FORMAT = "robustdrop-checkpoint-1"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise RobustdropError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RobustdropError(f"--device {name} asked for, but CUDA is not available here; use --device cpu")
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


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


class Trainer:
    """Runs one training run into a :class:`RunStore`.

    Hooks receive :attr:`run`, the :class:`RunContext` the trainer builds in ``_prepare`` and keeps
    current (``epoch``, ``step``, the ``metrics`` channel); the trainer itself is never handed to a hook.

    Args:
        config: the resolved config.
        store: the run directory (created by the caller).
        hooks: diagnostics to emit events to.
        resume: continue from the store's ``checkpoints/last.pt``.
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
        self._eval: list[EvalResult] = []  # the epoch's evaluation, for the metrics rows and the summary

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
    def _prepare(self) -> None:
        cfg = self.config
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = resolve_device(cfg.device)
        on_cuda = self.device.type == "cuda"
        if not on_cuda:
            keep_freed_memory()  # a CPU step otherwise page-faults its buffers anew (engine/memory.py)
        self._channels_last = cfg.channels_last and on_cuda
        self._autocast = autocast_for(self.device, cfg.amp)  # the training steps only
        # Evaluation attacks and diagnostics: fp32 unless --eval-precision bf16 (bf16 gradients can
        # make an attack look weaker than it is).
        self._eval_autocast = autocast_for(self.device, cfg.eval_precision == "bf16")
        if on_cuda:
            torch.backends.cudnn.benchmark = True

        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)

        if self.data is None:
            self.data = load_dataset(cfg.dataset, data_dir=cfg.data_dir)
        data = self.data
        train_idx, val_idx = split_validation(len(data.train_y), cfg.val_size, cfg.seed)
        if cfg.train_subset:
            # A seeded random subset: the datasets are stored class by class.
            pick = torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(cfg.seed))
            train_idx = train_idx[pick[: cfg.train_subset].sort().values]
        if len(train_idx) < cfg.batch_size:
            raise RobustdropError(f"only {len(train_idx)} training examples for --batch-size {cfg.batch_size}; "
                                  "lower --batch-size or --val-size")
        self.train_images = data.train_x[train_idx]
        self.loader = TrainLoader(self.train_images, data.train_y[train_idx], cfg.batch_size, device=self.device,
                                  augment=cfg.augment, pad=4, pad_value=cfg.pad_value, channels_last=self._channels_last)
        self.val = (data.train_x[val_idx].to(self.device), data.train_y[val_idx].to(self.device))
        probe = probe_indices(data.test_y, min(cfg.probe_size, len(data.test_y)), cfg.seed)
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
        eval_eps = cfg.epsilon if cfg.eval_epsilon is None else cfg.eval_epsilon
        self.eval_attacks: list[Attack | None] = [
            None, FGSM(eval_eps),
            PGD(eval_eps, steps=cfg.eval_pgd_steps, step_size=cfg.eval_pgd_step_size, restarts=cfg.eval_restarts),
        ]
        self.run = RunContext(config=cfg, store=self.store, model=self.model, method=self.method,
                              optimizer=self.optimizer, device=self.device,
                              data=data, train_images=self.train_images, probe=self.probe,
                              steps_per_epoch=steps_per_epoch, autocast_factory=self._eval_autocast,
                              eval_specs={s.attack: s for s in map(spec_of, self.eval_attacks)},
                              channels_last=self._channels_last)

    # ------------------------------------------------------------------------------------------
    # checkpoints
    # ------------------------------------------------------------------------------------------
    def _state(self, finished: bool) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "config": self.config.to_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "finished": finished,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "method": self.method.state_dict(),
            "switches": self._switches,
            "hooks": {h.state_key: h.state_dict() for h in self.hooks},
            "hooks_by": "state_key",
            "rng": _rng_state(),
            "data_generator": self.data_generator.get_state(),
            "num_metric_rows": self.store.num_metric_rows,
            "num_events": self.store.num_events,
        }

    def _checkpoint_saver(self) -> CheckpointSaver:
        cfg = self.config
        return CheckpointSaver(self.store, every=cfg.checkpoint_every,
                               rolling=KEEP_ROLLING if cfg.on_collapse == "rollback" else 0)

    def _save_checkpoint(self, finished: bool = False) -> None:
        self._checkpoint_saver().save(self._state(finished), self.epoch)

    def _load_checkpoint(self) -> bool:
        """Restore from ``last.pt``; returns whether the run had already finished."""
        state = self.store.load_checkpoint("last", map_location=self.device)
        if state.get("format") != CHECKPOINT_FORMAT:
            raise RobustdropError(f"{self.store.checkpoint_path('last')} is not a {CHECKPOINT_FORMAT} checkpoint")
        # Fields added to TrackConfig after the checkpoint was written take their defaults on both
        # sides (from_dict fills them), so a newer robustdrop still resumes an older run.
        saved, current = TrackConfig.from_dict(state["config"]).to_dict(), self.config.to_dict()
        if saved != current:
            diff = sorted(k for k in saved if saved[k] != current.get(k))
            raise RobustdropError(f"checkpoint does not match the run's config.json (differs in {diff}); "
                                  "restore config.json or start a new run")
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
        _set_rng_state(state["rng"])
        self.data_generator.set_state(state["data_generator"])
        self.run.epoch, self.run.step = state["epoch"], state["step"]
        self.store.truncate_logs(state["num_metric_rows"], state["num_events"])
        self.store.log_event("resume", epoch=self.epoch, step=self.step)
        return bool(state["finished"])

    # ------------------------------------------------------------------------------------------
    # hooks
    # ------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _hook_guard(self) -> Iterator[None]:
        """Hooks see the model in eval mode and cannot move any global random state."""
        rng = _rng_state()
        modes = [m.training for m in self.model.modules()]
        self.model.eval()
        try:
            yield
        finally:
            for module, mode in zip(self.model.modules(), modes):
                module.training = mode
            _set_rng_state(rng)

    def _emit(self, event: str, *args: Any, hooks: Sequence[Hook] | None = None) -> float:
        hooks = self.hooks if hooks is None else hooks
        if not hooks:
            return 0.0
        start = time.perf_counter()
        with self._hook_guard():
            for hook in hooks:
                getattr(hook, event)(self.run, *args)
        return time.perf_counter() - start

    # ------------------------------------------------------------------------------------------
    # the loop
    # ------------------------------------------------------------------------------------------
    def fit(self) -> RunStore:
        self._prepare()
        cfg = self.config
        if self.resume:
            if self._load_checkpoint():
                print(f"{self.store.path}: the run already finished at epoch {self.epoch}; nothing to resume")
                return self.store
            print(f"resuming {self.store.path} after epoch {self.epoch} (step {self.step})")
        else:
            self.store.write_json(RunStore.CONFIG, cfg.to_dict())
            self.store.write_json(RunStore.MANIFEST, self._manifest())
        self._emit("on_run_start")
        finished = False
        while self.epoch < cfg.epochs:
            self.run.epoch += 1
            self.run.metrics.clear()
            times = self._train_epoch()
            last = self.epoch == cfg.epochs
            start = time.perf_counter()
            self._evaluate_epoch(last)
            times["eval"] = time.perf_counter() - start
            due = [h for h in self.hooks if h.wants_epoch(self.epoch, last=last)]
            times["diag"] += self._emit("on_epoch_end", self.epoch, hooks=due)
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
            self._print_summary(times)
            if finished:
                break
        return self.store

    def _train_epoch(self) -> dict[str, float]:
        cfg, model, method = self.config, self.model, self.method
        model.train()
        step_hooks = [h for h in self.hooks if h.every_n_steps > 0]
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device)
        seen, diag = 0, 0.0
        bar = tqdm(total=len(self.loader), desc=f"epoch {self.epoch}/{cfg.epochs}", leave=False,
                   disable=not self.progress, dynamic_ncols=True)
        start = time.perf_counter()
        for i, batch in enumerate(self.loader.epoch(self.data_generator)):
            lr = self.schedule.apply(self.optimizer)
            with self._autocast():
                out = method.train_step(model, batch, self.optimizer)
            self.schedule.step()
            self.run.step += 1
            loss_sum += out.loss * len(batch.y)
            correct += (out.logits.argmax(1) == batch.y).sum()
            seen += len(batch.y)
            due = [h for h in step_hooks if h.wants_step(self.step)]
            if due:
                diag += self._emit("on_train_step", batch, out, hooks=due)
            if i % 20 == 0 or i == len(self.loader) - 1:
                mean_loss = loss_sum.item() / seen
                self._check_finite(mean_loss)
                bar.set_postfix(loss=f"{mean_loss:.3f}", acc=f"{correct.item() / seen:.3f}", lr=f"{lr:.3g}")
            bar.update(1)
        bar.close()
        total = time.perf_counter() - start
        loss, acc = loss_sum.item() / seen, correct.item() / seen
        self._train_stats = (loss, acc, seen, lr)
        self.run.metrics.update({"train/loss": loss, "train/acc": acc, "train/lr": lr})
        return {"train": total - diag, "diag": diag}

    def _check_finite(self, loss: float) -> None:
        if not math.isfinite(loss):
            self.store.log_event("nan_loss", epoch=self.epoch, step=self.step)
            self.store.flush()
            raise RobustdropError(
                f"training loss became {loss} at epoch {self.epoch}, step {self.step}; lower --lr (now {self.config.lr}) "
                f"or --epsilon; the last good checkpoint is {self.store.checkpoint_path('last')} (resume with --resume)"
            )

    def _evaluate_epoch(self, last: bool) -> None:
        cfg = self.config
        self._eval = []
        sets = []
        if self.epoch % cfg.eval_every == 0 or last:
            sets.append(("probe", self.probe, self.eval_attacks))
            if len(self.val[1]):
                sets.append(("val", self.val, [self.eval_attacks[0], self.eval_attacks[2]]))
        if last or (cfg.test_every and self.epoch % cfg.test_every == 0):
            sets.append(("test", self.test, self.eval_attacks))
        for split, (images, labels), attacks in sets:
            results = evaluate(self.model, images, labels, attacks, split=split, batch_size=cfg.eval_batch_size,
                               device=self.device, generator=self.run.generator(f"eval/{split}"),
                               autocast=self._eval_autocast, channels_last=self._channels_last)
            for r in results:
                self._eval.append(r)
                self.run.metrics[f"{split}/acc/{r.spec.attack}"] = r.acc
                self.run.metrics[f"{split}/loss/{r.spec.attack}"] = r.loss

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
        for r in self._eval:
            cols = r.spec.as_columns()
            rows.append(metric_row(self.epoch, self.step, r.split, "acc", r.acc, n=r.n, source="eval", **cols))
            rows.append(metric_row(self.epoch, self.step, r.split, "loss", r.loss, n=r.n, source="eval", **cols))
        self.store.log_metrics(rows)

    def _handle_stop(self) -> None:
        reason, rollback = self._stop
        self.store.log_event("stop", epoch=self.epoch, step=self.step, reason=reason)
        if rollback is None:
            return
        # last.pt still holds the previous epoch: this epoch is saved after the stop is handled.
        saver = self._checkpoint_saver()
        source = saver.rollback_source(rollback, last_epoch=self.epoch - 1)
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
