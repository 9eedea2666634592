"""The GPU plan: its parts in the order of their value, their tasks, what fits the budget, and the
state kept between commands.

A **part** is a result (the referee, FGSM's 30 epochs, Figure 2's measurement, the methods table,
...); it is made of **tasks**, each one process on the GPU: ``train:<run>`` (resumable, the
engine's exact resume), ``measure:<run>`` (the deferred referee measurement, :mod:`lib.deferred`),
``eval:<run>`` (the tables' test-set evaluation, :mod:`lib.evaluation`), ``precision``
(:mod:`lib.precision`) and ``bench`` (:mod:`lib.benchmarks`, alone on the GPU). Whether a task is
done is read from the files it writes, so a later command, or a fresh machine given the results
that came back, knows where to continue.

Scheduling (the same rule in the estimate's simulation and on the GPU): tasks start in the parts'
order as soon as their inputs are done — trainings up to ``jobs`` at a time, the short tasks one
process at a time, the benchmarks alone (a waiting benchmark holds back the parts after it).
"""

from __future__ import annotations

import json
import math
import shutil
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from lib import estimate
from lib.benchmarks import BENCH_FILE, SIZES
from lib.catalog import catalog, config_for, ref_name, run_dir
from lib.deferred import is_measured
from lib.estimate import Assumptions
from lib.evaluation import EVAL_CACHE, evaluation_cached
from lib.precision import PAIR, PRECISION_FILE
from lib.setting import SMOKE_DATA, Setting
from lib.training import config_difference, run_state
from robustdrop.engine import TrackConfig
from robustdrop.errors import RobustdropError
from robustdrop.store import atomic_write_text

STATE_FILE = "gpu_plan_state.json"  # in the runs dir: the live state (survives while the machine does)
RECORD_FILE = "gpu_plan.json"  # in the results dir: the record that comes back
RESTORED = "RESTORED.json"  # in a run dir restored from the results: the tasks it had finished


@dataclass(frozen=True)
class Task:
    key: str  # "train:fgsm", "measure:fgsm", "eval:fgsm", "precision", "bench"
    kind: str  # train | measure | eval | precision | bench
    run: str | None
    deps: tuple[str, ...]
    work: float  # FLOPs (fp32 work counted at its bf16-equivalent time)
    epochs: int = 0

    @property
    def slot(self) -> str:
        """``train`` (own process, up to ``jobs``), ``short`` (one process at a time), ``exclusive``."""
        return {"train": "train", "bench": "exclusive"}.get(self.kind, "short")


@dataclass(frozen=True)
class Part:
    name: str
    what: str
    why: str
    tasks: tuple[str, ...]


PART_NAMES = ("referee", "fgsm", "apart", "figure2", "table", "fgsm+", "bf16", "bench", "apart-authors")


def sizes_of(setting: Setting) -> tuple[int, int]:
    if setting.smoke:
        return SMOKE_DATA["n_train"], SMOKE_DATA["n_test"]
    return estimate.SIZES[setting.dataset or "cifar10"]


