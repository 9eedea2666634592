"""The paper at its own scale on one GPU: one sweep of named cells, most valuable first (issue 20).

    python analyses/gpu_plan.py --dry-run                     # the cells and the engine's measured estimate
    python analyses/gpu_plan.py --budget-minutes 40           # run; repeat the same command until it says done
    python analyses/gpu_plan.py --backend ray --gpus-per-cell 0.25   # the same cells on a Ray cluster
    python analyses/gpu_plan.py --smoke --runs-dir D --out D/paper --bundle D/out   # the same path, seconds, CPU

PreActResNet18 at ε = 8/255 (the ``paper`` preset, ``lib.catalog``) on the embedded CIFAR-10 JPEG
copy by default. The parts, most valuable first (:data:`PARTS`): the PGD-10 referee; FGSM, 30
epochs; APART, 30 epochs; Figure 2 (``kind="replay"`` cells: the referee on every epoch's FGSM δ
against noise, replayed over the per-epoch weights once both are trained); the methods table;
FGSM+; bf16 against fp32; the CUDA benchmarks; APART with the authors' recipe. The training and
replay cells run as ONE ``robustdrop.sweep`` in ``<runs-dir>/plan/`` (``--jobs`` cells share the
GPU locally; ``--backend ray --gpus-per-cell 0.25`` on Ray), which stops them at its deadline with
the engine's SIGTERM checkpoint; the same command continues them. The table's cached evaluation,
the bf16 comparison and the benchmarks are steps after the sweep, each started only while the
command has time for it.

Time: ``--max-minutes`` is one command's wall time (default 9), ``--budget-minutes`` the total of
all commands recorded in ``<runs-dir>/gpu_plan_state.json`` (default 40; the machine's start is not
counted); each command gets the smaller of the two. Cells start in order of value; what the time
does not reach is not started and named in ``gpu_plan.json``. Every command writes the results into
``--out`` (default ``figures/paper/``: metrics of every run, figures, tables, ``gpu_plan.json`` with
hardware, versions and wall times) and packs them into ``--bundle``. Exit code 0: all went well;
1: a cell or step failed (named, with its log).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import shutil
import sys
import tarfile
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from lib.catalog import (
    catalog,
    cell_environment,
    config_for,
    load_data,
    ref_name,
    replay_name,
    table_evaluation,
)
from lib.setting import REPO, Setting, build_parser, setting_from_args

from robustdrop.environment import environment
from robustdrop.errors import RobustdropError
from robustdrop.evaluation import EVAL_CACHE, evaluate_run_cached
from robustdrop.store import SweepRecord, atomic_write_bytes, atomic_write_text, is_sweep_dir
from robustdrop.sweeps import plan_sweep, run_sweep

SWEEP = "plan"  # <runs-dir>/plan/: the sweep directory; its cells are named as the catalog's runs
STATE_FILE, RECORD_FILE, LOG_FILE, BUNDLE = "gpu_plan_state.json", "gpu_plan.json", "gpu_plan.log", "paper.tar.gz"
REF = "@referee"  # stands for the referee's catalog name (pgd10; pgd2 with --smoke) in PARTS
# part -> its sweep cells (a training run by catalog name, "replay:<run>": the referee replayed over
# its per-epoch weights) and its step after the sweep; in the order of their value.
PARTS: dict[str, tuple[tuple[str, ...], str | None]] = {
    "referee": ((REF,), None),
    "fgsm": (("fgsm",), None),
    "apart": (("apart",), None),
    "figure2": (("replay:fgsm", "replay:apart"), None),
    "table": ((), "table"),
    "fgsm+": (("fgsm+", "replay:fgsm+"), "table"),
    "bf16": (("prec-bf16", "prec-fp32"), "bf16"),
    "bench": ((), "bench"),
    "apart-authors": (("apart-authors",), "table"),
}
NEEDS = {"figure2": ("referee", "fgsm"), "table": ("referee", "fgsm"), "bf16": ("referee", "fgsm"),
         "fgsm+": ("referee",)}  # the parts a part reads (added to --only)
# Minutes a step after the sweep must have left in the command to start (rough, at paper scale on
# one GPU; each step finishes once started), and the minutes kept for writing the results.
STEP_MIN = {"table": 1.0, "bf16": 1.5, "bench": 2.5}
PACK_MIN = 0.5
BENCH_SIZES = {
    "paper": dict(width=1.0, train_subset=10000, apart_n=10240, repeats=2, cost_batch=128, cost_repeats=5),
    "smoke": dict(width=1 / 16, train_subset=256, apart_n=256, repeats=1, cost_batch=32, cost_repeats=1),
}


def parser() -> Any:
    p = build_parser(__doc__, jobs=3)
    p.set_defaults(scale="paper")
    p.add_argument("--max-minutes", type=float, default=9.0,
                   help="wall minutes of this command, outputs included (default 9; 0: no limit): the sweep stops its "
                        "cells (SIGTERM, checkpoint) in time to write the results; the same command continues")
    p.add_argument("--budget-minutes", type=float, default=40.0,
                   help="wall minutes all commands of this plan may use together (default 40; 0: no limit); each "
                        "command gets what is left of it, at most --max-minutes")
    p.add_argument("--bundle", type=Path, default=None, help=f"also pack the results here: {BUNDLE}, {RECORD_FILE}, "
                                                             f"{LOG_FILE} (e.g. $OUT)")
    p.add_argument("--dry-run", action="store_true", help="print the cells and the engine's estimate, run nothing")
    p.add_argument("--only", nargs="+", default=[], choices=list(PARTS), metavar="PART",
                   help=f"only these parts (and the parts they read): {', '.join(PARTS)}")
    p.add_argument("--skip", nargs="+", default=[], choices=list(PARTS), metavar="PART", help="leave these parts out")
    p.add_argument("--ref-epochs", type=int, default=None,
                   help="epochs of the PGD-10 referee (default: what the plan's sweep recorded, else the preset's 30)")
    p.add_argument("--backend", choices=("local", "ray"), default="local", help="where the cells run (default local)")
    p.add_argument("--address", default=None, help="--backend ray: the cluster's address")
    p.add_argument("--gpus-per-cell", type=float, default=0.0, help="--backend ray: GPUs per cell (0.25: four share one)")
    return p


def plan_setting(args: Any) -> Setting:
    if args.scale != "paper":
        raise SystemExit("gpu_plan.py runs the paper scale (or --smoke); for the quick scale use run_all.py")
    if args.runs_dir is None:
        args.runs_dir = (Path(tempfile.mkdtemp(prefix="robustdrop-gpu-plan-smoke-")) if args.smoke
                         else REPO / "runs" / "gpu_plan")
    if args.dataset is None and not args.smoke:
        args.dataset = "cifar10-jpeg"
    if args.threads is None:
        args.threads = 1 if args.smoke else max(1, (os.cpu_count() or 4) // (max(1, args.jobs) + 1))
    setting = setting_from_args(args)
    if args.out is None and args.smoke:
        setting.out = setting.runs_dir / "paper"
    # The table's AutoAttack column is not in the plan's time (≈35× PGD-20 per image on all 10 000
    # test images; torchattacks is absent on the lent GPU machine): left empty, and the table says so.
    setting.autoattack = False
    setting.ref_epochs = int(args.ref_epochs or 0)
    return setting


def chosen_parts(args: Any) -> list[str]:
    """``--only`` (with the parts they read) less ``--skip``, in the order of value."""
    asked = set(args.only or PARTS)
    for part in list(asked):
        asked |= set(NEEDS.get(part, ()))
    return [p for p in PARTS if p in asked and p not in args.skip]


# ------------------------------------------------------------------------------------------------
# The sweep's cells
# ------------------------------------------------------------------------------------------------
def all_cells(setting: Setting) -> dict[str, tuple[str, dict[str, Any]]]:
    """Every cell of the plan, in the order of value: ``{cell: (part, sweep cell spec)}``. A
    training cell is the catalog run's resolved config (``lib.catalog.config_for``; --smoke: its
    image folder, ``write_smoke_data``), under its catalog name; a replay cell is named as the
    catalog names it (``replay_name``)."""
    cat, ref = catalog(setting), ref_name(setting)
    out: dict[str, tuple[str, dict[str, Any]]] = {}
    for part, (cells, _) in PARTS.items():
        for cell in cells:
            kind, _, run = cell.rpartition(":")
            run = ref if run == REF else run
            if kind == "replay":
                out[replay_name(run)] = (part, {"kind": "replay", "run": f"@{run}", "reference": f"@{ref}"})
            else:
                out[run] = (part, config_for(setting, cat[run]).to_dict())
    return out


def sweep_cells(setting: Setting, parts: Sequence[str], recorded: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
    """The cells of ``parts`` whose inputs are in the plan, plus those an earlier command recorded
    (a sweep's record only grows), in the order of value."""
    cells = all_cells(setting)
    keep = {c for c, (part, _) in cells.items() if part in parts} | (set(recorded) & set(cells))
    keep = {c for c in keep if cells[c][1].get("kind") != "replay"
            or {cells[c][1]["run"][1:], ref_name(setting)} <= keep}
    return {c: spec for c, (_, spec) in cells.items() if c in keep}


def recorded_ref_epochs(setting: Setting) -> int:
    """The referee's epochs in the plan's sweep record (0: none recorded, the preset's), so a later
    command without ``--ref-epochs`` continues the referee the first one started."""
    sweep_dir = setting.runs_dir / SWEEP
    entry = SweepRecord.open(sweep_dir).cells.get(ref_name(setting)) or {} if is_sweep_dir(sweep_dir) else {}
    return int((entry.get("config") or {}).get("epochs", 0))


def make_plan(setting: Setting, parts: Sequence[str], sweep_dir: Path) -> Any:
    """The sweep of ``parts`` (and of the cells ``sweep_dir`` records), nothing created."""
    recorded = list(SweepRecord.open(sweep_dir).cells) if is_sweep_dir(sweep_dir) else []
    return plan_sweep({}, name=SWEEP, cells=sweep_cells(setting, parts, recorded))


# ------------------------------------------------------------------------------------------------
# Steps after the sweep (each needs finished cells; the GPU to itself)
# ------------------------------------------------------------------------------------------------
def evaluate_tables(live: Setting, names: Sequence[str]) -> None:
    """The table's cached final / best evaluation, as every table of the analyses evaluates
    (``lib.catalog.table_evaluation``: ``eval_n`` test images, the setting's seed; no AutoAttack here)."""
    for name in names:
        evaluate_run_cached(live.runs_dir / name, table_evaluation(live))


def run_benchmarks(setting: Setting, target: Path) -> None:
    """The scripts of ``benchmarks/`` as functions, the GPU to themselves: engine / bare compute
    (``bench_train``), APART / PGD-10 (``bench_apart``), forward-pass equivalents and FLOP rate
    (``bench_costs``); into ``target`` (JSON)."""
    import argparse
    import statistics

    from robustdrop.engine import resolve_device
    from robustdrop.environment import device_name

    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_apart
    import bench_costs
    import bench_train

    size, device = BENCH_SIZES["smoke" if setting.smoke else "paper"], resolve_device(setting.device)
    dataset = "synthetic" if setting.smoke else setting.dataset or "cifar10"
    data = load_data(setting, {"dataset": dataset, "data_dir": setting.data_dir})  # --smoke: its image folder
    start, ns = time.perf_counter(), argparse.Namespace
    train = bench_train.measure(ns(dataset=dataset, train_subset=size["train_subset"], repeats=size["repeats"],
                                   batch_size=64 if setting.smoke else 128, device=str(device)),
                                "preactresnet18", size["width"], data=data)
    methods = ["fgsm", "pgd", "fgsm+", "apart"]
    times = bench_apart.bench(device, ns(model="preactresnet18", width=size["width"], n=size["apart_n"],
                                         batch_size=128, repeats=size["repeats"], methods=methods))
    costs = {("fp32" if fp32 or device.type != "cuda" else "bf16"): bench_costs.measure(ns(
        device=str(device), model="preactresnet18", width=size["width"], batch_size=size["cost_batch"],
        repeats=size["cost_repeats"], eval_pgd_steps=20, methods=methods, fp32=fp32))
        for fp32 in ((False, True) if device.type == "cuda" else (True,))}
    record = {"device": device_name(device), "scale": setting.tag, "seconds": time.perf_counter() - start,
              "bench_train": {**train, "train_subset": size["train_subset"], "goal": "engine / bare <= 1.10"},
              "bench_apart": {"methods": {m: {"best_s": min(t), "median_s": statistics.median(t)}
                                          for m, t in times.items()},
                              "n": size["apart_n"], "apart_over_pgd10": min(times["apart"]) / min(times["pgd"]),
                              "note": "fastest epoch of each method, methods interleaved; PGD-10 step 2/255"},
              "bench_costs": costs}
    atomic_write_text(target, json.dumps(record, indent=2) + "\n")


def table_runs(setting: Setting, parts: Sequence[str], finished: set[str]) -> list[str]:
    """The finished runs of the methods table: the referee, FGSM and APART (part ``table``), FGSM+
    and APART with the authors' recipe (their parts), in the table's order."""
    names = (["fgsm", ref_name(setting)] if "table" in parts else []) + ["fgsm+"] * ("fgsm+" in parts) + (
        ["apart"] if "table" in parts else []) + ["apart-authors"] * ("apart-authors" in parts)
    return [n for n in names if n in finished]


def run_steps(setting: Setting, live: Setting, parts: Sequence[str], finished: set[str], end: float,
              done: dict[str, str]) -> list[str]:
    """The steps of ``parts`` whose cells finished, each started only when the command has
    :data:`STEP_MIN` minutes left before ``end`` (``time.monotonic``); results are files (a done
    step is not repeated). Returns the failed steps; ``done`` maps each step to what happened."""
    from lib.precision import PAIR, PRECISION_FILE, measure_precision

    ref = ref_name(setting)
    table = table_runs(setting, parts, finished)
    # step -> (its cells finished, its output already there, the step)
    steps: dict[str, tuple[bool, bool, Callable[[], Any]]] = {
        "table": (bool(table), False, lambda: evaluate_tables(live, table)),  # cached: only what is new is computed
        "bf16": ({ref, "fgsm", *PAIR} <= finished, (live.runs_dir / PRECISION_FILE).is_file(),
                 lambda: measure_precision(live)),
        "bench": (True, (setting.runs_dir / "benchmarks.json").is_file(),
                  lambda: run_benchmarks(setting, setting.runs_dir / "benchmarks.json")),
    }
    failed = []
    for step, (ready, have, fn) in steps.items():
        if not any(PARTS[p][1] == step for p in parts):
            continue
        left = (end - time.monotonic()) / 60
        if have or not ready or left < (0 if setting.smoke else STEP_MIN[step] + PACK_MIN):
            done[step] = "done" if have else "waits for its cells" if not ready else f"not started: {left:.1f} min left"
            continue
        print(f"step {step}: start", flush=True)
        try:
            fn()
            done[step] = "done"
        except Exception as exc:  # one failed step must not lose the others or the results
            traceback.print_exc()
            done[step] = f"FAILED: {type(exc).__name__}: {exc}"
            failed.append(step)
    return failed


# ------------------------------------------------------------------------------------------------
# The results: metrics-only runs, figures, tables, the record, the bundle
# ------------------------------------------------------------------------------------------------
RUN_FILES = ("config.json", "manifest.json", "metrics.parquet", "metrics.csv", "events.jsonl", EVAL_CACHE)


def export_runs(runs: Path, out: Path, names: Sequence[str]) -> list[str]:
    """Each run's metrics, config, manifest, events and cached evaluation (no checkpoints) into
    ``out/runs/<name>/``, and FGSM's perturbation snapshots (Figure 1's, about 30 KB per epoch)."""
    copied = []
    for name in names:
        if not (runs / name / "config.json").is_file():
            continue
        fresh = out / "runs" / f".{name}.tmp"
        shutil.rmtree(fresh, ignore_errors=True)
        fresh.mkdir(parents=True)
        for file in RUN_FILES:
            if (runs / name / file).is_file():
                shutil.copy2(runs / name / file, fresh / file)
        if name == "fgsm" and (runs / name / "arrays" / "snapshots").is_dir():
            shutil.copytree(runs / name / "arrays" / "snapshots", fresh / "arrays" / "snapshots")
        shutil.rmtree(out / "runs" / name, ignore_errors=True)
        fresh.rename(out / "runs" / name)
        copied.append(name)
    return copied


def draw(r: Setting, parts: Sequence[str], finished: set[str], steps: dict[str, str]) -> dict[str, str]:
    """Every figure and table whose inputs are finished, from the metrics-only copies in ``r.runs_dir``;
    ``{output: error}`` of those that failed."""
    import fig1_perturbations
    import fig2_strength
    import table_methods
    from lib.outputs import add_caption, setting_caption, write_figure

    from robustdrop.plots import curves_figure

    errors: dict[str, str] = {}

    def attempt(name: str, fn: Callable[[], Any]) -> None:
        try:
            fn()
        except Exception as exc:  # one broken figure must not lose the others
            traceback.print_exc()
            errors[name] = f"{type(exc).__name__}: {exc}"

    ref = ref_name(r)
    measured = [n for n in ("fgsm", "fgsm+", "apart") if f"{n}-referee" in finished]
    if measured:
        attempt("fig2_strength", lambda: fig2_strength.write_outputs(r, measured))
    if "fgsm" in finished:
        attempt("fig1_perturbations", lambda: fig1_perturbations.write_outputs(r))
    curves = [r.runs_dir / n for n in (ref, "fgsm", "fgsm+", "apart", "apart-authors")
              if (r.runs_dir / n / "metrics.parquet").is_file()]
    if curves:
        def curves_out() -> None:
            fig = curves_figure(curves)
            partial = ", ".join(p.name for p in curves if p.name not in finished)
            add_caption(fig, setting_caption(r) + (f"\nnot finished yet: {partial}" if partial else ""))
            write_figure(fig, r.out, "curves")
        attempt("curves", curves_out)
    table = table_runs(r, parts, finished)
    if steps.get("table") == "done" and table:
        attempt("table_methods", lambda: table_methods.write(
            r, table, "table_methods", "Methods: final and best clean / PGD / CW-loss PGD test accuracy"))
    return errors


def gpu_description() -> dict[str, Any]:
    """The GPU (name, memory, CUDA and cuDNN versions) when there is one."""
    if not torch.cuda.is_available():
        return {}
    props = torch.cuda.get_device_properties(0)
    return {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1), "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(), "multiprocessors": props.multi_processor_count}


def pack(out: Path, bundle: Path, extra: Sequence[Path]) -> None:
    """``bundle/paper.tar.gz`` (``out`` as ``paper/``) and copies of ``extra``; warns over the 16 MiB
    a file may have to come back from the GPU machine."""
    bundle.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path in sorted(out.rglob("*")):
            if path.is_file() and not any(part.startswith(".") for part in path.relative_to(out).parts):
                tar.add(path, arcname=f"paper/{path.relative_to(out)}")
    atomic_write_bytes(bundle / BUNDLE, buf.getvalue())
    if len(buf.getvalue()) > 16 * 2**20:
        print(f"WARNING: {bundle / BUNDLE} is {len(buf.getvalue()) / 2**20:.1f} MiB, over 16 MiB", flush=True)
    for file in extra:
        if file.is_file():
            shutil.copy2(file, bundle / file.name)


def finish(setting: Setting, args: Any, state: dict[str, Any], parts: Sequence[str], cells: dict[str, dict[str, Any]],
           statuses: dict[str, str], steps: dict[str, str]) -> list[str]:
    """Export the runs, copy the step records, draw, write ``gpu_plan.json``; returns the names
    of the figures and tables that failed."""
    live, out = setting.runs_dir / SWEEP, setting.out
    finished = {c for c, s in statuses.items() if s == "finished"}
    exported = export_runs(live, out, [c for c in cells if cells[c].get("kind") != "replay"])
    for source, name in ((live / "precision.json", "bf16_vs_fp32.json"),
                         (setting.runs_dir / "benchmarks.json", "benchmarks.json")):
        if source.is_file():
            shutil.copy2(source, out / name)
    if (out / "bf16_vs_fp32.json").is_file():
        from lib.precision import precision_markdown

        (out / "bf16_vs_fp32.md").write_text(precision_markdown(json.loads((out / "bf16_vs_fp32.json").read_text())))
    errors = draw(dataclasses.replace(setting, runs_dir=out / "runs"), parts, finished, steps)
    left = [c for c in cells if c not in finished] + [s for s, v in steps.items() if v != "done"]
    record = {"format": "robustdrop-gpu-plan-record-2", "command": " ".join(sys.argv),
              "status": "done" if not left else f"to do: {', '.join(left)}", "sweep": str(live),
              "setting": {k: str(v) for k, v in dataclasses.asdict(setting).items()},
              "budget_minutes": args.budget_minutes, "max_minutes": args.max_minutes, "jobs": setting.jobs,
              "backend": args.backend, "gpus_per_cell": args.gpus_per_cell, "ref_epochs": setting.ref_epochs,
              "environment": {**environment(), "gpu": gpu_description()}, "cells": statuses, "steps": steps,
              "runs": exported, "invocations": state["invocations"], "draw_errors": errors}
    atomic_write_text(out / RECORD_FILE, json.dumps(record, indent=2, default=str) + "\n")
    return list(errors)


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------
class Tee(io.TextIOBase):
    """Text written to every stream of ``streams`` (the terminal and the command's log)."""

    def __init__(self, *streams: Any):
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()


def command_minutes(args: Any, state: dict[str, Any]) -> float:
    """This command's minutes: ``--max-minutes``, at most what is left of ``--budget-minutes``
    (``math.inf``: no limit)."""
    spent = sum(i["wall_s"] for i in state["invocations"]) / 60
    limits = [args.max_minutes if args.max_minutes > 0 else math.inf,
              args.budget_minutes - spent if args.budget_minutes > 0 else math.inf]
    return max(min(limits), 0.0)


def save_invocation(path: Path, state: dict[str, Any], invocation: dict[str, Any], started: float) -> None:
    """This command's wall time so far into the plan's state (what ``--budget-minutes`` counts)."""
    invocation["wall_s"] = round(time.monotonic() - started, 1)
    atomic_write_text(path, json.dumps(state, indent=2) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return plan_main(argv)
    except RobustdropError as exc:  # bad input or a changed plan: one line, nothing lost
        print(f"gpu_plan: error: {exc}", file=sys.stderr)
        return 2


def plan_main(argv: Sequence[str] | None) -> int:
    args = parser().parse_args(argv)
    if args.max_minutes < 0 or args.budget_minutes < 0:
        raise RobustdropError(f"--max-minutes and --budget-minutes must be >= 0 (0: no limit), got {args.max_minutes:g} "
                              f"and {args.budget_minutes:g}")
    setting = plan_setting(args)
    parts = chosen_parts(args)
    state_file = setting.runs_dir / STATE_FILE
    state = json.loads(state_file.read_text()) if state_file.is_file() else {"invocations": []}
    if args.ref_epochs is None:
        setting.ref_epochs = recorded_ref_epochs(setting)
    if args.dry_run:  # creates nothing: --smoke's data folder is a temporary one
        from robustdrop.sweeps.runner import dry_run_sweep

        with tempfile.TemporaryDirectory() as scratch:  # --smoke's data folder, where the dry run reads it
            here = dataclasses.replace(setting, runs_dir=Path(scratch)) if setting.smoke else setting
            with cell_environment(here):
                plan = make_plan(here, parts, setting.runs_dir / SWEEP)
                print(f"GPU plan: parts {', '.join(parts)}; {len(plan.cells)} cells in {setting.runs_dir / SWEEP}")
                rows = dry_run_sweep(plan, runs_dir=setting.runs_dir, jobs=setting.jobs)
        total = sum(r["estimate_s"] or 0.0 for r in rows) / 60 / max(1, setting.jobs)
        print(f"about {total:.1f} min of training with {setting.jobs} cells at a time (the engine's measured estimate; "
              f"replay cells and the steps after the sweep not estimated); budget {args.budget_minutes:g} min, "
              f"at most {args.max_minutes:g} min per command")
        return 0

    started, started_utc = time.monotonic(), datetime.now(timezone.utc).isoformat(timespec="seconds")
    torch.set_num_threads(max(1, setting.threads))  # the steps after the sweep run here (a cell's budget)
    minutes = command_minutes(args, state)
    end = started + minutes * 60
    live = dataclasses.replace(setting, runs_dir=setting.runs_dir / SWEEP)
    invocation = {"started_utc": started_utc, "minutes": round(minutes, 2), "wall_s": 0.0, "failed": []}
    state["invocations"].append(invocation)
    setting.runs_dir.mkdir(parents=True, exist_ok=True)
    with (open(setting.runs_dir / LOG_FILE, "a", encoding="utf-8") as log, contextlib.redirect_stdout(Tee(sys.stdout, log)),
          cell_environment(setting)):  # --smoke: its data folder and the folder's cache in the runs dir
        save_invocation(state_file, state, invocation, started)  # a command killed on the way still counts
        plan = make_plan(setting, parts, live.runs_dir)
        print(f"GPU plan: parts {', '.join(parts)}; {len(plan.cells)} cells; this command {minutes:.1f} min", flush=True)
        sweep_min = minutes - (0 if setting.smoke else PACK_MIN)  # the steps run in what the sweep leaves
        failed: list[str] = []
        if sweep_min > 0:
            result = run_sweep(plan, runs_dir=setting.runs_dir, backend=args.backend, jobs=setting.jobs,
                               address=args.address, gpus_per_cell=args.gpus_per_cell, progress=False, extend=True,
                               max_minutes=None if math.isinf(sweep_min) else sweep_min)
            failed += result.failed
        else:
            print("no time left in the budget: only the results are written", flush=True)
        record = SweepRecord.open(live.runs_dir) if is_sweep_dir(live.runs_dir) else None
        cells = {c.name: {"kind": c.kind} for c in plan.cells}
        statuses = {c: record.status(c) if record else "pending" for c in cells}
        steps: dict[str, str] = {}
        failed += run_steps(setting, live, parts, {c for c, s in statuses.items() if s == "finished"}, end, steps)
        invocation["failed"] = failed
        save_invocation(state_file, state, invocation, started)
        failed += finish(setting, args, state, parts, cells, statuses, steps)
        save_invocation(state_file, state, invocation, started)  # the results' writing counts too
        left = [c for c, s in statuses.items() if s != "finished"] + [s for s, v in steps.items() if v != "done"]
        print("plan: " + ("all chosen parts done" if not left else f"to do: {', '.join(left)}; run the same command "
                          "again") + f" ({time.monotonic() - started:.0f} s)" + (f"; FAILED: {', '.join(failed)}"
                                                                                  if failed else ""), flush=True)
    if args.bundle is not None:  # the log is complete only now
        pack(setting.out, args.bundle, [setting.out / RECORD_FILE, setting.runs_dir / LOG_FILE])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
