"""What the analysis scripts share: the command line, the scales, ONE catalog of runs, run reuse,
parallel training, the test-set evaluation of the tables, and writing figures and tables.

Every script trains (or reuses) runs from :func:`catalog`, so ``run_all.py`` trains each run once
and every figure and table reads the same run directories (``runs/analyses/<scale>/<name>``).

Reuse rule: a run directory whose ``config.json`` equals the config the script would use
(``threads`` and the folder of ``reference`` are not compared) and whose ``checkpoints/last.pt``
says ``finished`` is reused; one that stopped early is resumed; anything else is trained anew
(the old directory is replaced). Every run gets the :class:`KeepBest` hook, which keeps the model
of the epoch with the best validation PGD accuracy in ``checkpoints/best_model.pt`` for the tables.

Scales (``--scale``):

* ``quick`` (default): ``make_config("quick", ...)``: its data, model, ε, schedule and epochs; the
  expensive runs are scaled down where said (:data:`KNOBS`).
* ``paper``: ``make_config("paper", dataset="cifar10", data_dir=--data-dir, ...)``: the paper's
  settings (PreActResNet18, CIFAR-10, ε=8/255, PGD-10 referee, 200-epoch long runs); needs a GPU.
* ``--smoke``: the same code path in seconds: 2 epochs on a tiny synthetic data set
  (``robustdrop.data.make_synthetic``), the scale's model (a 1/16-width PreActResNet18 for
  ``paper``), written into a temporary runs dir and out dir unless given.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from matplotlib.figure import Figure

from robustdrop.api import resume, track
from robustdrop.attacks import PGD, cw_margin_loss
from robustdrop.data import ImageData, load_dataset, make_synthetic, probe_indices
from robustdrop.diagnostics import build_reference, find_reference
from robustdrop.engine import Hook, TrackConfig, autocast_for, evaluate, make_config, resolve_device
from robustdrop.formatting import format_eps, latex_table, markdown_table
from robustdrop.plots import save_figure
from robustdrop.store import RunStore, atomic_write_text

REPO = Path(__file__).resolve().parents[1]
SCALES = ("quick", "paper")
BEST_CHECKPOINT = "best_model"  # checkpoints/best_model.pt, written by KeepBest
EVAL_CACHE = "analyses_eval.json"

# Scale knobs of the runs that are not plain preset runs. ``ref_steps``: PGD steps of the
# reference / PGD row (step 2.5ε/k); ``long_*``: the long-run figure (E4); ``cost_*``: the timing
# runs of table_cost; ``eval_n``: test examples of the tables' evaluation (0 = the whole test set).
KNOBS: dict[str, dict[str, Any]] = {
    "quick": dict(ref_steps=3, long_steps=10, long_subset=5000, long_cycle=6, long_epochs=24, long_eval_every=2,
                  long_test_every=None, cost_subset=8192, cost_epochs=3, eval_n=2000),
    "paper": dict(ref_steps=10, long_steps=10, long_subset=0, long_cycle=30, long_epochs=200, long_eval_every=2,
                  long_test_every=2, cost_subset=10000, cost_epochs=3, eval_n=0),
}
QUICK_EVAL_BATCH = 128
SMOKE_KNOBS = dict(long_subset=0, long_cycle=1, long_epochs=2, long_eval_every=1, long_test_every=None,
                   cost_subset=0, cost_epochs=2, eval_n=64)
# Tiny synthetic data and settings of --smoke (everything else comes from the scale's preset).
SMOKE_DATA = dict(n_train=320, n_test=128, num_classes=10, size=32, channels=3, seed=0)
SMOKE_CONFIG: dict[str, dict[str, Any]] = {
    "quick": dict(dataset="synthetic", epochs=2, val_size=64, probe_size=64, batch_size=64, eval_batch_size=128,
                  test_every=0, diagnostics=["default", "strength:n=64"]),
    "paper": dict(dataset="synthetic", epochs=2, val_size=64, probe_size=64, batch_size=64, eval_batch_size=256,
                  test_every=0, width=1 / 16, diagnostics=["default", "strength:n=64"]),
}


# --------------------------------------------------------------------------------------------
# Command line and setting
# --------------------------------------------------------------------------------------------
@dataclass
class Setting:
    """Where and how the analyses run (the parsed command line)."""

    scale: str = "quick"
    smoke: bool = False
    runs_dir: Path = field(default_factory=lambda: REPO / "runs" / "analyses" / "quick")
    out: Path = field(default_factory=lambda: REPO / "figures")
    data_dir: str | None = None
    threads: int = 1
    jobs: int = 1
    device: str = "auto"
    seed: int = 0
    eval_n: int = 2000

    @property
    def knobs(self) -> dict[str, Any]:
        k = dict(KNOBS[self.scale])
        if self.smoke:
            k.update(SMOKE_KNOBS)
        k["eval_n"] = self.eval_n
        return k

    @property
    def tag(self) -> str:
        return f"{self.scale}{' smoke' if self.smoke else ''}"


def build_parser(description: str, *, jobs: int = 1) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=SCALES, default="quick",
                   help="quick: the quick preset on the embedded CIFAR-10 (JPEG copy), CPU; paper: the paper's "
                        "settings on CIFAR-10 (--data-dir), GPU (default: quick)")
    p.add_argument("--smoke", action="store_true",
                   help="seconds-long version on tiny synthetic data, 2 epochs (same code path; writes into a "
                        "temporary folder unless --runs-dir/--out are given)")
    p.add_argument("--runs-dir", type=Path, default=None,
                   help="where the runs live and are reused (default: runs/analyses/<scale>)")
    p.add_argument("--out", type=Path, default=None,
                   help="where figures and tables are written (default: figures/, figures/paper/ for --scale paper)")
    p.add_argument("--data-dir", default=None, help="--scale paper: folder with CIFAR-10's cifar-10-batches-py")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads per training process (default: 1 on quick/smoke, torch's default on paper)")
    p.add_argument("--jobs", type=int, default=jobs, help=f"trainings run in parallel processes (default: {jobs})")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    p.add_argument("--seed", type=int, default=0, help="seed of every run (default: 0)")
    p.add_argument("--eval-n", type=int, default=None,
                   help="test examples of the tables' final/best evaluation, a seeded class-balanced subset "
                        "(0 = all; default: 2000 on quick, all on paper, 64 with --smoke)")
    return p


def setting_from_args(args: argparse.Namespace) -> Setting:
    scale, smoke = args.scale, bool(args.smoke)
    if args.runs_dir is not None:
        runs_dir = Path(args.runs_dir)
    elif smoke:
        runs_dir = Path(tempfile.mkdtemp(prefix=f"robustdrop-smoke-{scale}-"))
    else:
        runs_dir = REPO / "runs" / "analyses" / scale
    if args.out is not None:
        out = Path(args.out)
    elif smoke:
        out = runs_dir / "figures"
    else:
        out = REPO / "figures" / ("paper" if scale == "paper" else "")
    threads = args.threads if args.threads is not None else (0 if scale == "paper" and not smoke else 1)
    if args.eval_n is not None:
        eval_n = args.eval_n
    else:
        eval_n = SMOKE_KNOBS["eval_n"] if smoke else KNOBS[scale]["eval_n"]
    return Setting(scale=scale, smoke=smoke, runs_dir=runs_dir, out=out, data_dir=args.data_dir, threads=threads,
                   jobs=max(1, int(args.jobs)), device=args.device, seed=args.seed, eval_n=eval_n)


def parse_setting(description: str, argv: Sequence[str] | None, *, jobs: int = 1) -> Setting:
    return setting_from_args(build_parser(description, jobs=jobs).parse_args(argv))


# --------------------------------------------------------------------------------------------
# Configs and the catalog of runs
# --------------------------------------------------------------------------------------------
def base_values(setting: Setting) -> dict[str, Any]:
    """Overrides every run of the setting gets on top of its preset."""
    values: dict[str, Any] = {"threads": setting.threads, "device": setting.device, "seed": setting.seed}
    if setting.scale == "quick":
        # Evaluation only: on a CPU, cnn1's attacks run 2-3x faster per example in batches of 128 than
        # in the default 500 (measured); training is unchanged.
        values["eval_batch_size"] = QUICK_EVAL_BATCH
    if setting.smoke:
        values.update(SMOKE_CONFIG[setting.scale])
    elif setting.scale == "paper":
        values.update(dataset="cifar10", data_dir=setting.data_dir)
    return values


def make_run_config(setting: Setting, **overrides: Any) -> TrackConfig:
    """``make_config(<scale>, **base_values, **overrides)`` — the preset is always read, never copied."""
    return make_config(setting.scale, **{**base_values(setting), **overrides})


def preset_config(setting: Setting) -> TrackConfig:
    return make_run_config(setting)


@dataclass(frozen=True)
class RunSpec:
    """One run of the catalog: overrides over the setting's preset config."""

    name: str
    overrides: dict[str, Any]
    uses_reference: bool = False  # strength-ref against the catalog's reference run
    what: str = ""  # one line for captions and READMEs


