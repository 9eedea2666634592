"""Trainings and evaluations as tasks: run in order, or ``--jobs`` at a time in spawned processes,
each after the tasks it depends on; every task's stdout prefixed with its name and copied to
``<runs_dir>/logs/<name>.log``."""

from __future__ import annotations

import contextlib
import multiprocessing
import sys
import time
import traceback
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lib.catalog import catalog, reference_deferred, reference_run, run_dir
from lib.deferred import measure_run
from lib.evaluation import evaluate_run
from lib.setting import Setting
from lib.training import train_run


class _Prefixed:
    """A text stream that prefixes each line with ``[name]`` and copies it to a log file."""

    def __init__(self, prefix: str, stream: Any, log: Any):
        self.prefix, self.stream, self.log, self.buf = prefix, stream, log, ""

    def write(self, text: str) -> int:
        self.buf += text
        while "\n" in self.buf:
            line, self.buf = self.buf.split("\n", 1)
            self.stream.write(f"{self.prefix}{line}\n")
            self.log.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()
        self.log.flush()

    def isatty(self) -> bool:
        return False


@contextlib.contextmanager
def prefixed_output(setting: Setting, name: str) -> Iterator[None]:
    """Within the block, stdout lines read ``[name] ...`` and go to ``<runs_dir>/logs/<name>.log`` too."""
    logs = setting.runs_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / f"{name}.log", "a", encoding="utf-8") as log:
        old = sys.stdout
        sys.stdout = _Prefixed(f"[{name}] ", old, log)
        try:
            yield
        finally:
            if sys.stdout.buf:
                sys.stdout.write("\n")
            sys.stdout = old


@dataclass(frozen=True)
class Task:
    key: str
    kind: str  # "train" | "measure" | "eval"
    run: str
    deps: tuple[str, ...] = ()


def train_tasks(setting: Setting, names: Sequence[str]) -> list[Task]:
    """Training tasks for ``names`` and the reference run Figure 2's runs among them need (none when
    the referee is shipped), reference first. With a referee measured after training
    (:func:`~lib.catalog.reference_deferred`), Figure 2's runs do not wait for it: each gets a
    ``measure:<run>`` task after both trainings; otherwise they wait for it."""
    cat = catalog(setting)
    ref = reference_run(setting)
    deferred = reference_deferred(setting)
    uses = {n for n in names if cat[n].uses_reference and ref is not None}
    wanted: list[str] = []
    for n in names:
        if n in uses and ref not in wanted:
            wanted.insert(0, ref)
        if n not in wanted:
            wanted.append(n)
    tasks = [Task(f"train:{n}", "train", n, (f"train:{ref}",) if n in uses and not deferred else ()) for n in wanted]
    if deferred:
        tasks += [Task(f"measure:{n}", "measure", n, (f"train:{ref}", f"train:{n}")) for n in wanted if n in uses]
    return tasks


def eval_tasks(setting: Setting, names: Sequence[str]) -> list[Task]:
    return [Task(f"eval:{n}", "eval", n, (f"train:{n}",)) for n in names]


def _run_task(setting: Setting, task: Task) -> tuple[str, float]:
    start = time.perf_counter()
    with prefixed_output(setting, task.run if task.kind == "train" else f"{task.run}.{task.kind}"):
        if setting.threads:
            torch.set_num_threads(setting.threads)
        if task.kind == "train":
            train_run(setting, task.run)
        elif task.kind == "measure":
            measure_run(setting, task.run)
        else:
            evaluate_run(setting, task.run)
    return task.key, time.perf_counter() - start


def execute(setting: Setting, tasks: Sequence[Task], *, jobs: int | None = None) -> dict[str, float]:
    """Run the tasks (in order, or ``jobs`` at a time in spawned processes, each after its deps);
    returns ``{key: wall seconds}``. Deps that are not among ``tasks`` are taken as done."""
    jobs = setting.jobs if jobs is None else jobs
    seen: set[str] = set()
    tasks = [t for t in tasks if not (t.key in seen or seen.add(t.key))]
    times: dict[str, float] = {}
    if jobs <= 1 or len(tasks) <= 1:
        for t in tasks:
            key, secs = _run_task(setting, t)
            times[key] = secs
        return times
    keys = {t.key for t in tasks}
    pending = list(tasks)
    done: set[str] = set()
    errors: list[str] = []
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        running: dict[Any, Task] = {}
        while pending or running:
            ready = [t for t in pending if all(d in done or d not in keys for d in t.deps)]
            for t in ready[: max(0, jobs - len(running))]:
                pending.remove(t)
                running[pool.submit(_run_task, setting, t)] = t
            if not running:
                blocked = ", ".join(t.key for t in pending)
                raise RuntimeError(f"tasks blocked by failed dependencies: {blocked}; errors: {errors}")
            finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for fut in finished:
                t = running.pop(fut)
                try:
                    key, secs = fut.result()
                except Exception as exc:  # report, keep the independent tasks going
                    errors.append(f"{t.key}: {exc}")
                    print(f"FAILED {t.key}: {exc}", flush=True)
                    traceback.print_exception(exc)
                    pending = [p for p in pending if t.key not in p.deps]
                    continue
                times[key] = secs
                done.add(key)
    if errors:
        raise RuntimeError("; ".join(errors))
    return times


def ensure_runs(setting: Setting, names: Sequence[str], *, evaluate_: Sequence[str] = (),
                jobs: int | None = None) -> dict[str, Path]:
    """Train (or reuse) ``names`` and evaluate ``evaluate_`` (cached); returns ``{name: run dir}``."""
    tasks = train_tasks(setting, list(names) + [n for n in evaluate_ if n not in names])
    tasks += eval_tasks(setting, evaluate_)
    execute(setting, tasks, jobs=jobs)
    return {n: run_dir(setting, n) for n in names}
