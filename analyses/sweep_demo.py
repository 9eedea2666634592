"""The sweep demonstration: how the collapse depends on the seed and on ε, as one `robustdrop sweep`.

The study is data: ``analyses/studies/sweep_demo.toml`` (FGSM at ε ∈ {8, 10, 12}/255 × 5 seeds,
15 cells). At quick scale: the quick preset, the local backend with ``--jobs`` cells at once
(default 2), one thread each; the same as

    robustdrop sweep --file analyses/studies/sweep_demo.toml --preset quick --threads 1 --device auto \\
        --jobs 2 --name sweep-demo-quick --runs-dir runs/analyses/quick

(the figure's caption and the table say the command). ``--scale paper``: the paper preset, same grid.
``--smoke``: 2 seeds × ε ∈ {8, 12}/255, 2 epochs on tiny synthetic images written as an image
folder (cells run in their own processes, so the data must be loadable by name).

Writes ``<out>/sweep_demo.{png,pdf}`` (``robustdrop plot onset``: onset epochs per ε and probe PGD
accuracy, mean ± 1 s.e. over seeds), ``sweep_demo.{md,csv,tex}`` (``robustdrop compare``: per ε
over the seeds), and in ``sweep_demo.md`` also the wall time of the sweep and of every cell, with
the part of it that was not training or evaluation (process start, data loading, checkpoints).
A rerun resumes or reuses the sweep (``runs/analyses/<scale>/sweep-demo-<scale>``).

    python analyses/sweep_demo.py [--scale quick|paper] [--smoke] [--runs-dir DIR] [--out DIR] [--jobs N] [--threads N]
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from lib.catalog import cell_environment, write_smoke_data
from lib.outputs import add_caption, setting_caption, write_figure, write_table
from lib.setting import REPO, SMOKE_CONFIG, Setting, parse_setting, run_script

from robustdrop.formatting import eps_in_255ths
from robustdrop.plots.runs import open_run, run_seconds
from robustdrop.plots.sweeps import compare_sweep, onset_figure, sweep_table_cells
from robustdrop.store import SweepRecord
from robustdrop.sweeps import SweepResult, parse_grid, plan_sweep, read_toml, run_sweep

STUDY = Path(__file__).resolve().parent / "studies" / "sweep_demo.toml"
SMOKE_SEEDS, SMOKE_EPSILONS = "0:2", "8/255,12/255"


def study() -> dict:
    return read_toml(STUDY)


def sweep_words(setting: Setting) -> list[str]:
    """The smoke test's grid words (the study's own grid is in its file)."""
    return [f"seed={SMOKE_SEEDS}", f"epsilon={SMOKE_EPSILONS}"]


def fixed_values(setting: Setting) -> dict:
    """What every cell shares beyond the preset: the study's fixed values, threads, device; the smoke data and sizes."""
    fixed = {"threads": setting.threads, "device": setting.device, **study()["fixed"]}
    if setting.data_dir:
        fixed["data_dir"] = setting.data_dir
    if setting.scale == "paper" and not setting.smoke:
        fixed["dataset"] = "cifar10"
    if setting.smoke:
        fixed.update({k: v for k, v in SMOKE_CONFIG[setting.scale].items() if k != "dataset"},
                     dataset=f"folder:{write_smoke_data(setting)}")
    return fixed


def command(setting: Setting) -> list[str]:
    """The `robustdrop sweep` command line this script runs."""
    what = ["--grid", *sweep_words(setting)] if setting.smoke else ["--file", str(STUDY.relative_to(REPO))]
    words = ["robustdrop", "sweep", "--preset", setting.scale, *what]
    for key, value in fixed_values(setting).items():
        if not setting.smoke and key in study()["fixed"]:
            continue  # in the file
        words += [f"--{key.replace('_', '-')}", *(map(str, value) if isinstance(value, list) else [str(value)])]
    if setting.backend != "local":
        words += ["--backend", setting.backend]
    if setting.max_minutes:
        words += ["--max-minutes", f"{setting.max_minutes:g}"]
    return words + ["--jobs", str(setting.jobs), "--name", sweep_name(setting), "--runs-dir", str(setting.runs_dir)]