def ref_name(setting: Setting) -> str:
    return f"pgd{setting.knobs['ref_steps']}"


def catalog(setting: Setting) -> dict[str, RunSpec]:
    """Every run the analyses use, by name."""
    k = setting.knobs
    eps = preset_config(setting).epsilon
    steps = int(k["ref_steps"])
    specs = [
        RunSpec(ref_name(setting), dict(method="pgd", pgd_steps=steps, alpha=2.5 * eps / steps),
                what=f"PGD-{steps} (step 2.5ε/{steps}; also the reference model)"),
        # Figure 2's runs measure their strength on the reference. The table-only runs do not: a
        # diagnostic never changes the training, and without it they need not wait for the reference.
        RunSpec("fgsm", dict(method="fgsm"), True, "FGSM adversarial training"),
        RunSpec("rs-fgsm", dict(method="rs-fgsm"), False, "RS-FGSM (Wong et al. 2020; step 1.25ε)"),
        RunSpec("fgsm+", dict(method="fgsm+"), True, "FGSM+ (= APART without layer-wise perturbations)"),
        RunSpec("apart", dict(method="apart"), True, "APART"),
        RunSpec("apart-no-init", dict(method="apart", learned_init=False), False, "APART without learned init"),
        RunSpec("apart-no-step", dict(method="apart", learned_step=False), False, "APART without learned step"),
    ]
    ls = int(k["long_steps"])
    long_common = dict(schedule="cyclic-repeat", cycle_epochs=int(k["long_cycle"]), epochs=int(k["long_epochs"]),
                       train_subset=int(k["long_subset"]), eval_every=int(k["long_eval_every"]))
    if k["long_test_every"] is not None:  # paper: the full test set every 2 epochs, as the paper's curve
        long_common["test_every"] = int(k["long_test_every"])
    specs += [
        RunSpec(f"long-pgd{ls}", dict(method="pgd", pgd_steps=ls, alpha=2.5 * eps / ls, **long_common),
                what=f"PGD-{ls}, repeating cyclic schedule"),
        RunSpec("long-apart", dict(method="apart", **long_common), what="APART, repeating cyclic schedule"),
    ]
    # Timing runs (table_cost): same subset and epochs, no diagnostics, a cheap final evaluation.
    cost_common = dict(train_subset=int(k["cost_subset"]), epochs=int(k["cost_epochs"]), diagnostics=["none"],
                       eval_every=int(k["cost_epochs"]), probe_size=min(100, preset_config(setting).probe_size),
                       eval_pgd_steps=1)
    for name, (method, extra) in zip(cost_run_names(), COST_METHODS):
        specs.append(RunSpec(name, dict(method=method, **_cost_extra(extra, eps), **cost_common),
                             what=f"timing run ({name[5:]})"))
    return {s.name: s for s in specs}