def build(setting: Setting, a: Assumptions) -> tuple[list[Part], dict[str, Task]]:
    """Every part, in the order of its value, and every task by key."""
    cat = catalog(setting)
    sizes = sizes_of(setting)
    ref = ref_name(setting)
    cfgs: dict[str, TrackConfig] = {}

    def cfg(name: str) -> TrackConfig:
        if name not in cfgs:
            cfgs[name] = config_for(setting, cat[name])
        return cfgs[name]

    tasks: dict[str, Task] = {}

    def add(task: Task) -> str:
        tasks[task.key] = task
        return task.key

    def train(name: str) -> str:
        c = cfg(name)
        return add(Task(f"train:{name}", "train", name, (), estimate.run_work(c, sizes, a).total, c.epochs))

    def measure(name: str) -> str:
        return add(Task(f"measure:{name}", "measure", name, (f"train:{ref}", f"train:{name}"),
                        estimate.measure_work(cfg(name), sizes, a).total))

    def evaluate(name: str) -> str:
        return add(Task(f"eval:{name}", "eval", name, (f"train:{name}",),
                        estimate.table_eval_work(cfg(name), sizes, setting.eval_n, a).total))

    size = SIZES["smoke" if setting.smoke else "paper"]
    bench = add(Task("bench", "bench", None, (), estimate.bench_work(
        size["width"], size["train_subset"], size["apart_n"], size["repeats"], size["cost_batch"],
        size["cost_repeats"], a).total))
    precision_deps = (f"train:{ref}", "train:fgsm", *(f"train:{n}" for n in PAIR))
    precision = add(Task("precision", "precision", None, precision_deps, estimate.precision_work(
        cfg(ref), [cfg(n) for n in PAIR], sizes, setting.eval_n, a).total))
    steps = cfg(ref).pgd_steps
    parts = [
        Part("referee", f"PGD-{steps} referee, {cfg(ref).epochs} epochs",
             "the fixed robust model of Figure 2's measurement; the PGD-10 row", (train(ref),)),
        Part("fgsm", f"FGSM, {cfg('fgsm').epochs} epochs (weights of every epoch kept)",
             "the collapse: Figure 2, Figure 1, the curves", (train("fgsm"),)),
        Part("apart", f"APART, {cfg('apart').epochs} epochs", "no collapse at a quarter of PGD-10's cost",
             (train("apart"),)),
        Part("figure2", "the referee on each epoch's FGSM δ vs noise; Figure 2",
             "the paper's central measurement", (measure("fgsm"), measure("apart"))),
        Part("table", "final/best test accuracy: clean, PGD-20, CW-20; the methods table", "the paper's table",
             (evaluate(ref), evaluate("fgsm"), evaluate("apart"))),
        Part("fgsm+", f"FGSM+, {cfg('fgsm+').epochs} epochs, measured and evaluated",
             "the paper's 'strengthened FGSM' curve", (train("fgsm+"), measure("fgsm+"), evaluate("fgsm+"))),
        Part("bf16", "bf16 vs fp32: evaluation of two checkpoints, a 2-run training comparison",
             "whether bf16 changes what is measured", (train(PAIR[0]), train(PAIR[1]), precision)),
        Part("bench", "CUDA benchmarks: engine/bare, APART/PGD-10, FE and FLOP rate",
             "the cost claims, and the rates for the next estimate", (bench,)),
        Part("apart-authors", "APART with the authors' released recipe (preset apart-authors)",
             "comparable with the authors' numbers", (train("apart-authors"), evaluate("apart-authors"))),
    ]
    return parts, tasks


# ------------------------------------------------------------------------------------------------
# Status: what is done, from the files
# ------------------------------------------------------------------------------------------------
def restored_tasks(setting: Setting, name: str) -> set[str]:
    marker = run_dir(setting, name) / RESTORED
    return set(json.loads(marker.read_text())["tasks"]) if marker.is_file() else set()


def is_done(setting: Setting, task: Task) -> bool:
    """Whether the task's output is there (live, or restored from the results)."""
    if task.kind == "bench":
        return (setting.runs_dir / BENCH_FILE).is_file()
    if task.kind == "precision":
        return (setting.runs_dir / PRECISION_FILE).is_file()
    assert task.run is not None
    path = run_dir(setting, task.run)
    if task.key in restored_tasks(setting, task.run):
        return True
    if task.kind == "train":
        return run_state(path, config_for(setting, catalog(setting)[task.run]))[0] == "finished"
    if task.kind == "eval":
        return evaluation_cached(setting, task.run)
    if task.kind == "measure":
        return is_measured(path)
    raise ValueError(task.kind)