def sweep_name(setting: Setting) -> str:
    return f"sweep-demo-{'smoke' if setting.smoke else setting.scale}"


def run(setting: Setting) -> SweepResult:
    grid = parse_grid(sweep_words(setting)) if setting.smoke else study()["grid"]
    plan = plan_sweep(grid, preset=setting.scale, fixed=fixed_values(setting), name=sweep_name(setting))
    with cell_environment(setting):
        return run_sweep(plan, runs_dir=setting.runs_dir, backend=setting.backend, jobs=setting.jobs,
                         progress=False, command=command(setting), max_minutes=setting.max_minutes)


def cell_times(record: SweepRecord) -> pd.DataFrame:
    """Per cell: wall seconds of its process (last attempt), its logged compute seconds (train + eval
    + diagnostics of every epoch) and the rest (process start, data loading, checkpoints, ...)."""
    rows = []
    for cell, entry in record.cells.items():
        wall = entry.get("wall_s")
        compute = run_seconds(open_run(record.run_dir(cell)).metrics) if entry.get("status") == "finished" else None
        rows.append({"cell": cell, "status": entry.get("status"), "wall_s": wall, "compute_s": compute,
                     "other_s": None if wall is None or compute is None else wall - compute})
    return pd.DataFrame(rows)


def sweep_caption(setting: Setting, cells: int) -> str:
    """The figure's caption: the preset's setting, with ε and the seed replaced by the grid's."""
    grid = study()["grid"]
    seeds, eps = (SMOKE_SEEDS, SMOKE_EPSILONS) if setting.smoke else (_range(grid["seed"]), ",".join(
        f"{eps_in_255ths(e)}/255" for e in grid["epsilon"]))
    return (f"{setting_caption(setting)}\nFGSM, {cells} cells: seed={seeds} × epsilon={eps} (in place of the "
            "preset's ε and seed above), local backend; the command: sweep_demo.md")


def _range(values: list[int]) -> str:
    """``[0, 1, 2, 3, 4]`` -> ``0:5`` (as the grid word writes it)."""
    return f"{values[0]}:{values[-1] + 1}" if values == list(range(values[0], values[-1] + 1)) else ",".join(map(str, values))


def main(argv: Sequence[str] | None = None) -> int:
    setting = parse_setting(__doc__, argv, jobs=2, sweep=True)
    result = run(setting)
    record = result.record
    cmd = " ".join(command(setting))
    caption = sweep_caption(setting, len(record.cells))

    fig = onset_figure(result.path)
    add_caption(fig, caption)
    write_figure(fig, setting.out, "sweep_demo")

    table = compare_sweep(result.path)
    headers, cells = sweep_table_cells(table)
    times = cell_times(record)
    finished = times.dropna(subset=["wall_s"])
    notes = [f"{n}." for n in table.attrs["notes"]] + [f"Made by: `{cmd}`."]
    if len(finished):
        notes.append(
            f"Wall time of this invocation: {result.wall_s:.0f} s for {len(result.ran)} cell(s) run with {setting.jobs} "
            f"job(s); per cell (last attempt) {finished.wall_s.min():.0f}–{finished.wall_s.max():.0f} s, of which "
            f"{finished.other_s.mean():.1f} s on average was not training or evaluation (process start, data, "
            "checkpoints).")
    write_table(pd.DataFrame(cells, columns=headers), table, setting.out, "sweep_demo",
                "Sweep demonstration: FGSM collapse over seeds and ε", notes)
    lines = ["", "## Cells", "", "| cell | status | wall s | compute s | other s |", "|---|---|---|---|---|"]
    lines += [f"| {r.cell} | {r.status} | {_num(r.wall_s)} | {_num(r.compute_s)} | {_num(r.other_s)} |"
              for r in times.itertuples()]
    md = setting.out / "sweep_demo.md"
    md.write_text(md.read_text() + "\n".join(lines) + "\n")
    return 1 if result.failed else 0


def _num(x) -> str:
    return "" if x is None or x != x else f"{x:.1f}"


if __name__ == "__main__":
    sys.exit(run_script(main))
