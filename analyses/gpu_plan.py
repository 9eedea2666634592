"""The paper at its own scale on one GPU: one sweep of named cells, most valuable first (issue 20).

    python analyses/gpu_plan.py --dry-run                     # the cells and the engine's measured estimate
    python analyses/gpu_plan.py --budget-minutes 40           # run; repeat the same command until it says done
    python analyses/gpu_plan.py --backend ray --gpus-per-cell 0.25   # the same cells on a Ray cluster
    python analyses/gpu_plan.py --smoke --runs-dir D --out D/paper --bundle D/out   # the same path, seconds, CPU

PreActResNet18 at ε = 8/255 (the ``paper`` preset) on the embedded CIFAR-10 JPEG copy by default.
The parts (:data:`PARTS`, most valuable first) are ONE ``robustdrop.sweep`` in ``<runs-dir>/plan/``
(``--jobs`` cells share the GPU; ``--backend ray``), stopped at the command's deadline with the
engine's SIGTERM checkpoint and continued by the same command; the steps after the sweep (the
table's evaluation, bf16 against fp32, the benchmarks) start only while the command has time for
them. ``--max-minutes``: one command's wall time (default 9); ``--budget-minutes``: all commands
together (default 40). Every command writes the results into ``--out`` (default
``figures/paper/``, with ``gpu_plan.json``: hardware, versions, wall times, what is left) and packs
them into ``--bundle``. Exit code 0: all went well; 1: a cell or step failed (named, with its log).
Details: docs/gpu-plan.md.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from lib.catalog import catalog, cell_environment, config_for, load_data, ref_name, replay_name, table_evaluation
from lib.setting import REPO, Setting, build_parser, run_script, setting_from_args

from robustdrop._progress import tee_stdout
from robustdrop.environment import environment, gpu_description
from robustdrop.errors import RobustdropError
from robustdrop.evaluation import EVAL_CACHE, evaluate_run_cached
from robustdrop.store import SweepRecord, atomic_write_text, export_run, is_sweep_dir, pack_folder
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


def recorded_cells(sweep_dir: Path) -> dict[str, dict[str, Any]]:
    """The cells ``sweep_dir``'s record holds (``{}``: no sweep there yet)."""
    return SweepRecord.open(sweep_dir).cells if is_sweep_dir(sweep_dir) else {}


def recorded_ref_epochs(setting: Setting) -> int:
    """The referee's epochs in the plan's sweep record (0: none recorded, the preset's), so a later
    command without ``--ref-epochs`` continues the referee the first one started."""
    entry = recorded_cells(setting.runs_dir / SWEEP).get(ref_name(setting)) or {}
    return int((entry.get("config") or {}).get("epochs", 0))


def make_plan(setting: Setting, parts: Sequence[str], sweep_dir: Path) -> Any:
    """The sweep of ``parts`` (and of the cells ``sweep_dir`` records), nothing created."""
    return plan_sweep({}, name=SWEEP, cells=sweep_cells(setting, parts, list(recorded_cells(sweep_dir))))


def run_benchmarks(setting: Setting, target: Path) -> None:
    """``benchmarks/bench_paper.py``'s record (engine / bare compute, APART / PGD-10, forward-pass
    equivalents and FLOP rate), the GPU to itself, on the plan's data; into ``target`` (JSON)."""
    from robustdrop.engine import resolve_device

    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_paper

    dataset = "synthetic" if setting.smoke else setting.dataset or "cifar10"
    data = load_data(setting, {"dataset": dataset, "data_dir": setting.data_dir})  # --smoke: its image folder
    record = bench_paper.measure(resolve_device(setting.device), smoke=setting.smoke, dataset=dataset, data=data,
                                 scale=setting.tag)
    atomic_write_text(target, json.dumps(record, indent=2) + "\n")


def table_runs(setting: Setting, parts: Sequence[str], finished: set[str]) -> list[str]:
    """The finished runs of the methods table: the referee, FGSM and APART (part ``table``), FGSM+
    and APART with the authors' recipe (their parts), in the table's order."""
    names = (["fgsm", ref_name(setting)] if "table" in parts else []) + ["fgsm+"] * ("fgsm+" in parts) + (
        ["apart"] if "table" in parts else []) + ["apart-authors"] * ("apart-authors" in parts)
    return [n for n in names if n in finished]


def attempt(fn: Callable[[], Any]) -> str | None:
    """Run ``fn``: ``None``, or its error (traceback printed) in one line; one failed step or figure
    must not lose the others or the results."""
    try:
        fn()
        return None
    except Exception as exc:
        traceback.print_exc()
        return f"{type(exc).__name__}: {exc}"


