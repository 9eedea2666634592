"""The paper at its own scale on one GPU, in commands of at most 9 minutes (issue 14).

    python analyses/gpu_plan.py --dry-run                     # the plan: minutes per part, the total
    python analyses/gpu_plan.py --budget-minutes 40           # run; repeat the same command until it says done
    python analyses/gpu_plan.py --dataset cifar10 --data-dir ~/data   # real CIFAR-10 instead of the embedded copy
    python analyses/gpu_plan.py --smoke --runs-dir D --out D/paper --bundle D/out   # the same path, seconds, CPU

PreActResNet18 at ε = 8/255 (the ``paper`` preset) on the embedded CIFAR-10 JPEG copy by default.
The parts, most valuable first (``lib.plan``): the PGD-10 referee; FGSM, 30 epochs; APART, 30
epochs; Figure 2 (the referee on every epoch's FGSM δ against noise, measured after training from
per-epoch weights, so FGSM need not wait for the referee); the methods table; FGSM+; bf16 against
fp32; the CUDA benchmarks; APART with the authors' recipe. Parts that do not fit ``--budget-minutes``
(estimated from FLOP counts, ``lib.estimate``, then from the rate measured while running) are
left out and named. Runs that fit together share the GPU (``--jobs`` training processes).

Each command works for at most ``--max-minutes``, stops its trainings with SIGTERM, writes every
result into ``--out`` (default ``figures/paper/``: metrics of every run, figures, tables,
benchmarks, ``gpu_plan.json`` with hardware, versions and wall times, the README's results section)
and packs it into ``--bundle`` (``paper.tar.gz``, ``gpu_plan.json``, ``gpu_plan.log``). The next
command continues from the live state in ``--runs-dir`` (default ``runs/gpu_plan/``); on a fresh
machine it restarts from the results in ``--out`` (trainings in flight start again from scratch:
their checkpoints do not come back). Exit code 0: all went well (``gpu_plan.json`` says what is
left); 1: a task failed (named, with its log).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from lib import estimate
from lib.benchmarks import BENCH_FILE, run_benchmarks
from lib.catalog import load_data, ref_name
from lib.deferred import measure_run
from lib.estimate import CPU, Assumptions
from lib.evaluation import evaluate_run
from lib.plan import (
    PART_NAMES,
    RECORD_FILE,
    Selection,
    build,
    choose,
    is_done,
    load_state,
    new_state,
    now_utc,
    restore,
    restored_runs,
    save_state,
    status,
)
from lib.precision import PRECISION_FILE, measure_precision
from lib.setting import REPO, Setting, build_parser, setting_from_args
from lib.supervisor import Supervisor, child_env
from lib.training import train_run

from robustdrop.environment import environment

RUNS = ["fgsm", "fgsm+", "apart", "apart-authors", "prec-bf16", "prec-fp32"]  # and the referee, first
CURVES = ["fgsm", "fgsm+", "apart", "apart-authors"]


def run_names(setting: Setting, names: Sequence[str] = RUNS) -> list[str]:
    """The referee (``pgd10``; ``pgd2`` with --smoke), then ``names``."""
    return [ref_name(setting), *names]
RESERVE_MIN = {"paper": 0.75, "smoke": 0.05}  # per command: stopping the children, the outputs


# ------------------------------------------------------------------------------------------------
# The command line
# ------------------------------------------------------------------------------------------------
def parser() -> Any:
    p = build_parser(__doc__, jobs=3)
    p.set_defaults(scale="paper")
    p.add_argument("--budget-minutes", type=float, default=40.0,
                   help="GPU minutes this plan may use on this machine, the machine's start included (default 40; "
                        "0: no limit); parts that do not fit are left out, the most valuable kept")
    p.add_argument("--max-minutes", type=float, default=9.0,
                   help="wall minutes of this command, outputs included (default 9; 0: until the plan is done); "
                        "it then stops its trainings, writes the outputs and says what is left")
    p.add_argument("--bundle", type=Path, default=None,
                   help="also pack the results here: paper.tar.gz, gpu_plan.json, gpu_plan.log (e.g. $OUT)")
    p.add_argument("--dry-run", action="store_true", help="print the plan with estimated minutes, run nothing")
    p.add_argument("--only", nargs="+", default=[], choices=PART_NAMES, metavar="PART",
                   help=f"only these parts (and what they need): {', '.join(PART_NAMES)}")
    p.add_argument("--skip", nargs="+", default=[], choices=PART_NAMES, metavar="PART", help="leave these parts out")
    p.add_argument("--ref-epochs", type=int, default=None,
                   help="epochs of the PGD-10 referee (default: the preset's 30 if it fits the budget, else 15 or 8; "
                        "once chosen, kept for the plan)")
    p.add_argument("--rate-tflops", type=float, default=None,
                   help="assume this sustained TFLOP/s for one training process (default: measured, else 40)")
    p.add_argument("--stop-after-epochs", type=int, default=None,
                   help="testing: stop each training (SIGTERM) once it has logged this many epochs in this command, "
                        "as if the command's time ran out")
    p.add_argument("--child", default=None, help=argparse_hidden())
    return p


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


def plan_setting(args: Any) -> Setting:
    if args.scale != "paper":
        raise SystemExit("gpu_plan.py runs the paper scale (or --smoke); for the quick scale use run_all.py")
    if args.runs_dir is None:
        args.runs_dir = (Path(tempfile.mkdtemp(prefix="robustdrop-gpu-plan-smoke-")) if args.smoke
                         else REPO / "runs" / "gpu_plan")
    if args.dataset is None and not args.smoke:
        args.dataset = "cifar10-jpeg"
    jobs = max(1, int(args.jobs))
    if args.threads is None:
        args.threads = 1 if args.smoke else max(1, (os.cpu_count() or 4) // (jobs + 1))
    setting = setting_from_args(args)
    if args.out is None and args.smoke:
        setting.out = setting.runs_dir / "paper"
    # The methods table's AutoAttack column is not in the plan's budget (standard AutoAttack costs
    # ≈35× PGD-20 per image, on all 10 000 test images at paper scale; torchattacks is absent on the
    # lent GPU machine): left empty, and the table says so.
    setting.autoattack = False
    setting.ref_epochs = int(args.ref_epochs or 0)  # a child gets the length its parent chose
    return setting  # Figure 2's referee, pgd10, is measured after training (lib.catalog.reference_deferred)


def child_command(setting: Setting, args: Any) -> Any:
    """``keys -> argv`` of a child process: this script, the same setting, ``--child KEYS``."""
    base = [sys.executable, str(Path(__file__).resolve()), "--scale", "paper", "--runs-dir", str(setting.runs_dir),
            "--out", str(setting.out), "--threads", str(setting.threads), "--device", setting.device,
            "--seed", str(setting.seed), "--eval-n", str(setting.eval_n), "--jobs", str(setting.jobs)]
    if setting.smoke:
        base.append("--smoke")
    if setting.dataset:
        base += ["--dataset", setting.dataset]
    if setting.data_dir:
        base += ["--data-dir", setting.data_dir]
    if setting.ref_epochs:  # the referee's length the plan chose (decide), else the child trains the preset's
        base += ["--ref-epochs", str(setting.ref_epochs)]
    return lambda keys: [*base, "--child", ",".join(keys)]


def run_child(setting: Setting, keys: Sequence[str]) -> int:
    """Do tasks ``keys`` in order in this process (a child of the plan)."""
    if setting.threads:
        torch.set_num_threads(setting.threads)
    for key in keys:
        kind, _, name = key.partition(":")
        start = time.perf_counter()
        print(f"task {key}: start", flush=True)
        try:
            if kind == "train":
                train_run(setting, name)
            elif kind == "measure":
                measure_run(setting, name)
            elif kind == "eval":
                evaluate_run(setting, name)
            elif kind == "precision":
                measure_precision(setting)
            elif kind == "bench":
                run_benchmarks(setting)
            else:
                raise ValueError(f"unknown task {key!r}")
        except Exception:
            traceback.print_exc()
            print(f"task {key}: FAILED", flush=True)
            return 1
        print(f"task {key}: done in {time.perf_counter() - start:.0f} s", flush=True)
    return 0


# ------------------------------------------------------------------------------------------------
# Rates, budget and the printed plan
# ------------------------------------------------------------------------------------------------
def assumptions(setting: Setting, args: Any, state: dict[str, Any] | None, record: dict[str, Any] | None) -> Assumptions:
    a = CPU if setting.smoke or setting.device == "cpu" else Assumptions()
    if not setting.smoke and torch.cuda.is_available():
        a = dataclasses.replace(a, device=torch.cuda.get_device_name(0))
    measured = (state or {}).get("measured") or (record or {}).get("measured")
    if args.rate_tflops:
        return a.with_rate(args.rate_tflops, "--rate-tflops")
    if measured and measured.get("one_process_tflops") and measured.get("device") == a.device:
        return a.with_rate(measured["one_process_tflops"], f"measured: {measured['basis']}")
    return a


def spent_minutes(state: dict[str, Any] | None, a: Assumptions) -> float:
    """Device minutes this machine's lease has used so far: its start and every command."""
    if not state or not state["invocations"]:
        return 0.0
    return a.machine_start_min + sum(i["wall_s"] / 60 + a.command_overhead_min for i in state["invocations"])


