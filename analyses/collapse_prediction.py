"""The collapse-prediction study (issue 12): how early, how reliably and at what false-alarm rate
the strength signals and the detector's early rule announce the robustness drop, and what APART's
"no collapse" is made of (matched-strength FGSM controls).

Reads run directories (sweep directories, or runs; every run's ``config.json`` says its method,
ε, step and seed): FGSM runs over seeds × ε (most collapse) and the controls (PGD-3, RS-FGSM,
APART, FGSM+, FGSM with APART's step). Runs are classified by their outcome, not their method.
The detector is replayed offline on each run's metrics (``robustdrop.diagnostics.detect_collapse``);
the analysis trains nothing. Definitions: ``lib/prediction.py`` and docs/collapse-prediction.md.

The study that makes the runs is data: sweep files (``analyses/studies/collapse_prediction*.toml``,
each run by ``robustdrop sweep --file``, locally or ``--backend ray``) and stage 2's file, computed
from stage 1's APART runs (``--matched-from`` writes it). ``--plan`` prints the commands.

Writes ``<out>/collapse_prediction.{png,pdf,md}`` (the figure; the numbers, definitions, commands
and wall time), ``table_collapse_prediction.{md,csv,tex}`` (per signal: hits, lead, false alarms)
and ``table_matched_strength.{md,csv,tex}``.

    python analyses/collapse_prediction.py --plan                        # the study: sweep commands, cells, CPU time
    python analyses/collapse_prediction.py --matched-from DIR [DIR ...]  # stage 2's sweep file from the APART runs
    python analyses/collapse_prediction.py [--runs DIR ...] [--out DIR]  # the analysis (default runs: see --runs)
    python analyses/collapse_prediction.py --smoke                       # a minute: tiny cells of every file, as sweeps
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from lib.catalog import cell_environment, data_for, make_run_config, write_smoke_data
from lib.early_rule import CANDIDATES, apriori_score, choose, pool, score, warning_epoch, wins
from lib.frontier import DataCache, is_finished
from lib.outputs import add_caption, dataset_text, frame_markdown, model_text, write_figure, write_table, write_text
from lib.prediction import (
    APRIORI,
    FLOOR,
    ROW_TEXT,
    ROWS,
    VERY_EARLY,
    RunSummary,
    by_epsilon,
    calibrate,
    find_run_dirs,
    leads,
    matched_values,
    rescore,
    signal_table,
    strength_table,
    summarize,
    tradeoff,
)
from lib.setting import REPO, SMOKE_CONFIG, Setting, build_parser, run_script, setting_from_args
from lib.wong_replay import wong_table
from matplotlib import colormaps
from matplotlib.figure import Figure

from robustdrop.diagnostics import CollapseRule
from robustdrop.environment import environment
from robustdrop.errors import RobustdropError
from robustdrop.formatting import eps_in_255ths, fixed, format_eps, format_pct, format_pct_se
from robustdrop.plots._common import new_figure
from robustdrop.store import RunStore, epoch_weights
from robustdrop.sweeps import SweepPlan, cell_name, plan_sweep, read_toml, run_sweep, toml_text
from robustdrop.sweeps.grid import parse_value

# ---------------------------------------------------------------------------------------------
# The study: sweep files under analyses/studies/ (`robustdrop sweep --file`, local or Ray); stage
# 2's file is computed from stage 1's APART runs (matched_study). --plan prints the commands.
# ---------------------------------------------------------------------------------------------
STUDIES = Path(__file__).resolve().parent / "studies"
STUDY = STUDIES / "collapse_prediction.toml"  # stage 1's grid: FGSM and the controls over seeds × ε
PARTS = {"stage 1": (STUDY, STUDIES / "collapse_prediction_pgd3.toml"),
         "calibration": (STUDIES / "collapse_prediction_calibration.toml",
                         STUDIES / "collapse_prediction_calibration_pgd3.toml")}
MATCHED = "cp-matched"  # stage 2's sweep, and its file <runs>/cp-matched.toml
_SPEC = read_toml(STUDY)
_STAGE1, _CALIBRATION = _SPEC["grid"], read_toml(PARTS["calibration"][0])["grid"]
EPSILONS = tuple(_STAGE1["epsilon"])
SEEDS = tuple(_STAGE1["seed"])  # stage 1's seeds, also stage 2's
CALIBRATION_SEEDS = (min(_CALIBRATION["seed"]), max(_CALIBRATION["seed"]) + 1)  # a range a:b, b excluded
FIXED = {k: v[0] for k, v in _STAGE1.items() if len(v) == 1}  # threads, eval_batch_size
# Minutes per quick cell, two cells at once with one thread each on the 2-core machine: FGSM as
# measured for the sweep (about 4 minutes); the others add 30 × their extra training seconds per
# epoch over FGSM (figures/table_cost.md; evaluation and diagnostics cost the same for every
# method; pgd: PGD-3). docs/collapse-prediction.md, "Cost".
CELL_MINUTES = {"fgsm": 4.0, "rs-fgsm": 4.1, "pgd": 6.5, "apart": 5.7, "fgsm+": 5.5}


def study_plan(path: Path, *, fixed: dict[str, Any] | None = None,
               only: dict[str, Sequence[Any]] | None = None) -> SweepPlan:
    """The sweep of a study file (:func:`robustdrop.sweeps.plan_sweep`, as `robustdrop sweep
    --file` plans it), with ``fixed`` values added to every cell (not over the grid's keys) and,
    with ``only`` ({key: values}), only the cells with those values (the smoke test's subset)."""
    spec = read_toml(path)
    only = only or {}

    def keep(key: str, value: Any) -> bool:
        return key not in only or parse_value(key, value) in only[key]

    grid = {k: [v for v in vs if keep(k, v)] for k, vs in spec["grid"].items()}
    cells = {n: c for n, c in spec["cells"].items() if all(keep(k, v) for k, v in c.items() if k in only)}
    extra = {k: v for k, v in (fixed or {}).items() if k not in grid}
    return plan_sweep(grid if all(grid.values()) else {}, preset=spec["preset"],
                      fixed={**spec["fixed"], **extra}, name=spec["name"], cells=cells)


def sweep_command(path: Path, runs_dir: str) -> str:
    return f"robustdrop sweep --file {shown(path)} --runs-dir {runs_dir} --jobs 2"


def shown(path: Path) -> str:
    """A path as the commands print it: relative to the repository when inside it."""
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def _minutes(plans: Sequence[SweepPlan]) -> float:
    return sum(CELL_MINUTES[c.config.method] for p in plans for c in p.cells)


def plan_text(setting: Setting) -> str:
    runs = default_runs(setting)
    runs_dir = shown(runs)
    parts = {part: [study_plan(f) for f in files] for part, files in PARTS.items()}
    count = {part: sum(len(p.cells) for p in plans) for part, plans in parts.items()}
    matched = 2 * len(SEEDS) * len(EPSILONS)
    eps = ", ".join(format_eps(e) for e in EPSILONS)
    lines = ["# The collapse-prediction study on the quick preset", "",
             f"Cells: stage 1 {count['stage 1']} (FGSM and controls: {len(SEEDS)} seeds × ε {eps} × "
             f"{', '.join(_STAGE1['method'])}, PGD-3); stage 2 {matched} (FGSM with APART's final α and with its "
             f"mean |δ|, same seeds and ε); optional calibration {count['calibration']} (seeds "
             f"{CALIBRATION_SEEDS[0]}..{CALIBRATION_SEEDS[1] - 1}).",
             f"Estimated wall time with 2 cells at once (minutes per cell {CELL_MINUTES}): stage 1 "
             f"{_minutes(parts['stage 1']) / 2 / 60:.1f} h, stage 2 {matched * CELL_MINUTES['fgsm'] / 2 / 60:.1f} h, "
             f"calibration {_minutes(parts['calibration']) / 2 / 60:.1f} h (CPU: twice that in core-hours).",
             "Each command is one sweep: rerun it to continue (finished cells are reused, stopped ones resumed); "
             "`--max-minutes M` stops it in time; `--dry-run` lists its cells with the engine's cost estimate; on a Ray cluster add `--backend ray --address HOST:PORT` (the "
             "runs folder on a shared filesystem; `--gpus-per-cell 0.25`: four cells share a GPU).", "",
             "## Stage 1: FGSM and the controls", "", *(sweep_command(f, runs_dir) for f in PARTS["stage 1"]), "",
             "## Stage 2: the matched-strength FGSM controls (after stage 1's APART runs finished)", "",
             "# computed from them: prints, per ε, APART's final α and mean |δ| over its seeds; writes the sweep file",
             f"python analyses/collapse_prediction.py --matched-from {runs_dir}/cp-main",
             sweep_command(runs / f"{MATCHED}.toml", runs_dir), "",
             "## Optional: calibration seeds (thresholds chosen there, evaluated on the others)", "",
             *(sweep_command(f, runs_dir) for f in PARTS["calibration"]), "",
             "## The analysis (reads every run below the folder; nothing is trained)", "",
             f"python analyses/collapse_prediction.py --runs {runs_dir}"]
    return "\n".join(lines) + "\n"


MATCHED_STEPS = ("alpha_mean", "delta_mean")  # FGSM at APART's final α and at its mean |δ|


def matched_study(runs: Sequence[RunSummary], seeds: Sequence[int] = SEEDS,
                  steps: Sequence[str] = MATCHED_STEPS) -> dict[str, Any]:
    """Stage 2 as a sweep (``read_toml``'s fields), computed from stage 1's APART runs
    (:func:`lib.prediction.matched_values`): per ε, FGSM at APART's final α and at its mean |δ|
    (means over its seeds, 3 significant digits; at most ε, FGSM's largest step) on ``seeds``."""
    cells: dict[str, dict[str, Any]] = {}
    for _, r in matched_values(runs).iterrows():
        for value in (r[step] for step in steps):
            alpha = f"{min(max(value, 1e-4), r['epsilon']) * 255:.3g}/255"
            for seed in seeds:
                values = {"alpha": alpha, "epsilon": f"{eps_in_255ths(r['epsilon'])}/255", "seed": int(seed)}
                cells[cell_name({k: parse_value(k, v) for k, v in values.items()})] = values
    return {"name": MATCHED, "preset": _SPEC["preset"], "fixed": {"method": "fgsm", **FIXED}, "cells": cells}


def write_matched(runs: Sequence[RunSummary], folder: Path, seeds: Sequence[int] = SEEDS,
                  steps: Sequence[str] = MATCHED_STEPS) -> Path:
    """Stage 2's sweep file, ``<folder>/cp-matched.toml`` (:func:`matched_study`; stage 1 has an
    APART run). One already there with other cells is refused, not replaced: its sweep may have run."""
    apart = sorted({str(r.path) for r in runs if r.method == "apart"})
    text = toml_text(matched_study(runs, seeds, steps), [
        "Stage 2 of the collapse-prediction study, computed by analyses/collapse_prediction.py",
        f"--matched-from from the APART runs {', '.join(apart)}"])
    path = folder / f"{MATCHED}.toml"
    if path.is_file() and path.read_text() != text:
        raise RobustdropError(f"{path} exists with other cells (were runs added?); move it away to write it anew")
    return write_text(path, text)


def matched_text(runs: Sequence[RunSummary], folder: Path) -> str:
    table = matched_values(runs)
    if table.empty:
        return "no APART runs found: run stage 1 first (see --plan)\n"
    lines = ["APART's learned perturbation size at its last epoch (mean over seeds [range]):", ""]
    for _, r in table.iterrows():
        lines.append(f"ε = {format_eps(r['epsilon'])} ({int(r['runs'])} runs, seeds {r['seeds']}): final α = "
                     f"{r['alpha_mean'] * 255:.3g}/255 [{r['alpha_min'] * 255:.3g}, {r['alpha_max'] * 255:.3g}], "
                     f"mean |δ| = {r['delta_mean'] * 255:.3g}/255 [{r['delta_min'] * 255:.3g}, "
                     f"{r['delta_max'] * 255:.3g}] = {r['delta_mean'] / r['epsilon']:.2f}ε")
    path = write_matched(runs, folder)
    lines += ["", f"Stage 2 (FGSM at these steps, seeds {_seeds(list(SEEDS))}): wrote {path}; run it with", "",
              "    " + sweep_command(path, shown(folder))]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# --smoke: the study's files on a few tiny cells through the same sweeps (two stages, a calibration
# seed; stage 2 at APART's mean |δ| only)
# ---------------------------------------------------------------------------------------------
SMOKE_EPOCHS = 3  # the trend signals' running maxima start at epoch 2
# (file, the cells kept): seed 0 and calibration seed 100 at the study's first ε
SMOKE_CELLS = ((STUDY, {"method": ["fgsm", "apart"]}), (PARTS["stage 1"][1], {}),
               (PARTS["calibration"][0], {"method": ["fgsm"]}))


def smoke_runs(setting: Setting) -> Path:
    """Run (or reuse) the smoke study's sweeps; stage 2's FGSM step comes from the APART run."""
    root = default_runs(setting)
    subset = {"seed": [SEEDS[0], CALIBRATION_SEEDS[0]], "epsilon": [EPSILONS[0]]}
    with cell_environment(setting):  # the tiny data as an image folder: cells run in their own processes
        fixed = {**SMOKE_CONFIG[setting.scale], "dataset": f"folder:{write_smoke_data(setting)}",
                 "epochs": SMOKE_EPOCHS, "device": setting.device}
        for path, only in SMOKE_CELLS:
            _run(study_plan(path, fixed=fixed, only={**subset, **only}), root, setting)
        stage1 = [summarize(p) for p in find_run_dirs([root / "cp-main"])]
        matched = write_matched(stage1, root, seeds=SEEDS[:1], steps=("delta_mean",))
        _run(study_plan(matched, fixed=fixed), root, setting)
    return root


def _run(plan: SweepPlan, root: Path, setting: Setting) -> None:
    result = run_sweep(plan, runs_dir=root, jobs=setting.jobs, progress=False)
    if result.failed:
        raise RobustdropError(f"smoke sweep {plan.name}: cells failed: {', '.join(result.failed)} "
                              f"(logs in {result.path / 'logs'})")


# ---------------------------------------------------------------------------------------------
# The analysis
# ---------------------------------------------------------------------------------------------
def default_runs(setting: Setting) -> Path:
    return setting.runs_dir / "collapse-prediction"


def caption(setting: Setting, runs: Sequence[RunSummary]) -> str:
    """What the runs are: the scale, the preset's model and data, and what varies between runs."""
    cfg = make_run_config(setting)
    eps = ", ".join(format_eps(e) for e in sorted({r.epsilon for r in runs}))
    seeds = sorted({r.seed for r in runs})
    what = (f"{model_text(cfg)} on {dataset_text(cfg)}, the quick preset's training; {len(runs)} runs: "
            f"ε {eps}; {', '.join(dict.fromkeys(sorted(r.label for r in runs)))}; seeds {_seeds(seeds)}")
    if setting.smoke:
        return f"SMOKE TEST (not a result): {what}"
    return f"{setting.scale} scale — {what}"


def _seeds(seeds: Sequence[int]) -> str:
    return f"{seeds[0]}..{seeds[-1]}" if seeds and seeds == list(range(seeds[0], seeds[-1] + 1)) else \
        ",".join(map(str, seeds))


def split_calibration(runs: Sequence[RunSummary]) -> tuple[list[RunSummary], list[RunSummary]]:
    lo, hi = CALIBRATION_SEEDS
    cal = [r for r in runs if lo <= r.seed < hi]
    return [r for r in runs if not lo <= r.seed < hi], cal


def _range(lo: float, hi: float) -> str:
    return "" if math.isnan(lo) else (f"{lo:+.0f}" if lo == hi else f"{lo:+.0f} … {hi:+.0f}")


def _of(t: pd.Series, count: str, total: str) -> str:
    """``count/total`` of a table row; ``–`` when there was nothing to count."""
    return f"{int(t[count])}/{int(t[total])}" if int(t[total]) else "–"


def display_signals(table: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for _, t in table.iterrows():
        n = int(t["collapsing_runs"])
        rows.append({
            "signal": f"`{t['signal']}`: {ROW_TEXT[t['signal']]}",
            "hit (lead ≥ 0)": _of(t, "hits", "collapsing_runs"),
            f"of which > {VERY_EARLY} early": str(int(t["very_early"])) if n else "",
            "late / missed": f"{int(t['late'])} / {int(t['missed'])}" if n else "",
            "lead, epochs: median [IQR]": "" if math.isnan(t["lead_median"]) else
            f"{t['lead_median']:+.1f} [{t['lead_q25']:+.1f}, {t['lead_q75']:+.1f}]",
            "lead range": _range(t["lead_min"], t["lead_max"]),
            "false alarms": _of(t, "false_alarms", "control_runs"),
            "false-alarm runs": t["false_alarm_methods"],
            "s/epoch of its diagnostic": fixed(t["cost_s_per_epoch"], 1),
        })
    return pd.DataFrame(rows)


def display_by_epsilon(table: pd.DataFrame) -> pd.DataFrame:
    rows = [{"ε": format_eps(t["epsilon"]), "signal": f"`{t['signal']}`", "hit": _of(t, "hits", "collapsing_runs"),
             "median lead": "" if math.isnan(t["lead_median"]) else f"{t['lead_median']:+.1f}",
             "false alarms": _of(t, "false_alarms", "control_runs")} for _, t in table.iterrows()]
    return pd.DataFrame(rows, columns=["ε", "signal", "hit", "median lead", "false alarms"])


def display_strength(table: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame([{
        "ε": format_eps(t["epsilon"]), "method": t["method"], "runs (seeds)": f"{t['runs']} ({t['seeds']})",
        "collapsed": f"{t['collapsed']}/{t['runs']}",
        f"final test PGD-20 % (n={t['test_n']})": format_pct_se(t["final_test_pgd"], t["final_test_pgd_se"]),
        "final probe PGD-20 %": format_pct_se(t["final_pgd"], t["final_pgd_se"]),
        "best probe PGD-20 %": format_pct_se(t["best_pgd"], t["best_pgd_se"]),
        "final test clean %": format_pct(t["final_test_clean"]), "training mean |δ| / ε": fixed(t["delta_over_eps"]),
    } for _, t in table.iterrows()])


def draw(setting: Setting, runs: list[RunSummary], table: pd.DataFrame, trade: pd.DataFrame,
         strength: pd.DataFrame) -> Figure:
    fig = new_figure((17, 5.6))
    axes = fig.subplots(1, 3, gridspec_kw={"width_ratios": [2.2, 1.2, 1.4]})
    epsilons = sorted({r.epsilon for r in runs})
    cmap = colormaps["viridis"]
    colors = {e: cmap(0.1 + 0.7 * i / max(len(epsilons) - 1, 1)) for i, e in enumerate(epsilons)}
    _draw_leads(axes[0], runs, table, colors)
    _draw_tradeoff(axes[1], trade)
    _draw_strength(axes[2], runs, strength, colors)
    add_caption(fig, caption(setting, runs))
    return fig


def _draw_leads(ax: Any, runs: list[RunSummary], table: pd.DataFrame, colors: dict[float, Any]) -> None:
    rng = np.random.default_rng(0)
    for i, row in enumerate(ROWS):
        for r in runs:
            if r.outcome == "collapsing" and r.lead(row) is not None:
                ax.scatter(i + rng.uniform(-0.18, 0.18), r.lead(row), s=18, color=colors[r.epsilon], alpha=0.8, lw=0)
        got = leads(runs, row)
        if got:
            ax.hlines(np.median(got), i - 0.3, i + 0.3, color="black", lw=1.5)
        t = table[table["signal"] == row].iloc[0]
        ax.annotate(f"hit {int(t['hits'])}/{int(t['collapsing_runs'])}\nFA {int(t['false_alarms'])}/"
                    f"{int(t['control_runs'])}", (i, 1), xycoords=("data", "axes fraction"), xytext=(0, -4),
                    textcoords="offset points", ha="center", va="top", fontsize=7)
    ax.axhline(0, color="gray", lw=0.8, ls="--")
    ax.set_xlim(-0.5, len(ROWS) - 0.5)
    ax.set_xticks(range(len(ROWS)), ROWS, rotation=20, fontsize=8)
    ax.set_ylabel("lead over the PGD drop (epochs; > 0 = before it)")
    ax.set_title("(a) warning lead per signal on collapsing runs (bar: median; FA: false alarms on controls)",
                 fontsize=9)
    ymin, ymax = ax.get_ylim()
    ax.set_ylim(ymin, ymax + 0.25 * (ymax - ymin))  # room for the counts
    for e, c in colors.items():
        ax.scatter([], [], color=c, s=18, label=f"ε={format_eps(e)}")
    if colors:
        ax.legend(fontsize=7, loc="lower left")


def _draw_tradeoff(ax: Any, trade: pd.DataFrame) -> None:
    for (signal, option), rows in trade.groupby(["signal", "option"], sort=False):
        ok = rows.dropna(subset=["lead_median"])
        fa = ok["false_alarm_rate"].fillna(0)
        ax.plot(fa, ok["lead_median"], marker="o", ms=3, label=f"{signal} ({option})")
        for x, (_, p) in zip(fa, ok.iterrows()):
            ax.annotate(f"{p['value']:g}", (x, p["lead_median"]), fontsize=6, xytext=(2, 2), textcoords="offset points")
            if p["value"] == getattr(APRIORI, str(option)):
                ax.scatter([x], [p["lead_median"]], s=70, facecolors="none", edgecolors="black")
    ax.axhline(0, color="gray", lw=0.8, ls="--")
    ax.set_xlabel("false-alarm rate (non-collapsing runs)")
    ax.set_ylabel("median lead (epochs)")
    ax.set_title("(b) threshold trade-off (circled: the a-priori value)", fontsize=9)
    if len(trade):
        ax.legend(fontsize=7)


def _draw_strength(ax: Any, runs: list[RunSummary], strength: pd.DataFrame, colors: dict[float, Any]) -> None:
    labels = list(dict.fromkeys(strength["method"])) if len(strength) else []
    for r in runs:
        x = labels.index(r.label) + (r.epsilon * 255 - 10) * 0.06
        y = r.final_test_pgd if not math.isnan(r.final_test_pgd) else r.final_pgd
        ax.scatter(x, y, s=24, color=colors[r.epsilon], marker="x" if r.outcome == "collapsing" else "o", lw=1)
    ax.set_xticks(range(len(labels)), labels, rotation=30, fontsize=7, ha="right")
    ax.set_ylabel("final PGD-20 accuracy (test split; probe if none)")
    ax.set_title("(c) final robust accuracy per run (x: collapsed)", fontsize=9)


def markdown(setting: Setting, runs: list[RunSummary], calibration: list[RunSummary], table: pd.DataFrame,
             trade: pd.DataFrame, strength: pd.DataFrame, paths: Sequence[Path], wall: float) -> str:
    counts = pd.crosstab(pd.Series([r.label for r in runs], name="method"),
                         pd.Series([r.outcome for r in runs], name="outcome")) if runs else pd.DataFrame()
    by_eps = pd.crosstab(pd.Series([f"{r.label} ε={format_eps(r.epsilon)}" for r in runs], name="runs"),
                         pd.Series([r.outcome for r in runs], name="outcome")) if runs else pd.DataFrame()
    secs = pd.DataFrame([{"method": r.label, "s": r.seconds} for r in runs])
    cost = secs.groupby("method")["s"].agg(["count", "mean", "sum"]) if len(secs) else pd.DataFrame()
    lines = [f"# Collapse prediction ({setting.tag})", "", caption(setting, runs), "",
             "Runs read: " + ", ".join(f"`{p}`" for p in paths) + f" ({len(runs)} runs for evaluation, "
             f"{len(calibration)} calibration runs with seeds {CALIBRATION_SEEDS[0]}..{CALIBRATION_SEEDS[1] - 1}).", "",
             "## Definitions", "",
             f"* PGD drop epoch: first epoch with probe PGD-20 accuracy below 0.5 × its running best, the best ≥ {FLOOR}.",
             "* Runs are classified by outcome: collapsing (a PGD drop), non-collapsing (best ≥ floor, no drop), "
             "never robust (best < floor; left out).",
             "* Warning epoch: a signal's first epoch on; a rule's firing epoch. Lead = drop − warning (> 0: early).",
             f"* Hit: lead ≥ 0 (listed apart: more than {VERY_EARLY} epochs early). False alarm: any warning on a "
             "non-collapsing run.",
             "* Thresholds and early rule: the a-priori ones (any early signal, `fall` 0.2; the detector's defaults "
             "before the calibration below; docs/diagnostics.md, \"The early warning\").", "",
             "## Runs by outcome", "", frame_markdown(counts.reset_index()) if len(counts) else "(none)", "",
             "<details><summary>by ε</summary>", "", frame_markdown(by_eps.reset_index()) if len(by_eps) else "",
             "</details>", "",
             "## Warning lead and false alarms per signal", "", frame_markdown(display_signals(table)), "",
             "Per ε (the trend signals and both rules):", "", frame_markdown(display_by_epsilon(by_epsilon(runs))), "",
             "## Threshold trade-off (trend signals)", "",
             frame_markdown(trade.assign(**{c: trade[c].map(lambda x: fixed(x)) for c in
                                            ("hit_rate", "lead_median", "false_alarm_rate")})) if len(trade) else "(none)",
             "", *calibrated_text(runs, calibration),
             "## Matched-strength controls and robust accuracy", "", frame_markdown(display_strength(strength))
              if len(strength) else "(none)", "",
              "## Commands and wall time", "",
              "The study's cells: `python analyses/collapse_prediction.py --plan`; this analysis:", "",
              f"    python analyses/collapse_prediction.py {' '.join(sys.argv[1:])}".rstrip(), "",
              f"Training compute of the runs read (train + evaluation + diagnostics seconds, from their metrics): "
              f"{secs['s'].sum() / 3600:.2f} h in total." if len(secs) else "", "",
              frame_markdown(cost.reset_index().rename(columns={"count": "runs", "mean": "s per run", "sum": "s total"})
                             .round(0)) if len(cost) else "", "",
              f"This analysis took {wall:.0f} s on {', '.join(f'{k} {v}' for k, v in environment().items())}.", ""]
    return "\n".join(lines)


def wong_rows(setting: Setting, dirs: Sequence[Path], table: Path | None) -> dict[Path, pd.DataFrame]:
    """Each run's ``wong`` rows from ``table`` (lib.wong_replay), measuring first the finished runs
    that kept every epoch's checkpoint, did not log the diagnostic themselves and are not in the
    table; ``{}`` without a table."""
    if table is None:
        return {}
    data = DataCache(data_for(setting))
    replayable = [p for p in dirs if is_finished(p) and len(epoch_weights(p)) >= int(
        json.loads((p / RunStore.CONFIG).read_text())["epochs"]) and "wong" not in set(RunStore.open(p).metrics()["source"])]
    rows = wong_table(replayable, table, data, device=setting.device)
    return {p: rows[rows["run"] == str(p)] for p in dirs} if len(rows) else {}


def calibrated_text(runs: Sequence[RunSummary], calibration: Sequence[RunSummary]) -> list[str]:
    """The markdown of the thresholds (lib.prediction.calibrate) and the early rule (lib.early_rule)
    chosen on the calibration seeds and evaluated on the others; none without calibration runs."""
    if not calibration:
        return []
    calibrated = calibrate(calibration)
    values = ", ".join(f"`{k}` = {v:g}" for k, v in calibrated.items()) or \
        "none (no collapsing run or no trend signal there), so the a-priori values"
    lines = ["## Calibrated thresholds", "",
             f"Chosen on the calibration runs (the longest median lead with no false alarm there): {values}. "
             "The same table on the evaluation runs with them:", "",
             frame_markdown(display_signals(signal_table(rescore(runs, replace(APRIORI, **calibrated))))), "",
             "## The early rule calibrated (signals that work at this scale)", "",
             f"Candidate signals: {', '.join(f'`{s}`' for s in CANDIDATES)}; measured in every calibration run: "
             f"{', '.join(f'`{s}`' for s in pool(calibration)) or 'none'}. Chosen on the calibration runs: no false "
             "alarm, then most hits, longest median lead, simplest rule, largest `fall` (lib/early_rule.py).", ""]
    chosen, cal_score, tried = choose(calibration)
    if chosen is None:
        return lines + [f"No rule can be chosen ({tried} tried; the calibration runs need collapsing and "
                        "non-collapsing runs): the a-priori early rule stays.", ""]
    ours = score(runs, lambda r: warning_epoch(r, chosen))
    apriori = apriori_score(runs)
    rows = pd.DataFrame([{"rule": name, "hits": f"{s['hits']}/{s['collapsing']}",
                          "late / missed": f"{s['late']} / {s['missed']}", "median lead": fixed(s["lead_median"], 1),
                          "false alarms": f"{s['false_alarms']}/{s['controls']}"}
                         for name, s in (("calibration: " + chosen.text(), cal_score),
                                         ("evaluation: " + chosen.text(), ours),
                                         ("evaluation: the a-priori early rule (any signal, fall 0.2)", apriori))])
    verdict = ("it wins (no fewer hits, no more false alarms, better in one): the default should change to it"
               if wins(ours, apriori) else "it does not win: the a-priori early rule should stay the default")
    current = "it is" if chosen.collapse_rule() == CollapseRule() else "it is not"
    verdict += f" ({current} the detector's default now)"
    return lines + [f"Chosen among {tried} rules: {chosen.text()} (`--diagnostics default {chosen.option()}`). "
                    f"On the evaluation seeds {verdict}.", "",
                    frame_markdown(rows), ""]


def analyse(setting: Setting, paths: Sequence[Path], wong: Path | None = None) -> int:
    start = time.perf_counter()
    dirs = find_run_dirs(paths)
    if not dirs:
        print(f"no run directories under {', '.join(map(str, paths))}; train the study first (--plan)", file=sys.stderr)
        return 2
    running = [d for d in dirs if (d / "checkpoints" / "last.pt").is_file() and not is_finished(d)]
    if running:  # a study still training: its unfinished runs would count as controls
        print(f"leaving out {len(running)} unfinished runs ({', '.join(d.name for d in running[:6])})", flush=True)
        dirs = [d for d in dirs if d not in running]
    extra = wong_rows(setting, dirs, wong)
    every = [summarize(p, extra=extra.get(p)) for p in dirs]
    runs, calibration = split_calibration(every)
    table, trade, strength = signal_table(runs), tradeoff(runs), strength_table(runs)
    out = setting.out
    write_table(display_signals(table), table, out, "table_collapse_prediction",
                "Collapse prediction: warning lead and false alarms per signal",
                [f"{caption(setting, runs)}. Lead = PGD-drop epoch − warning epoch; "
                 f"false alarms over the non-collapsing runs. Definitions: collapse_prediction.md."])
    write_table(display_strength(strength), strength, out, "table_matched_strength",
                "Matched-strength controls: does FGSM with APART's step collapse?",
                [f"{caption(setting, runs)}. Mean ± standard error over seeds; collapsed = a PGD drop "
                 f"(probe PGD accuracy below half its best, best ≥ {FLOOR})."])
    write_figure(draw(setting, runs, table, trade, strength), out, "collapse_prediction")
    text = markdown(setting, runs, calibration, table, trade, strength, paths, time.perf_counter() - start)
    write_text(out / "collapse_prediction.md", text)
    for _, t in table.iterrows():
        print(f"{t['signal']}: hit {int(t['hits'])}/{int(t['collapsing_runs'])}, median lead "
              f"{fixed(t['lead_median'], 1) or '–'} epochs, false alarms {int(t['false_alarms'])}/"
              f"{int(t['control_runs'])}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser(__doc__)
    parser.add_argument("--runs", type=Path, nargs="+", default=None,
                        help="run or sweep directories to read (default: <runs-dir>/collapse-prediction)")
    parser.add_argument("--plan", action="store_true", help="print the study's sweep commands, cells and CPU time")
    parser.add_argument("--matched-from", type=Path, nargs="+", default=None, metavar="DIR",
                        help="stage 2: print the matched-strength FGSM steps from the APART runs there and write "
                             "their sweep file, <runs-dir>/collapse-prediction/cp-matched.toml")
    parser.add_argument("--wong", type=Path, default=None, metavar="TABLE",
                        help="a table of the wong check's rows (lib/wong_replay.py; e.g. figures/frontier_wong.csv): "
                             "runs that kept every epoch's checkpoint and are not in it are measured first (the run "
                             "directories are only read); its wong_fall signal joins the table")
    args = parser.parse_args(argv)
    setting = setting_from_args(args)
    if args.plan:
        if setting.scale != "quick":
            print("# the study is defined on the quick preset (CPU); at the paper's scale add --preset paper to each "
                  "sweep command and replace the minutes by GPU measurements (`robustdrop sweep --dry-run`)\n")
        print(plan_text(setting), end="")
        return 0
    try:
        if args.matched_from:
            runs = [summarize(p) for p in find_run_dirs(args.matched_from)]
            print(matched_text(runs, default_runs(setting)), end="")
            return 0
        paths = args.runs or [smoke_runs(setting) if setting.smoke else default_runs(setting)]
    except RobustdropError as exc:
        print(f"collapse_prediction: {exc}", file=sys.stderr)
        return 2
    return analyse(setting, paths, args.wong)


if __name__ == "__main__":
    sys.exit(run_script(main))