def epochs_done(setting: Setting, name: str) -> int:
    """Epochs in the run's last checkpoint (0 when it has none)."""
    last = run_dir(setting, name) / "checkpoints" / "last.pt"
    if not last.is_file():
        return 0
    try:
        return int(torch.load(last, map_location="cpu", weights_only=True, mmap=True).get("epoch", 0))
    except Exception:  # a torn or foreign file: the run starts again
        return 0


def status(setting: Setting, tasks: dict[str, Task]) -> tuple[set[str], dict[str, float]]:
    """``(done keys, work left per key)``: a training resumes after its last checkpoint's epoch."""
    done = {k for k, t in tasks.items() if is_done(setting, t)}
    left = {}
    for k, t in tasks.items():
        if k in done:
            continue
        frac = 1.0
        if t.kind == "train" and t.epochs and run_state(run_dir(setting, t.run),
                                                        config_for(setting, catalog(setting)[t.run]))[0] == "partial":
            frac = 1 - min(epochs_done(setting, t.run), t.epochs) / t.epochs
        left[k] = t.work * frac
    return done, left


# ------------------------------------------------------------------------------------------------
# Scheduling and its simulation
# ------------------------------------------------------------------------------------------------
def startable(order: Sequence[Task], finished: set[str], running: dict[str, str], jobs: int) -> list[Task]:
    """The tasks to start now, in order; ``running`` maps running keys to their slot."""
    slots = list(running.values())
    if "exclusive" in slots:
        return []
    n_train, worker = slots.count("train"), "short" in slots
    out: list[Task] = []
    held = False  # a benchmark waiting for the GPU holds back the tasks after it
    for t in order:
        if t.key in finished or t.key in running or not all(d in finished for d in t.deps):
            continue
        if t.slot == "exclusive":
            if not running and not out:
                return [t]
            held = True
        elif held:
            continue
        elif t.slot == "train" and n_train < jobs:
            out.append(t)
            n_train += 1
        elif t.slot == "short" and not worker:
            out.append(t)
            worker = True
    return out


@dataclass
class Timeline:
    """A simulated run of the plan: seconds from now, with the GPU shared as :class:`Assumptions` says."""

    start: dict[str, float] = field(default_factory=dict)
    end: dict[str, float] = field(default_factory=dict)
    share: dict[str, float] = field(default_factory=lambda: defaultdict(float))  # device seconds per task
    running_at: list[tuple[float, float, tuple[str, ...]]] = field(default_factory=list)  # (t0, t1, keys)
    makespan: float = 0.0
    blocked: list[str] = field(default_factory=list)


def simulate(order: Sequence[Task], done: set[str], left: dict[str, float], jobs: int, a: Assumptions) -> Timeline:
    """Fluid simulation: ``k`` running processes progress at ``a.aggregate(k) / k`` FLOP/s each."""
    tl = Timeline()
    finished = set(done)
    todo = [t for t in order if t.key not in done]
    by_key = {t.key: t for t in todo}
    remaining: dict[str, float] = {}
    now = 0.0
    while True:
        running = {k: by_key[k].slot for k in remaining}
        for t in startable(todo, finished, running, jobs):
            remaining[t.key] = max(left.get(t.key, t.work), 0.0)
            tl.start[t.key] = now
        if not remaining:
            break
        k = len(remaining)
        each = a.aggregate(k) / k
        dt = min(remaining.values()) / each
        for key in remaining:
            remaining[key] -= each * dt
            tl.share[key] += dt / k
        tl.running_at.append((now, now + dt, tuple(remaining)))
        now += dt
        for key in [q for q, r in remaining.items() if r <= 1e-9 * max(each, 1.0)]:
            del remaining[key]
            finished.add(key)
            tl.end[key] = now
    tl.makespan = now
    tl.blocked = [t.key for t in todo if t.key not in finished]
    return tl


@dataclass
class Costs:
    """The plan's wall minutes: the simulated GPU work plus the overheads around it."""

    work_min: float
    start_min: float
    commands: int
    command_min: float  # per command: start-up and the outputs at its end
    boundary_min: float  # work lost when commands stop trainings mid-epoch

    @property
    def total(self) -> float:
        return self.work_min + self.start_min + self.commands * self.command_min + self.boundary_min