# (method, extra overrides) of the timing runs; PGD-10 is the cost unit.
COST_METHODS: list[tuple[str, dict[str, Any]]] = [
    ("fgsm", {}), ("rs-fgsm", {}), ("pgd", {"pgd_steps": 10}), ("fgsm+", {}), ("apart", {}),
]


def _cost_extra(extra: dict[str, Any], eps: float) -> dict[str, Any]:
    out = dict(extra)
    if "pgd_steps" in out:
        out["alpha"] = 2.5 * eps / out["pgd_steps"]
    return out


def cost_run_names() -> list[str]:
    return [f"cost-{m}" + (f"{x['pgd_steps']}" if "pgd_steps" in x else "") for m, x in COST_METHODS]


def long_run_names(setting: Setting) -> list[str]:
    return [f"long-pgd{setting.knobs['long_steps']}", "long-apart"]


def config_for(setting: Setting, spec: RunSpec) -> TrackConfig:
    overrides = dict(spec.overrides)
    if spec.uses_reference:
        overrides["reference"] = str(setting.runs_dir / ref_name(setting))
    return make_run_config(setting, **overrides)


def run_dir(setting: Setting, name: str) -> Path:
    return setting.runs_dir / name


def data_for(setting: Setting) -> ImageData | None:
    """The in-memory data of --smoke (``None``: the run loads its config's dataset)."""
    return make_synthetic(**SMOKE_DATA) if setting.smoke else None