def run_steps(setting: Setting, live: Setting, parts: Sequence[str], finished: set[str], end: float) -> dict[str, str]:
    """The steps of ``parts`` whose cells finished, each started only when the command has
    :data:`STEP_MIN` minutes left before ``end`` (``time.monotonic``); results are files (a done
    step is not repeated). Returns what happened to each step (``"done"``, ``"FAILED: ..."``, ...)."""
    from lib.precision import PAIR, PRECISION_FILE, measure_precision

    table, bench = table_runs(setting, parts, finished), setting.runs_dir / "benchmarks.json"
    # step -> (its cells finished, its output already there, the step); the table's evaluation is
    # cached per checkpoint (only what is new is computed), as every table of the analyses evaluates
    steps: dict[str, tuple[bool, bool, Callable[[], Any]]] = {
        "table": (bool(table), False, lambda: [evaluate_run_cached(live.runs_dir / n, table_evaluation(live))
                                               for n in table]),
        "bf16": ({ref_name(setting), "fgsm", *PAIR} <= finished, (live.runs_dir / PRECISION_FILE).is_file(),
                 lambda: measure_precision(live)),
        "bench": (True, bench.is_file(), lambda: run_benchmarks(setting, bench)),
    }
    done: dict[str, str] = {}
    for step, (ready, have, fn) in steps.items():
        if not any(PARTS[p][1] == step for p in parts):
            continue
        left = (end - time.monotonic()) / 60
        if have or not ready or left < (0 if setting.smoke else STEP_MIN[step] + PACK_MIN):
            done[step] = "done" if have else "waits for its cells" if not ready else f"not started: {left:.1f} min left"
            continue
        print(f"step {step}: start", flush=True)
        error = attempt(fn)
        done[step] = f"FAILED: {error}" if error else "done"
    return done


def draw(r: Setting, parts: Sequence[str], finished: set[str], steps: dict[str, str]) -> dict[str, str]:
    """Every figure and table whose inputs are finished, from the metrics-only copies in ``r.runs_dir``;
    ``{output: error}`` of those that failed."""
    import fig1_perturbations
    import fig2_strength
    import table_methods
    from lib.outputs import add_caption, setting_caption, write_figure

    from robustdrop.plots import curves_figure

    outputs: dict[str, Callable[[], Any]] = {}
    measured = [n for n in ("fgsm", "fgsm+", "apart") if f"{n}-referee" in finished]
    if measured:
        outputs["fig2_strength"] = lambda: fig2_strength.write_outputs(r, measured)
    if "fgsm" in finished:
        outputs["fig1_perturbations"] = lambda: fig1_perturbations.write_outputs(r)
    curves = [r.runs_dir / n for n in (ref_name(r), "fgsm", "fgsm+", "apart", "apart-authors")
              if (r.runs_dir / n / "metrics.parquet").is_file()]
    if curves:
        def curves_out() -> None:
            fig = curves_figure(curves)
            partial = ", ".join(p.name for p in curves if p.name not in finished)
            add_caption(fig, setting_caption(r) + (f"\nnot finished yet: {partial}" if partial else ""))
            write_figure(fig, r.out, "curves")
        outputs["curves"] = curves_out
    table = table_runs(r, parts, finished)
    if steps.get("table") == "done" and table:
        outputs["table_methods"] = lambda: table_methods.write(
            r, table, "table_methods", "Methods: final and best clean / PGD / CW-loss PGD test accuracy")
    return {name: error for name, fn in outputs.items() if (error := attempt(fn))}


def finish(setting: Setting, args: Any, state: dict[str, Any], parts: Sequence[str], statuses: dict[str, str],
           kinds: dict[str, str], steps: dict[str, str], left: list[str]) -> list[str]:
    """Export the runs (no checkpoints), copy the step records, draw, write ``gpu_plan.json``;
    returns the names of the figures and tables that failed."""
    from lib.precision import PRECISION_FILE, precision_markdown

    live, out = setting.runs_dir / SWEEP, setting.out
    finished = {c for c, s in statuses.items() if s == "finished"}
    exported = [c for c in statuses if kinds[c] != "replay" and export_run(  # Figure 1 reads FGSM's δ snapshots
        live / c, out / "runs" / c, extra=(EVAL_CACHE, *(["arrays/snapshots"] if c == "fgsm" else [])))]
    for source, name in ((live / PRECISION_FILE, "bf16_vs_fp32.json"), (setting.runs_dir / "benchmarks.json",
                                                                         "benchmarks.json")):
        if source.is_file():
            shutil.copy2(source, out / name)
    if (out / "bf16_vs_fp32.json").is_file():
        (out / "bf16_vs_fp32.md").write_text(precision_markdown(json.loads((out / "bf16_vs_fp32.json").read_text())))
    errors = draw(dataclasses.replace(setting, runs_dir=out / "runs"), parts, finished, steps)
    record = {"format": "robustdrop-gpu-plan-record-2", "command": " ".join(sys.argv),
              "status": "done" if not left else f"to do: {', '.join(left)}", "sweep": str(live),
              "setting": {k: str(v) for k, v in dataclasses.asdict(setting).items()},
              "budget_minutes": args.budget_minutes, "max_minutes": args.max_minutes, "jobs": setting.jobs,
              "backend": args.backend, "gpus_per_cell": args.gpus_per_cell, "ref_epochs": setting.ref_epochs,
              "environment": {**environment(), "gpu": gpu_description()}, "cells": statuses, "steps": steps,
              "runs": exported, "invocations": state["invocations"], "draw_errors": errors}
    atomic_write_text(out / RECORD_FILE, json.dumps(record, indent=2, default=str) + "\n")
    return list(errors)


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