def print_plan(sel: Selection, parts: Sequence[Any], tasks: dict[str, Any], a: Assumptions, *, budget: float,
               spent: float, max_minutes: float, reserve: float, setting: Setting, jobs: int) -> None:
    from lib.outputs import setting_caption

    tl, c = sel.timeline, sel.costs
    print(f"GPU plan, {setting_caption(setting)}; data {setting.dataset or 'synthetic'}; {jobs} trainings at a time")
    print(f"rates: {estimate.describe(a)}")
    if setting.ref_epochs:
        print(f"referee: {setting.ref_epochs} epochs (a cyclic schedule of its own length), not the preset's "
              "(it does not fit the budget, or --ref-epochs)")
    head = f"{'#':>2}  {'part':<14} {'what':<66} {'PFLOP':>7} {'min':>6} {'ready at':>9}"
    print(head)
    print("-" * len(head))
    ready_offset = c.start_min
    useful = max(max_minutes - reserve - a.command_overhead_min, 0.5) if max_minutes > 0 else math.inf
    for i, part in enumerate(parts, 1):
        keys = list(part.tasks)
        flop = sum(tasks[k].work for k in keys if k not in sel.done)
        if part.name in sel.excluded:
            state = f"left out: {sel.excluded[part.name]}"
            print(f"{i:>2}  {part.name:<14} {part.what[:66]:<66} {flop / 1e15:7.1f} {'—':>6}  {state}")
            continue
        if all(k in sel.done for k in keys):
            print(f"{i:>2}  {part.name:<14} {part.what[:66]:<66} {'':>7} {'done':>6}")
            continue
        share = sum(tl.share.get(k, 0.0) for k in keys) / 60
        ends = [tl.end[k] / 60 for k in keys if k in tl.end]
        end = max(ends) if ends else math.nan
        wall = ready_offset + end + math.floor(end / useful) * c.command_min if ends else math.nan
        print(f"{i:>2}  {part.name:<14} {part.what[:66]:<66} {flop / 1e15:7.1f} {share:6.1f} {wall:8.1f}m")
    print("-" * len(head))
    if c.start_min:
        print(f"    {'machine start':<81} {c.start_min:6.1f}")
    limit = f"of at most {max_minutes:g} min" if max_minutes > 0 else "without a time limit"
    print(f"    {f'{c.commands} command(s) {limit}: start-up and outputs, {c.command_min:.2f} min each':<81} "
          f"{c.commands * c.command_min:6.1f}")
    if c.boundary_min:
        print(f"    {'work lost when a command stops trainings mid-epoch (resume from the epoch)':<81} {c.boundary_min:6.1f}")
    print(f"    {'total':<81} {c.total:6.1f}   (budget " + (f"{budget:g} min" if budget > 0 else "unlimited")
          + (f", {spent:.1f} spent" if spent else "") + ")")
    if tl.blocked:
        print(f"    cannot run: {', '.join(tl.blocked)}")