def load_data(setting: Setting, cfg: dict[str, Any]) -> ImageData:
    return make_synthetic(**SMOKE_DATA) if setting.smoke else load_dataset(cfg["dataset"], data_dir=cfg.get("data_dir"))


# --------------------------------------------------------------------------------------------
# The best-model hook
# --------------------------------------------------------------------------------------------
class KeepBest(Hook):
    """Keeps the model weights of the epoch with the highest validation PGD accuracy (probe PGD
    when the run has no validation split) in ``checkpoints/best_model.pt``, with the config, so
    :func:`robustdrop.diagnostics.find_reference` can load it. Ties keep the first epoch, the
    same rule as :func:`robustdrop.plots.compare`'s ``best_*`` columns."""

    name = "analyses-keep-best"

    def __init__(self) -> None:
        super().__init__(every_n_epochs=1)
        self.best = -math.inf
        self.epoch: int | None = None

    def on_epoch_end(self, run: Any, epoch: int) -> None:
        result = run.eval_results.get(("val", "pgd")) or run.eval_results.get(("probe", "pgd"))
        if result is None or not result.acc > self.best:
            return
        self.best, self.epoch = float(result.acc), int(epoch)
        run.store.save_checkpoint(BEST_CHECKPOINT, {
            "format": "robustdrop-analyses-best-1",
            "config": run.config.to_dict(),
            "epoch": int(epoch),
            "model": {k: v.detach().cpu().clone() for k, v in run.model.state_dict().items()},
            "selected_by": f"{result.split} {result.spec.describe()}",
            "value": float(result.acc),
        })

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = float(state.get("best", -math.inf))
        self.epoch = state.get("epoch")


# --------------------------------------------------------------------------------------------
# Reuse, training, output prefixing
# --------------------------------------------------------------------------------------------
def _normalized(cfg: dict[str, Any]) -> dict[str, Any]:
    cfg = dict(cfg)
    cfg.pop("threads", None)
    if cfg.get("reference"):
        cfg["reference"] = Path(cfg["reference"]).name
    return cfg


