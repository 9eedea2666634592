"""Running the plan's tasks as child processes on one GPU until a deadline, then stopping them.

Each task runs in its own process (``python analyses/gpu_plan.py --child KEY ...``, the same
setting), its output in ``<runs_dir>/logs/<key>.log``. Trainings run up to ``jobs`` at a time;
the short tasks (measurements, evaluations, the precision comparison) one process at a time, each
process taking every short task that is ready and fits before the deadline; the benchmarks alone.

At the deadline every child gets SIGTERM: a training finishes its step, writes a checkpoint and
exits 143 where the engine supports it (issue 10), or dies and loses the epoch in flight (it
resumes from its last epoch's checkpoint); an interrupted short task is done again next time. A
child that has not exited after ``grace`` seconds is killed.

``stop_after_epochs`` (testing) stops each training with SIGTERM as soon as it has logged that many
epochs in this command, and starts nothing new: a command's time running out, made deterministic.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lib.estimate import Assumptions
from lib.plan import Task, startable

EPOCH_LINE = re.compile(r"^(?:\[[^\]]*\] )?epoch\s+(\d+)/(\d+) \|")
STARTUP_S = 30.0  # a child's start: Python, torch, CUDA, the data


@dataclass
class Child:
    keys: list[str]
    slot: str
    proc: subprocess.Popen
    log: Path
    started: float
    offset: int = 0
    epochs: int = 0  # epoch lines logged in this command
    last_epoch: int = 0
    planned: int = 0
    epoch_times: list[float] = field(default_factory=list)
    last_line_at: float = 0.0
    stopping: bool = False


@dataclass
class Outcome:
    """What one command did."""

    finished: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    stopped: dict[str, str] = field(default_factory=dict)  # key -> "graceful (143)" | "killed"
    epochs: dict[str, int] = field(default_factory=dict)  # training key -> epochs logged in this command
    busy_s: float = 0.0  # wall seconds with at least one child running
    process_s: float = 0.0  # sum over children of their wall seconds (for the mean concurrency)
    reason: str = ""


class Supervisor:
    """Start, watch and stop the tasks of one command (see the module docstring)."""

    def __init__(self, order: Sequence[Task], done: set[str], *, jobs: int, deadline: float,
                 command: Callable[[list[str]], list[str]], log_dir: Path, a: Assumptions,
                 is_done: Callable[[Task], bool], left: dict[str, float] | None = None,
                 stop_after_epochs: int | None = None, poll: float = 1.0, grace: float = 60.0,
                 report_every: float = 60.0, env: dict[str, str] | None = None,
                 say: Callable[[str], None] = print):
        self.order = list(order)
        self.by_key = {t.key: t for t in self.order}
        self.finished = set(done)
        self.jobs, self.deadline, self.command = jobs, deadline, command
        self.log_dir, self.a, self.is_done = log_dir, a, is_done
        self.left = dict(left or {})
        self.stop_after = stop_after_epochs
        self.poll, self.grace, self.report_every = poll, grace, report_every
        self.env = env
        self.say = say
        self.children: list[Child] = []
        self.blocked: set[str] = set()  # failed in this command, and what depends on them
        self.out = Outcome()
        self.stop_requested = ""
        self.injected = False
        self.waiting: list[str] = []  # ready, but not worth starting before the deadline

    # -- starting ------------------------------------------------------------------------------
    def _estimate_s(self, keys: Sequence[str], k: int) -> float:
        each = self.a.aggregate(k) / k
        return sum(self.left.get(key, self.by_key[key].work) for key in keys) / each

    def _spawn(self, keys: list[str], slot: str) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"{keys[0].replace(':', '_')}.log"
        handle = open(log, "ab")
        handle.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} start {' '.join(keys)}\n".encode())
        handle.flush()
        proc = subprocess.Popen(self.command(keys), stdout=handle, stderr=subprocess.STDOUT, env=self.env)
        handle.close()
        child = Child(keys, slot, proc, log, time.monotonic(), offset=log.stat().st_size,
                      planned=self.by_key[keys[0]].epochs)
        self.children.append(child)
        self.say(f"start  {' + '.join(keys)} (pid {proc.pid})")

    def _running(self) -> dict[str, str]:
        return {k: c.slot for c in self.children for k in c.keys}

    def _start_ready(self, now: float) -> None:
        if self.injected:
            return  # the injected deadline has passed: start nothing new
        todo = [t for t in self.order if t.key not in self.blocked]
        self.waiting = []
        for t in startable(todo, self.finished, self._running(), self.jobs):
            k = len(self.children) + 1
            room = self.deadline - now
            if t.slot == "train":
                # worth starting only if it can write a checkpoint: its start-up and one epoch
                epoch = t.work / max(t.epochs, 1) / (self.a.aggregate(k) / k)
                if room >= STARTUP_S + epoch or self.stop_after is not None:
                    self._spawn([t.key], "train")
                else:
                    self.waiting.append(t.key)
                continue
            keys = [t.key]
            if t.slot == "short":  # take every other ready short task too, in order, while it fits
                running = {**self._running(), t.key: "short"}
                for u in todo:
                    if u.key in running or u.key in self.finished or u.slot != "short" or u.key == t.key:
                        continue
                    if all(d in self.finished for d in u.deps):
                        keys.append(u.key)
                        running[u.key] = "short"
            while keys and STARTUP_S + self._estimate_s(keys, k) > room:
                keys.pop()
            if keys:
                self._spawn(keys, t.slot)
            else:
                self.waiting.append(t.key)

    # -- watching ------------------------------------------------------------------------------
    def _read_progress(self, child: Child, now: float) -> None:
        try:
            with open(child.log, "rb") as f:
                f.seek(child.offset)
                data = f.read()
        except OSError:
            return
        cut = data.rfind(b"\n") + 1
        child.offset += cut
        for line in data[:cut].decode(errors="replace").splitlines():
            m = EPOCH_LINE.match(line.strip())
            if m:
                child.epochs += 1
                child.last_epoch, child.planned = int(m.group(1)), int(m.group(2))
                child.epoch_times.append(now)
                child.last_line_at = now

    def _reap(self, child: Child, rc: int) -> None:
        self.children.remove(child)
        self.out.process_s += time.monotonic() - child.started
        if child.slot == "train":
            self.out.epochs[child.keys[0]] = self.out.epochs.get(child.keys[0], 0) + child.epochs
        if child.stopping:
            how = "graceful (143)" if rc == 143 else ("killed" if rc < 0 else f"exit {rc}")
            for k in child.keys:
                if self.is_done(self.by_key[k]):
                    self.finished.add(k)
                    self.out.finished.append(k)
                else:
                    self.out.stopped[k] = how
            self.say(f"stopped {' + '.join(child.keys)}: {how}")
            return
        if rc == 0:
            for k in child.keys:
                if self.is_done(self.by_key[k]):
                    self.finished.add(k)
                    self.out.finished.append(k)
                else:
                    self._fail(k, child, "exited 0 without its output")
            self.say(f"done   {' + '.join(child.keys)} ({time.monotonic() - child.started:.0f} s)")
            return
        for k in child.keys:
            if self.is_done(self.by_key[k]):  # the batch's earlier tasks did finish
                self.finished.add(k)
                self.out.finished.append(k)
            else:
                self._fail(k, child, f"exit code {rc}")
                break  # the batch stopped at its first failure; the rest were not run
        else:
            self.say(f"done   {' + '.join(child.keys)}")

    def _fail(self, key: str, child: Child, why: str) -> None:
        tail = child.log.read_text(errors="replace").strip().splitlines()[-12:] if child.log.is_file() else []
        self.out.failed[key] = f"{why}; log {child.log}: " + " | ".join(tail[-3:])
        self.say(f"FAILED {key}: {why} (log {child.log}); last lines:\n    " + "\n    ".join(tail))
        blocked = {key}
        changed = True
        while changed:
            changed = False
            for t in self.order:
                if t.key not in blocked and any(d in blocked for d in t.deps):
                    blocked.add(t.key)
                    changed = True
        self.blocked |= blocked

    def _stop(self, child: Child) -> None:
        if child.stopping or child.proc.poll() is not None:
            return
        child.stopping = True
        child.proc.send_signal(signal.SIGTERM)

    def report(self, now: float, started: float) -> str:
        parts = []
        for c in self.children:
            if c.slot == "train":
                rate = ""
                if len(c.epoch_times) >= 2:
                    rate = f", {(c.epoch_times[-1] - c.epoch_times[0]) / (len(c.epoch_times) - 1):.0f} s/epoch"
                parts.append(f"{c.keys[0][6:]} {c.last_epoch}/{c.planned}{rate}")
            else:
                parts.append(f"{'+'.join(c.keys)} ({now - c.started:.0f} s)")
        return f"[{(now - started) / 60:4.1f} min] " + (" | ".join(parts) if parts else "idle")

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> Outcome:
        started = last_report = last_tick = time.monotonic()
        previous = signal.getsignal(signal.SIGTERM)

        def on_term(signum: int, frame: Any) -> None:  # our own deadline, brought forward
            self.stop_requested = "SIGTERM"

        signal.signal(signal.SIGTERM, on_term)
        try:
            while True:
                now = time.monotonic()
                if self.children:
                    self.out.busy_s += now - last_tick
                last_tick = now
                for child in list(self.children):
                    self._read_progress(child, now)
                    if (self.stop_after is not None and child.slot == "train"
                            and child.epochs >= self.stop_after and not child.stopping):
                        self._stop(child)
                        self.injected = True
                    rc = child.proc.poll()
                    if rc is not None:
                        self._reap(child, rc)
                if self.stop_requested:
                    self.out.reason = f"stopped ({self.stop_requested})"
                    break
                if now >= self.deadline:
                    self.out.reason = "deadline"
                    break
                self._start_ready(now)
                if not self.children:
                    left = [t.key for t in self.order if t.key not in self.finished]
                    self.out.reason = ("everything done" if not left else
                                       "stopped after the injected deadline" if self.injected else
                                       f"{', '.join(self.waiting)} would not finish before the deadline"
                                       if self.waiting else f"nothing can start ({', '.join(left)})")
                    break
                if now - last_report >= self.report_every:
                    self.say(self.report(now, started))
                    last_report = now
                time.sleep(self.poll)
        finally:
            signal.signal(signal.SIGTERM, previous)
            self._stop_all()
        return self.out

    def _stop_all(self) -> None:
        for child in self.children:
            self._stop(child)
        end = time.monotonic() + self.grace
        while self.children and time.monotonic() < end:
            for child in list(self.children):
                rc = child.proc.poll()
                if rc is not None:
                    self._read_progress(child, time.monotonic())
                    self._reap(child, rc)
            time.sleep(min(self.poll, 0.2))
        for child in list(self.children):
            child.proc.kill()
            rc = child.proc.wait()
            self._reap(child, rc)


def child_env(threads: int) -> dict[str, str]:
    """The children's environment: unbuffered output (the logs are read while they run)."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    if threads:
        env.setdefault("OMP_NUM_THREADS", str(threads))
    return env
