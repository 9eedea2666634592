"""Every figure and table of the paper that robustdrop regenerates, in one command.

Phase 1 trains (or reuses) every run the scripts need and evaluates the tables' checkpoints,
``--jobs`` processes at a time (default 2), each run after the reference it depends on.
Phase 2 runs each script with the same arguments; they find their runs finished and only draw,
except ``table_cost.py``, which trains its short timing runs one at a time (nothing else of ours
runs then). Writes everything into ``--out`` and a record of the wall times into
``<out>/run_all.json``.

    python analyses/run_all.py [--scale quick|paper] [--smoke] [--runs-dir DIR] [--out DIR] [--jobs N]
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from collections.abc import Sequence
from datetime import datetime, timezone

import fig1_perturbations
import fig2_strength
import fig_long_run
import table_ablation
import table_cost
import table_methods
from lib.catalog import (
    catalog,
    cost_run_names,
    long_run_names,
    ref_name,
    reference_deferred,
    reference_run,
    run_dir,
)
from lib.outputs import write_text
from lib.setting import Setting, build_parser, setting_from_args
from lib.tasks import eval_tasks, execute, train_tasks

from robustdrop.environment import environment
from robustdrop.plots.runs import open_run, run_seconds

SCRIPTS = [fig2_strength, fig1_perturbations, fig_long_run, table_methods, table_ablation, table_cost]
TABLES = [table_methods, table_ablation]


def forwarded(args, setting: Setting) -> list[str]:
    """The scripts' arguments: the same, with the (possibly temporary) folders made explicit."""
    argv = ["--scale", setting.scale, "--runs-dir", str(setting.runs_dir), "--out", str(setting.out),
            "--threads", str(setting.threads), "--jobs", str(setting.jobs), "--device", setting.device,
            "--seed", str(setting.seed), "--eval-n", str(setting.eval_n), "--aa-n", str(setting.aa_n)]
    if setting.smoke:
        argv.append("--smoke")
    if not setting.autoattack:
        argv.append("--no-autoattack")
    if setting.data_dir:
        argv += ["--data-dir", setting.data_dir]
    if setting.dataset:
        argv += ["--dataset", setting.dataset]
    return argv


def training_order(setting: Setting) -> list[str]:
    """Every run of phase 1 in the order the scheduler starts them: the reference first (Figure 2's
    runs wait for it), the runs that do not need it next (they fill the other process meanwhile),
    then Figure 2's runs, slowest first."""
    names: list[str] = []
    for script in SCRIPTS:
        if script is table_cost:
            continue
        for n in script.needed(setting):
            if n not in names:
                names.append(n)
    cat = catalog(setting)
    # Figure 2's runs wait for a reference run only where it is attached during training (forced;
    # the rule measures a catalog referee after training, lib.catalog.reference_deferred)
    waits = reference_run(setting) is not None and not reference_deferred(setting)
    independent = [n for n in names if not (cat[n].uses_reference and waits) and n != ref_name(setting)]
    first = [ref_name(setting), "gradalign", *long_run_names(setting), "apart-no-init", "apart-no-step", "n-fgsm",
             "rs-fgsm"]
    order: list[str] = []
    for n in [*first, *independent, "fgsm+", "apart", "fgsm", *names]:
        if n in names and n not in order:
            order.append(n)
    return order


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser(__doc__, jobs=2).parse_args(argv)
    setting = setting_from_args(args)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    t0 = time.perf_counter()
    print(f"run_all: scale {setting.tag}, runs in {setting.runs_dir}, figures in {setting.out}, "
          f"{setting.jobs} job(s), {setting.threads or 'default'} thread(s) each", flush=True)

    evals: list[str] = []
    for script in TABLES:
        evals += [n for n in script.needed(setting) if n not in evals]
    tasks = train_tasks(setting, training_order(setting)) + eval_tasks(setting, evals)
    task_times = execute(setting, tasks)
    phase1 = time.perf_counter() - t0
    print(f"run_all: phase 1 (trainings and evaluations) took {phase1:.0f}s", flush=True)

    script_times: dict[str, float] = {}
    failed: list[str] = []
    for script in SCRIPTS:
        name = script.__name__
        start = time.perf_counter()
        print(f"run_all: {name}", flush=True)
        try:
            script.main(forwarded(args, setting))
        except Exception:  # keep going: report every failing script at the end
            traceback.print_exc()
            failed.append(name)
        script_times[name] = time.perf_counter() - start
    total = time.perf_counter() - t0

    compute_s = {}
    for n in training_order(setting) + cost_run_names():
        path = run_dir(setting, n)
        if (path / "metrics.parquet").is_file():
            compute_s[n] = round(run_seconds(open_run(path).metrics), 1)
    record = {
        "command": "python analyses/run_all.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "scale": setting.tag, "started_utc": started, "wall_s": round(total, 1), "phase1_wall_s": round(phase1, 1),
        "jobs": setting.jobs, "threads": setting.threads, "seed": setting.seed, "eval_n": setting.eval_n,
        "aa_n": setting.aa_n if setting.autoattack else None,
        "environment": environment(),
        "task_wall_s": {k: round(v, 1) for k, v in task_times.items()},
        "script_wall_s": {k: round(v, 1) for k, v in script_times.items()},
        "run_compute_s": compute_s,
        "failed": failed,
    }
    write_text(setting.out / "run_all.json", json.dumps(record, indent=2) + "\n")
    print(f"run_all: done in {total:.0f}s ({total / 60:.1f} min)" + (f"; FAILED: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