def run_state(path: Path, cfg: TrackConfig) -> tuple[str, str]:
    """``(state, why)`` with state ``missing`` | ``different`` | ``partial`` | ``finished``."""
    config_file = path / RunStore.CONFIG
    if not config_file.is_file():
        return "missing", "no run yet"
    try:
        stored = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError):
        return "different", "unreadable config.json"
    want = _normalized(cfg.to_dict())
    have = _normalized(stored)
    if have != want:
        diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
        return "different", f"config differs in {diff}"
    last = path / "checkpoints" / "last.pt"
    if not last.is_file():
        return "different", "no checkpoint"
    try:
        state = torch.load(last, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # a torn or foreign file: train again
        return "different", f"unreadable checkpoint ({type(exc).__name__})"
    if not state.get("finished"):
        return "partial", f"stopped after epoch {state.get('epoch')}"
    if not (path / "checkpoints" / f"{BEST_CHECKPOINT}.pt").is_file():
        return "different", "made without the analyses' best-model hook"
    return "finished", "finished"


def train_run(setting: Setting, name: str) -> Path:
    """Reuse, resume or train the catalog run ``name``; returns its directory."""
    spec = catalog(setting)[name]
    cfg = config_for(setting, spec)
    path = run_dir(setting, name)
    state, why = run_state(path, cfg)
    if state == "finished":
        print(f"reusing finished run {path}", flush=True)
        return path
    start = time.perf_counter()
    if state == "partial":
        print(f"resuming {path} ({why})", flush=True)
        resume(path, hooks=[KeepBest()], progress=False, data=data_for(setting))
    else:
        if state == "different":
            print(f"training {path} anew: {why}", flush=True)
        else:
            print(f"training {path}: {spec.what} ({cfg.method}, {cfg.epochs} epochs"
                  + (f", train subset {cfg.train_subset}" if cfg.train_subset else "") + ")", flush=True)
        track(cfg, runs_dir=setting.runs_dir, name=name, overwrite=True, hooks=[KeepBest()], progress=False,
              data=data_for(setting))
    print(f"done {path} in {time.perf_counter() - start:.0f}s", flush=True)
    return path


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


# --------------------------------------------------------------------------------------------
# Tasks: trainings and evaluations, sequential or in parallel processes, with dependencies
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Task:
    key: str
    kind: str  # "train" | "eval"
    run: str
    deps: tuple[str, ...] = ()


def train_tasks(setting: Setting, names: Sequence[str]) -> list[Task]:
    """Training tasks for ``names`` and the reference they need, reference first."""
    cat = catalog(setting)
    wanted: list[str] = []
    for n in names:
        if cat[n].uses_reference and ref_name(setting) not in wanted:
            wanted.insert(0, ref_name(setting))
        if n not in wanted:
            wanted.append(n)
    ref = ref_name(setting)
    return [Task(f"train:{n}", "train", n, (f"train:{ref}",) if cat[n].uses_reference else ()) for n in wanted]


def eval_tasks(setting: Setting, names: Sequence[str]) -> list[Task]:
    return [Task(f"eval:{n}", "eval", n, (f"train:{n}",)) for n in names]


def _run_task(setting: Setting, task: Task) -> tuple[str, float]:
    start = time.perf_counter()
    with prefixed_output(setting, task.run if task.kind == "train" else f"{task.run}.eval"):
        if setting.threads:
            torch.set_num_threads(setting.threads)
        if task.kind == "train":
            train_run(setting, task.run)
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


# --------------------------------------------------------------------------------------------
# Test-set evaluation of a run's final / best checkpoint: clean, PGD-k, CW-loss PGD-k
# --------------------------------------------------------------------------------------------
def _checkpoint(path: Path, which: str) -> Path:
    ckpt = path / "checkpoints"
    if which == "best":
        return ckpt / f"{BEST_CHECKPOINT}.pt"
    return ckpt / "result.pt" if (ckpt / "result.pt").is_file() else ckpt / "last.pt"


def eval_attacks(cfg: dict[str, Any]) -> dict[str, PGD | None]:
    eps = float(cfg["epsilon"])
    kw = dict(steps=int(cfg["eval_pgd_steps"]), step_size=float(cfg["eval_pgd_step_size"]),
              restarts=int(cfg["eval_restarts"]))
    return {"clean": None, "pgd": PGD(eps, **kw), "cw": PGD(eps, loss_fn=cw_margin_loss, **kw)}


def evaluate_run(setting: Setting, name: str) -> dict[str, dict[str, Any]]:
    """Clean / PGD-k / CW-loss PGD-k accuracy of the run's final and best checkpoints on ``eval_n``
    test examples (seeded, class-balanced; all when 0), cached in ``<run>/analyses_eval.json``."""
    path = run_dir(setting, name)
    cache_file = path / EVAL_CACHE
    cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    cfg = RunStore.open(path).read_json(RunStore.CONFIG)
    out: dict[str, dict[str, Any]] = {}
    data: ImageData | None = None
    for which in ("final", "best"):
        ckpt = _checkpoint(path, which)
        attacks = eval_attacks(cfg)
        spec = attacks["pgd"].spec().describe()
        stat = ckpt.stat()
        key = f"{which}|{ckpt.name}|{stat.st_mtime_ns}|{stat.st_size}|n={setting.eval_n}|seed={setting.seed}|{spec}"
        if key in cache:
            out[which] = cache[key]
            continue
        source = find_reference(ckpt)
        if data is None:
            data = load_data(setting, cfg)
        device = resolve_device(setting.device)
        model = build_reference(source, num_classes=data.num_classes, image_shape=data.image_shape, device=device)
        n_all = len(data.test_y)
        n = n_all if setting.eval_n <= 0 else min(setting.eval_n, n_all)
        idx = probe_indices(data.test_y, n, setting.seed + 1) if n < n_all else torch.arange(n_all)
        start = time.perf_counter()
        results = evaluate(model, data.test_x[idx], data.test_y[idx], list(attacks.values()), split="test",
                           batch_size=int(cfg.get("eval_batch_size", 500)), device=device,
                           generator=torch.Generator(device=device).manual_seed(setting.seed),
                           autocast=autocast_for(device, bool(cfg.get("amp", True))))
        secs = time.perf_counter() - start
        row = {"epoch": source.epoch, "n": n, "checkpoint": ckpt.name, "seconds": secs,
               "pgd_attack": spec, "cw_attack": spec.replace("pgd", "CW-loss pgd", 1)}
        row.update({k: r.acc for k, r in zip(attacks, results)})
        print(f"{name} {which} (epoch {source.epoch}, n={n}): clean {row['clean']:.4f} "
              f"PGD {row['pgd']:.4f} CW {row['cw']:.4f} ({secs:.0f}s)", flush=True)
        cache[key] = row
        out[which] = row
        atomic_write_text(cache_file, json.dumps(cache, indent=2, sort_keys=True) + "\n")
    return out


# --------------------------------------------------------------------------------------------
# Captions, output
# --------------------------------------------------------------------------------------------
def dataset_text(cfg: TrackConfig | dict[str, Any]) -> str:
    name = cfg["dataset"] if isinstance(cfg, dict) else cfg.dataset
    return {"cifar10-jpeg": "CIFAR-10 (JPEG copy)", "cifar10": "CIFAR-10", "synthetic": "synthetic (smoke)"}.get(
        name, name)


def model_text(cfg: TrackConfig) -> str:
    if cfg.model == "cnn1":
        return f"cnn1 ({int(cfg.width or 4)} filters)"
    if cfg.model == "preactresnet18" and cfg.width not in (None, 1, 1.0):
        return f"PreActResNet18 (width ×{cfg.width:g})"
    return {"preactresnet18": "PreActResNet18"}.get(cfg.model, cfg.model)


def describe(cfg: TrackConfig, *, epochs: bool = True) -> str:
    text = (f"{model_text(cfg)} on {dataset_text(cfg)}, ε={format_eps(cfg.epsilon)}, {cfg.optimizer.upper()} "
            f"{cfg.schedule} LR to {cfg.lr:g}")
    return text + (f", {cfg.epochs} epochs" if epochs else "") + f", seed {cfg.seed}"


def setting_caption(setting: Setting, cfg: TrackConfig | None = None, *, epochs: bool = True) -> str:
    """One line saying what scale the figure was made at (and that quick is not the paper's)."""
    what = describe(cfg or preset_config(setting), epochs=epochs)
    if setting.smoke:
        return f"SMOKE TEST (not a result): {what}"
    if setting.scale == "quick":
        return f"quick scale — {what}; the paper: PreActResNet18 on CIFAR-10, ε=8/255"
    return f"paper scale — {what}"


def save(fig: Figure, out: Path, stem: str) -> list[Path]:
    """Write ``<out>/<stem>.png`` and ``.pdf`` (:func:`robustdrop.plots.save_figure`) and say so."""
    paths = save_figure(fig, out, stem)
    for p in paths:
        print(f"wrote {p}", flush=True)
    return paths


def add_caption(fig: Figure, text: str) -> None:
    """A caption line above everything else in the figure."""
    fig.suptitle(text, fontsize="small", style="italic")


def write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)
    print(f"wrote {path}", flush=True)
    return path


def frame_markdown(df: pd.DataFrame) -> str:
    return markdown_table(list(df.columns), df.itertuples(index=False))


def write_table(df: pd.DataFrame, raw: pd.DataFrame, out: Path, stem: str, title: str, notes: Sequence[str]) -> None:
    """``<stem>.md`` (title, table, notes), ``.tex`` (booktabs) from the display frame ``df``,
    and ``.csv`` from ``raw`` (unrounded numbers, accuracies as fractions)."""
    note = " ".join(notes)
    write_text(out / f"{stem}.md", f"# {title}\n\n{frame_markdown(df)}\n{note}\n")
    write_text(out / f"{stem}.tex", latex_table(list(df.columns), df.itertuples(index=False), f"{title}. {note}"))
    write_text(out / f"{stem}.csv", raw.to_csv(index=False))