def dry_run(setting: Setting, args: Any, parts: Sequence[str]) -> int:
    """Print the cells and the engine's measured estimate; creates nothing (--smoke's data folder is
    a temporary one, where the dry run reads it)."""
    from robustdrop.sweeps.runner import dry_run_sweep

    with tempfile.TemporaryDirectory() as scratch:
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


def plan_main(argv: Sequence[str] | None) -> int:
    args = parser().parse_args(argv)
    if args.max_minutes < 0 or args.budget_minutes < 0:
        raise RobustdropError(f"--max-minutes and --budget-minutes must be >= 0 (0: no limit), got {args.max_minutes:g} "
                              f"and {args.budget_minutes:g}")
    setting, parts = plan_setting(args), chosen_parts(args)
    if args.ref_epochs is None:
        setting.ref_epochs = recorded_ref_epochs(setting)
    if args.dry_run:
        return dry_run(setting, args, parts)

    state_file = setting.runs_dir / STATE_FILE
    state = json.loads(state_file.read_text()) if state_file.is_file() else {"invocations": []}
    started, started_utc = time.monotonic(), datetime.now(timezone.utc).isoformat(timespec="seconds")
    torch.set_num_threads(max(1, setting.threads))  # the steps after the sweep run here (a cell's budget)
    minutes = command_minutes(args, state)
    live = dataclasses.replace(setting, runs_dir=setting.runs_dir / SWEEP)
    invocation = {"started_utc": started_utc, "minutes": round(minutes, 2), "wall_s": 0.0, "failed": []}
    state["invocations"].append(invocation)
    setting.runs_dir.mkdir(parents=True, exist_ok=True)
    with tee_stdout(setting.runs_dir / LOG_FILE), cell_environment(setting):  # --smoke: its data and cache
        save_invocation(state_file, state, invocation, started)  # a command killed on the way still counts
        plan = make_plan(setting, parts, live.runs_dir)
        print(f"GPU plan: parts {', '.join(parts)}; {len(plan.cells)} cells; this command {minutes:.1f} min", flush=True)
        sweep_min = minutes - (0 if setting.smoke else PACK_MIN)  # the steps run in what the sweep leaves
        failed: list[str] = []
        if sweep_min > 0:
            failed += run_sweep(plan, runs_dir=setting.runs_dir, backend=args.backend, jobs=setting.jobs,
                                address=args.address, gpus_per_cell=args.gpus_per_cell, progress=False, extend=True,
                                max_minutes=None if math.isinf(sweep_min) else sweep_min).failed
        else:
            print("no time left in the budget: only the results are written", flush=True)
        recorded = recorded_cells(live.runs_dir)
        statuses = {c.name: str(recorded.get(c.name, {}).get("status", "pending")) for c in plan.cells}
        steps = run_steps(setting, live, parts, {c for c, s in statuses.items() if s == "finished"},
                          started + minutes * 60)
        failed += [s for s, v in steps.items() if v.startswith("FAILED")]
        invocation["failed"] = failed  # the same list: the figures that fail below are added to it
        save_invocation(state_file, state, invocation, started)
        left = [c for c, s in statuses.items() if s != "finished"] + [s for s, v in steps.items() if v != "done"]
        failed += finish(setting, args, state, parts, statuses, {c.name: c.kind for c in plan.cells}, steps, left)
        save_invocation(state_file, state, invocation, started)  # the results' writing counts too
        print("plan: " + ("all chosen parts done" if not left else f"to do: {', '.join(left)}; run the same command "
                          "again") + f" ({time.monotonic() - started:.0f} s)" + (f"; FAILED: {', '.join(failed)}"
                                                                                  if failed else ""), flush=True)
    if args.bundle is not None:  # the log is complete only now
        args.bundle.mkdir(parents=True, exist_ok=True)
        size = pack_folder(setting.out, args.bundle / BUNDLE, arcname="paper")
        if size > 16 * 2**20:  # what a file may have to come back from the GPU machine
            print(f"WARNING: {args.bundle / BUNDLE} is {size / 2**20:.1f} MiB, over 16 MiB", flush=True)
        for file in (setting.out / RECORD_FILE, setting.runs_dir / LOG_FILE):
            if file.is_file():
                shutil.copy2(file, args.bundle / file.name)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run_script(main))