# ------------------------------------------------------------------------------------------------
# Outputs
# ------------------------------------------------------------------------------------------------
class Tee:
    """stdout to the terminal and to a log file."""

    def __init__(self, stream: Any, log: Any):
        self.stream, self.log = stream, log

    def write(self, text: str) -> int:
        self.stream.write(text)
        self.log.write(text)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()
        self.log.flush()


@contextlib.contextmanager
def logged(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as log:
        old = sys.stdout
        sys.stdout = Tee(old, log)
        try:
            yield
        finally:
            sys.stdout = old


def gpu_description() -> dict[str, Any]:
    """The GPU (name, memory, CUDA and cuDNN versions, driver) when there is one."""
    if not torch.cuda.is_available():
        return {}
    props = torch.cuda.get_device_properties(0)
    out: dict[str, Any] = {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                           "multiprocessors": props.multi_processor_count, "cuda": torch.version.cuda,
                           "cudnn": torch.backends.cudnn.version()}
    with contextlib.suppress(Exception):
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        out["driver"] = smi.stdout.strip()
    return out


def results_setting(setting: Setting) -> Setting:
    """The setting that reads the metrics-only copies in the results folder."""
    return dataclasses.replace(setting, runs_dir=setting.out / "runs", out=setting.out)


def draw(setting: Setting, done: set[str]) -> dict[str, str]:
    """Every figure and table whose inputs are in the results; ``{output: error}`` for failures."""
    import fig1_perturbations  # the drawing code: imported by the plan, not by every child
    import fig2_strength
    import table_methods
    from lib.outputs import add_caption, setting_caption, write_figure, write_text
    from lib.results import benchmarks_markdown, precision_markdown

    from robustdrop.plots import curves_figure
    from robustdrop.plots.runs import open_run, train_seconds_per_epoch

    r = results_setting(setting)
    runs = r.runs_dir
    errors: dict[str, str] = {}

    def attempt(name: str, fn: Any) -> None:
        try:
            fn()
        except Exception as exc:  # one broken figure must not lose the others
            traceback.print_exc()
            errors[name] = f"{type(exc).__name__}: {exc}"

    ref = ref_name(setting)
    measured = [n for n in ("fgsm", "fgsm+", "apart") if f"measure:{n}" in done and (runs / n).is_dir()]
    if f"train:{ref}" in done and measured:
        attempt("fig2_strength", lambda: fig2_strength.write_outputs(r, measured))
    if "train:fgsm" in done and (runs / "fgsm" / "arrays" / "snapshots").is_dir():
        attempt("fig1_perturbations", lambda: fig1_perturbations.write_outputs(r))
    curves = [runs / n for n in run_names(setting, CURVES) if (runs / n / "metrics.parquet").is_file()]
    if curves:
        def curves_out() -> None:
            fig = curves_figure(curves)
            partial = [f"{p.name} at epoch {epochs_of(p)}" for p in curves if f"train:{p.name}" not in done]
            add_caption(fig, setting_caption(r) + (f"\nnot finished yet: {', '.join(partial)}" if partial else ""))
            write_figure(fig, r.out, "curves")
        attempt("curves", curves_out)
    evaluated = [n for n in ("fgsm", ref, "fgsm+", "apart", "apart-authors") if f"eval:{n}" in done and (runs / n).is_dir()]
    if evaluated:
        attempt("table_methods", lambda: table_methods.write(
            r, evaluated, "table_methods", "Methods: final and best clean / PGD / CW-loss PGD test accuracy"))
    bench = r.out / BENCH_FILE
    if bench.is_file():
        seconds = {n: train_seconds_per_epoch(open_run(runs / n).metrics) for n in run_names(setting)
                   if (runs / n / "metrics.parquet").is_file()}
        attempt("benchmarks", lambda: write_text(r.out / "benchmarks.md",
                                                 benchmarks_markdown(json.loads(bench.read_text()), seconds)))
    precision = r.out / "bf16_vs_fp32.json"
    if precision.is_file():
        attempt("bf16_vs_fp32", lambda: write_text(r.out / "bf16_vs_fp32.md",
                                                   precision_markdown(json.loads(precision.read_text()))))
    return errors


def epochs_of(path: Path) -> int:
    from robustdrop.plots.runs import open_run

    df = open_run(path).metrics
    rows = df[(df["source"] == "train") & (df["metric"] == "loss")]
    return int(rows["epoch"].max()) if len(rows) else 0


def numbers(setting: Setting, done: set[str], status_line: str) -> dict[str, Any]:
    """The README's numbers, from the results (None where not measured yet)."""
    import fig2_strength

    r = results_setting(setting)
    out: dict[str, Any] = {"status": status_line}
    with contextlib.suppress(Exception):
        if "train:fgsm" in done:
            s = fig2_strength.summarize(r.runs_dir / "fgsm")
            out.update(fgsm_peak_pgd=s["peak_pgd"], fgsm_peak_epoch=s["peak_epoch"], fgsm_final_pgd=s["final_pgd"],
                       fgsm_onset=s["onset"] if s["onset"] is not None else "none detected")
            if "measure:fgsm" in done:
                out.update(ref_fgsm_before=s["ref_fgsm_best"], ref_fgsm_after=s["ref_fgsm_last"],
                           ref_noise=s["ref_noise_mean"])
    for name in ("fgsm+", "apart"):
        with contextlib.suppress(Exception):
            if f"train:{name}" in done:
                out[f"{name}_final_pgd"] = fig2_strength.summarize(r.runs_dir / name)["final_pgd"]
    for name, key in (("apart", "apart_test_pgd"), (ref_name(setting), "pgd10_test_pgd")):
        with contextlib.suppress(Exception):
            if f"eval:{name}" in done:
                out[key] = evaluate_run(r, name)["final"]["pgd"]
    with contextlib.suppress(Exception):
        out["apart_over_pgd10"] = json.loads((r.out / BENCH_FILE).read_text())["bench_apart"]["apart_over_pgd10"]
    return out


README_TEMPLATE = """# Figures and tables at the paper's scale (one GPU)

Written by `python analyses/gpu_plan.py` ([docs/gpu-plan.md](../../docs/gpu-plan.md)): PreActResNet18 at
ε = 8/255 (the `paper` preset), on the embedded CIFAR-10 JPEG copy unless `gpu_plan.json` says
otherwise (`--dataset cifar10` for the real one). Nothing here was written by hand; the section
below is rewritten by every command of the plan.

| file | what |
|---|---|
| `fig2_strength*.{png,pdf,md}` | Figure 2: PGD-20 per epoch and the PGD-10 referee on each epoch's FGSM δ vs noise |
| `fig1_perturbations.{png,pdf,md}` | Figure 1: FGSM δ of fixed images before and after the collapse |
| `curves.{png,pdf}` | clean / FGSM / PGD-20 accuracy per epoch of every run |
| `table_methods.{md,csv,tex}` | final and best test accuracy (clean, PGD-20, CW-20) |
| `benchmarks.{json,md}` | engine/bare, APART/PGD-10 cost, FE and FLOP rates on the GPU |
| `bf16_vs_fp32.{json,md}` | the same checkpoints evaluated in bf16 and fp32; training in each |
| `gpu_plan.json` | hardware, versions, wall time of every command, parts done, estimates, measured rate |
| `runs/<run>/` | every run's config, manifest, metrics (CSV + Parquet), events, cached evaluation (no checkpoints) |
"""


def finish(setting: Setting, args: Any, state: dict[str, Any], sel: Selection | None, parts: Sequence[Any],
           tasks: dict[str, Any], a: Assumptions, invocation: dict[str, Any]) -> list[Path]:
    """Export, draw, write the record and the README section, pack the bundle."""
    from lib.results import copy_record, export_runs, pack, readme_section, write_readme, write_record

    from robustdrop.plots.runs import open_run, train_seconds_per_epoch

    results = setting.out
    done = {k for k, t in tasks.items() if is_done(setting, t)}
    exported = export_runs(setting.runs_dir, results, run_names(setting))
    copy_record(setting.runs_dir, results, BENCH_FILE)
    if (setting.runs_dir / PRECISION_FILE).is_file():
        results.mkdir(parents=True, exist_ok=True)
        (results / "bf16_vs_fp32.json").write_bytes((setting.runs_dir / PRECISION_FILE).read_bytes())
    errors = draw(setting, done)
    chosen = [p.name for p in sel.parts] if sel else []
    part_rows = []
    for p in parts:
        keys = list(p.tasks)
        n_done = sum(k in done for k in keys)
        state_text = ("done" if n_done == len(keys) else "left out: " + sel.excluded[p.name]
                      if sel and p.name in sel.excluded else f"{n_done}/{len(keys)} tasks done")
        part_rows.append({"part": p.name, "what": p.what, "status": state_text,
                          "tasks": {k: k in done for k in keys},
                          "estimated_min": round(sum(sel.timeline.share.get(k, 0.0) for k in keys) / 60, 2)
                          if sel else None})
    runs = {}
    for name in exported:
        df = open_run(results / "runs" / name).metrics
        runs[name] = {"epochs_done": epochs_of(results / "runs" / name),
                      "train_s_per_epoch": train_seconds_per_epoch(df), "complete": f"train:{name}" in done}
    left = [p["part"] for p in part_rows if p["part"] in chosen and p["status"] != "done"]
    status_line = (f"{sum(p['status'] == 'done' for p in part_rows)} of {len(part_rows)} parts done"
                   + (f"; to do: {', '.join(left)}" if left else "") + f". Last command: {invocation['started_utc']}, "
                   f"{invocation['wall_s'] / 60:.1f} min ({invocation['reason']}), on {a.device}.")
    write_readme(results, readme_section(numbers(setting, done, status_line)), README_TEMPLATE)
    record = {
        "format": "robustdrop-gpu-plan-record-1", "command": " ".join(sys.argv), "status": status_line,
        "setting": {k: str(v) for k, v in dataclasses.asdict(setting).items()},
        "budget_minutes": args.budget_minutes, "max_minutes": args.max_minutes, "jobs": setting.jobs,
        "ref_epochs": setting.ref_epochs,
        "assumptions": estimate.as_dict(a), "measured": state.get("measured"),
        "environment": {**environment(), "gpu": gpu_description()},
        "parts": part_rows, "tasks_done": sorted(done), "runs": runs, "runs_complete": sorted(
            n for n in exported if f"train:{n}" in done),
        "lease_started_utc": state["lease_started_utc"], "invocations": state["invocations"],
        "spent_minutes_this_machine": round(spent_minutes(state, a), 2), "restored": state.get("restored", []),
        "draw_errors": errors, "graceful_stop_seen": state.get("graceful_stop_seen", False),
    }
    write_record(results, record)
    out = []
    if args.bundle is not None:
        log = setting.runs_dir / "logs" / "gpu_plan.log"
        out = pack(results, args.bundle, [results / RECORD_FILE, log])
        print(f"bundle: {', '.join(str(p) for p in out)}", flush=True)
    return out


def measured_rate(outcome: Any, tasks: dict[str, Any], a: Assumptions) -> dict[str, Any] | None:
    """One training process's rate from what this command did: FLOPs done / busy wall seconds,
    divided by the sharing gain at the mean number of processes."""
    flop = sum(tasks[k].work / tasks[k].epochs * n for k, n in outcome.epochs.items() if tasks[k].epochs)
    flop += sum(tasks[k].work for k in outcome.finished if tasks[k].kind != "train")
    if outcome.busy_s < 30 or flop <= 0:
        return None
    k = outcome.process_s / outcome.busy_s
    lo = max(1, min(int(k), len(a.share_gain)))
    hi = min(lo + 1, len(a.share_gain))
    gain = a.share_gain[lo - 1] + (a.share_gain[hi - 1] - a.share_gain[lo - 1]) * max(0.0, min(k - lo, 1.0))
    rate = flop / outcome.busy_s / gain / 1e12
    return {"one_process_tflops": round(rate, 3), "device": a.device,
            "basis": f"{flop / 1e15:.1f} PFLOP in {outcome.busy_s:.0f} s busy, {k:.2f} processes on average"}


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------
REF_VARIANTS = (0, 15, 8)  # referee epochs to try, longest first (0: the preset's 30)


def decide(setting: Setting, args: Any, a: Assumptions, *, state: dict[str, Any] | None,
           record: dict[str, Any] | None, fresh: bool, spent: float) -> tuple[list, dict, set, dict, Selection]:
    """Build the plan and choose what fits the budget. The referee's length is chosen once and
    kept: the preset's 30 epochs when the referee fits, else the longest of 15 or 8 that does
    (a cyclic PGD-10 schedule of its own length); ``--ref-epochs`` fixes it."""
    fixed = args.ref_epochs if args.ref_epochs is not None else (state or {}).get("ref_epochs")
    if fixed is None and fresh and record:
        fixed = record.get("ref_epochs")
    variants = (fixed,) if fixed is not None else (0,) if setting.smoke else REF_VARIANTS
    reserve = RESERVE_MIN["smoke" if setting.smoke else "paper"]
    graceful = bool((state or record or {}).get("graceful_stop_seen"))
    result = None
    for v in variants:
        setting.ref_epochs = int(v)
        parts, tasks = build(setting, a)
        done, left = status(setting, tasks)
        restored = restored_runs(setting, [t.run for t in tasks.values() if t.run])
        if fresh and record and args.dry_run:  # what came back counts as done (a real run restores it first)
            done |= set(record.get("tasks_done", [])) & set(tasks)
            restored = [n for n in record.get("runs_complete", []) if f"train:{n}" in done]
            left = {k: w for k, w in left.items() if k not in done}
        budget = args.budget_minutes - spent if args.budget_minutes > 0 else math.inf
        sel = choose(parts, tasks, done, left, jobs=setting.jobs, a=a, budget_min=budget,
                     fresh=fresh, max_minutes=args.max_minutes, reserve_min=reserve, graceful=graceful,
                     only=args.only, skip=args.skip, restored=restored, ref=ref_name(setting))
        result = result or (v, parts, tasks, done, left, sel)
        if "referee" in {p.name for p in sel.parts} or sel.excluded.get("referee", "").startswith("not asked"):
            return parts, tasks, done, left, sel
    v, parts, tasks, done, left, sel = result  # no length fits: the first, without the referee
    setting.ref_epochs = int(v)
    return parts, tasks, done, left, sel


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    setting = plan_setting(args)
    if args.child:
        return run_child(setting, args.child.split(","))
    started, started_utc = time.monotonic(), now_utc()
    record_file = setting.out / RECORD_FILE
    record = json.loads(record_file.read_text()) if record_file.is_file() else None
    state = load_state(setting)
    fresh = state is None
    a = assumptions(setting, args, state, record)
    reserve = RESERVE_MIN["smoke" if setting.smoke else "paper"]
    show = dict(budget=args.budget_minutes, max_minutes=args.max_minutes, reserve=reserve, setting=setting,
                jobs=setting.jobs)

    if args.dry_run:  # creates nothing
        spent = spent_minutes(state, a)
        parts, tasks, done, left, sel = decide(setting, args, a, state=state, record=record, fresh=fresh, spent=spent)
        print_plan(sel, parts, tasks, a, spent=spent, **show)
        return 0

    setting.runs_dir.mkdir(parents=True, exist_ok=True)
    with logged(setting.runs_dir / "logs" / "gpu_plan.log"):
        if not setting.smoke:  # decode the dataset's cache once, not in every child at the same time
            load_data(setting, {"dataset": setting.dataset, "data_dir": setting.data_dir})
        if fresh:
            state = new_state(setting)
            if record and record.get("ref_epochs") is not None and args.ref_epochs is None:
                state["ref_epochs"] = setting.ref_epochs = int(record["ref_epochs"])
            state["restored"] = restore(setting, setting.out)
            if state["restored"]:
                print(f"restored from {setting.out}: {', '.join(state['restored'])}")
        spent = spent_minutes(state, a)
        parts, tasks, done, left, sel = decide(setting, args, a, state=state, record=record, fresh=fresh, spent=spent)
        state["ref_epochs"] = setting.ref_epochs
        print_plan(sel, parts, tasks, a, spent=spent, **show)
        deadline = started + (args.max_minutes - reserve) * 60 if args.max_minutes > 0 else math.inf
        sup = Supervisor(sel.order, sel.done, jobs=setting.jobs, deadline=deadline,
                         command=child_command(setting, args), log_dir=setting.runs_dir / "logs", a=a,
                         is_done=lambda t: is_done(setting, t), left=left, stop_after_epochs=args.stop_after_epochs,
                         poll=0.05 if setting.smoke else 1.0, grace=20.0 if setting.smoke else 60.0,
                         report_every=3600.0 if setting.smoke else 60.0, env=child_env(setting.threads))
        outcome = sup.run()
        invocation = {"started_utc": started_utc, "wall_s": round(time.monotonic() - started, 1),
                      "reason": outcome.reason, "finished": outcome.finished, "failed": outcome.failed,
                      "stopped": outcome.stopped, "epochs": outcome.epochs, "busy_s": round(outcome.busy_s, 1),
                      "mean_processes": round(outcome.process_s / outcome.busy_s, 2) if outcome.busy_s else 0.0}
        rate = measured_rate(outcome, tasks, a)
        if rate and not setting.smoke:
            state["measured"] = rate
            invocation["measured"] = rate
        if any(v.startswith("graceful") for v in outcome.stopped.values()):
            state["graceful_stop_seen"] = True
        state["invocations"].append(invocation)
        save_state(setting, state)
        print(f"command: {outcome.reason}; finished {', '.join(outcome.finished) or 'nothing'}"
              + (f"; stopped {', '.join(f'{k} ({v})' for k, v in outcome.stopped.items())}" if outcome.stopped else "")
              + (f"; FAILED {', '.join(outcome.failed)}" if outcome.failed else ""), flush=True)
        finish(setting, args, state, sel, parts, tasks, a, invocation)
        invocation["wall_s"] = round(time.monotonic() - started, 1)
        save_state(setting, state)
        remaining = [t.key for t in sel.order if not is_done(setting, t)]
        print("plan: " + ("all chosen parts done" if not remaining else
                          f"{len(remaining)} task(s) left; run the same command again") + f" ({invocation['wall_s']:.0f} s)")
    if args.bundle is not None:  # the log is complete only now
        log = setting.runs_dir / "logs" / "gpu_plan.log"
        if log.is_file():
            (args.bundle / log.name).write_bytes(log.read_bytes())
    return 1 if outcome.failed else 0


if __name__ == "__main__":
    sys.exit(main())
