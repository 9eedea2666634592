"""Every figure and table of the paper that robustdrop regenerates, in one command.

Phase 1 is one sweep (:func:`lib.catalog.run_cells`): every catalog cell the scripts need —
trainings, and the replay cells that measure Figure 2's runs on a catalog referee after training —
in the order below (most valuable first), ``--jobs`` processes at a time (default 2) or on a Ray
cluster (``--backend ray``), each after the cells it needs. With ``--max-minutes`` the cells
still running at the deadline checkpoint and stop, nothing is drawn, and the same command
continues them. Phase 2 runs each script with the same arguments; they find their runs finished
and only draw (the tables evaluate the final and best checkpoints, cached in each run), except
``table_cost.py``, which trains its short timing runs one at a time (nothing else of ours runs
then). Writes everything into ``--out`` and a record of the wall times into ``<out>/run_all.json``.

    python analyses/run_all.py [--scale quick|paper] [--smoke] [--runs-dir DIR] [--out DIR] [--jobs N]
                               [--backend local|ray] [--max-minutes M]
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
from lib.catalog import catalog, cost_run_names, long_run_names, ref_name, run_cells, run_dir
from lib.outputs import write_text
from lib.setting import Setting, build_parser, run_script, setting_from_args

from robustdrop.environment import environment
from robustdrop.plots.runs import open_run, run_seconds

SCRIPTS = [fig2_strength, fig1_perturbations, fig_long_run, table_methods, table_ablation, table_cost]


def forwarded(args, setting: Setting) -> list[str]:
    """The scripts' arguments: the same, with the (possibly temporary) folders made explicit (not the
    backend: phase 1 finished their cells, and the timing runs are always local)."""
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
    """Every cell of phase 1 in the order the sweep starts them: the reference first, the runs
    that do not need it next (they fill the other processes meanwhile), then Figure 2's runs,
    slowest first (each after the reference where it is attached; their replay cells after both)."""
    names: list[str] = []
    for script in SCRIPTS:
        if script is not table_cost:
            names += [n for n in script.needed(setting) if n not in names]
    first = [ref_name(setting), "gradalign", *long_run_names(setting),
             "apart-no-init", "apart-no-step", "n-fgsm", "rs-fgsm"]
    cat = catalog(setting)
    independent = [n for n in names if n in cat and not cat[n].uses_reference]
    return list(dict.fromkeys(n for n in [*first, *independent, "fgsm+", "apart", "fgsm", *names] if n in names))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser(__doc__, jobs=2, sweep=True).parse_args(argv)
    setting = setting_from_args(args)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    t0 = time.perf_counter()
    print(f"run_all: scale {setting.tag}, runs in {setting.runs_dir}, figures in {setting.out}, "
          f"{setting.backend} backend, {setting.jobs} job(s), {setting.threads or 'default'} thread(s) each", flush=True)

    order = training_order(setting)
    result = run_cells(setting, order)
    phase1 = time.perf_counter() - t0
    print(f"run_all: phase 1 (the sweep of {len(order)} cells) took {phase1:.0f}s", flush=True)
    unfinished = [n for n in order if result.record.status(n) != "finished"]
    if unfinished:
        print(f"run_all: not drawing, cells not finished: {', '.join(unfinished)}; rerun the same command to "
              "continue them", flush=True)
        return 1 if result.failed else 143

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

    cells = result.record.cells
    compute_s = {n: round(run_seconds(open_run(run_dir(setting, n)).metrics), 1)
                 for n in order + cost_run_names() if (run_dir(setting, n) / "metrics.parquet").is_file()}
    record = {
        "command": "python analyses/run_all.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "scale": setting.tag, "started_utc": started, "wall_s": round(total, 1), "phase1_wall_s": round(phase1, 1),
        "backend": setting.backend, "jobs": setting.jobs, "threads": setting.threads, "seed": setting.seed,
        "eval_n": setting.eval_n, "aa_n": setting.aa_n if setting.autoattack else None,
        "environment": environment(),
        "cell_wall_s": {n: round(cells[n]["wall_s"], 1) for n in order if cells[n].get("wall_s") is not None},
        "script_wall_s": {k: round(v, 1) for k, v in script_times.items()},
        "run_compute_s": compute_s,
        "failed": failed,
    }
    write_text(setting.out / "run_all.json", json.dumps(record, indent=2) + "\n")
    print(f"run_all: done in {total:.0f}s ({total / 60:.1f} min)" + (f"; FAILED: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run_script(main))