def costs(tl: Timeline, tasks: dict[str, Task], a: Assumptions, *, fresh: bool, max_minutes: float,
          reserve_min: float, graceful: bool) -> Costs:
    """Machine start (on a fresh machine), per-command overhead, and the work a command boundary
    loses: half an epoch of the longest-epoch training in flight (none when trainings checkpoint
    mid-epoch on SIGTERM, ``graceful``)."""
    useful = max(max_minutes - reserve_min - a.command_overhead_min, 0.5) if max_minutes > 0 else math.inf
    work = tl.makespan / 60
    commands = max(1, math.ceil(work / useful)) if work > 0 else 0
    lost = 0.0
    if not graceful:
        for i in range(1, commands):
            b = i * useful * 60
            for t0, t1, keys in tl.running_at:
                if t0 <= b < t1:
                    epochs = [(tasks[k].work / tasks[k].epochs) / (a.aggregate(len(keys)) / len(keys))
                              for k in keys if tasks[k].kind == "train" and tasks[k].epochs]
                    lost += a.boundary_loss_epochs * max(epochs, default=0.0) / 60
                    break
    return Costs(work, a.machine_start_min if fresh else 0.0, commands, a.command_overhead_min + reserve_min, lost)


def valid_tasks(parts: Iterable[Part], tasks: dict[str, Task], done: set[str]) -> list[Task]:
    """The parts' tasks in order, without those whose inputs no chosen part (or done task) makes."""
    keys = [k for p in parts for k in p.tasks]
    have = set(keys) | done
    out, seen = [], set()
    for k in keys:
        if k in seen:
            continue
        seen.add(k)
        if all(d in have for d in tasks[k].deps):
            out.append(tasks[k])
    # drop tasks whose inputs were dropped, until nothing changes
    while True:
        ok = {t.key for t in out} | done
        kept = [t for t in out if all(d in ok for d in t.deps)]
        if len(kept) == len(out):
            return kept
        out = kept


@dataclass
class Selection:
    parts: list[Part]
    excluded: dict[str, str]
    order: list[Task]  # the chosen parts' tasks, in order
    done: set[str]  # done, less what must be made again (effective_done)
    timeline: Timeline
    costs: Costs


def choose(parts: Sequence[Part], tasks: dict[str, Task], done: set[str], left: dict[str, float], *, jobs: int,
           a: Assumptions, budget_min: float, fresh: bool, max_minutes: float, reserve_min: float, graceful: bool,
           only: Sequence[str] = (), skip: Sequence[str] = (), restored: Sequence[str] = (),
           ref: str = "") -> Selection:
    """The parts that fit: in order of value, a part is kept when the whole plan with it still fits
    ``budget_min`` (so a part never pushes an earlier one out of the budget)."""
    chosen: list[Part] = []
    excluded: dict[str, str] = {}
    kw = dict(fresh=fresh, max_minutes=max_minutes, reserve_min=reserve_min, graceful=graceful)

    def trial(candidate: list[Part]) -> tuple[list[Task], set[str], Timeline, Costs]:
        order = valid_tasks(candidate, tasks, done)
        eff = effective_done(done, [t.key for t in order], restored, ref)
        lefts = {**left, **{k: tasks[k].work for k in done - eff}}
        tl = simulate(order, eff, lefts, jobs, a)
        return order, eff, tl, costs(tl, tasks, a, **kw)

    for part in parts:
        if part.name in skip or (only and part.name not in only):
            excluded[part.name] = "not asked for (--only/--skip)"
            continue
        if not any(t.key in part.tasks for t in valid_tasks([*chosen, part], tasks, done)):
            excluded[part.name] = "its inputs are left out"
            continue
        *_, c = trial([*chosen, part])
        if c.total <= budget_min + 1e-9:
            chosen.append(part)
        else:
            excluded[part.name] = f"over budget (the plan with it: {c.total:.1f} min)"
    return Selection(chosen, excluded, *trial(chosen))


# ------------------------------------------------------------------------------------------------
# State between commands, and a fresh machine's restart from the results that came back
# ------------------------------------------------------------------------------------------------
def now_utc() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def load_state(setting: Setting) -> dict[str, Any] | None:
    path = setting.runs_dir / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def save_state(setting: Setting, state: dict[str, Any]) -> None:
    setting.runs_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(setting.runs_dir / STATE_FILE, json.dumps(state, indent=2) + "\n")


def new_state(setting: Setting) -> dict[str, Any]:
    return {"format": "robustdrop-gpu-plan-1", "lease_started_utc": now_utc(), "invocations": [],
            "measured": None, "graceful_stop_seen": False, "restored": []}


def needs_checkpoint(key: str, name: str, ref: str) -> bool:
    """Whether task ``key`` reads run ``name``'s checkpoints (not only its metrics)."""
    kind, _, run = key.partition(":")
    if kind in ("eval", "measure") and run == name:
        return True
    if kind == "measure" and name == ref:
        return True
    return key == "precision" and name in (ref, "fgsm", *PAIR)


def effective_done(done: set[str], keys: Iterable[str], restored: Iterable[str], ref: str) -> set[str]:
    """``done`` without the trainings of restored (metrics-only) runs whose checkpoints an
    unfinished task of ``keys`` needs: those runs are trained again, and what was done from their
    checkpoints is done again."""
    d = set(done)
    keys = list(keys)
    changed = True
    while changed:
        changed = False
        for name in restored:
            if f"train:{name}" in d and any(k not in d and needs_checkpoint(k, name, ref) for k in keys):
                d -= {f"train:{name}", f"eval:{name}", f"measure:{name}"}
                changed = True
    return d


RUN_FILES = ("config.json", "manifest.json", "metrics.parquet", "metrics.csv", "events.jsonl", EVAL_CACHE)


def restore(setting: Setting, results: Path) -> list[str]:
    """On a machine without the live state: copy back from the results that came back every run
    whose training had finished (metrics only, no checkpoints; ``RESTORED.json`` lists the tasks it
    had finished) and the benchmark / precision records. A task that needs a restored run's
    checkpoints makes the plan train that run again (:func:`effective_done`). Returns the names."""
    record_file = results / RECORD_FILE
    if not record_file.is_file():
        return []
    record = json.loads(record_file.read_text())
    done = set(record.get("tasks_done", []))
    restored = []
    cat = catalog(setting)
    for source in sorted((results / "runs").glob("*/config.json")):
        name = source.parent.name
        target = run_dir(setting, name)
        if f"train:{name}" not in done or target.exists() or name not in cat:
            continue
        try:
            differs = bool(config_difference(json.loads(source.read_text()), config_for(setting, cat[name])))
        except (RobustdropError, ValueError, TypeError):  # a config this robustdrop cannot read
            differs = True
        if differs:
            print(f"not restoring {source.parent}: made with another setting", flush=True)
            continue
        shutil.copytree(source.parent, target)
        mine = sorted(k for k in done if k.partition(":")[2] == name)
        atomic_write_text(target / RESTORED, json.dumps({"from": str(source.parent), "tasks": mine}, indent=2) + "\n")
        restored.append(name)
    for file, key in ((BENCH_FILE, "bench"), (PRECISION_FILE, "precision")):
        source = results / file
        if key in done and source.is_file() and not (setting.runs_dir / file).exists():
            setting.runs_dir.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, setting.runs_dir / file)
            restored.append(file)
    return restored


def restored_runs(setting: Setting, names: Iterable[str]) -> list[str]:
    return [n for n in names if (run_dir(setting, n) / RESTORED).is_file()]
