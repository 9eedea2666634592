"""The step-size frontier (issue 21): is there a fixed FGSM step that never collapses and is as
robust as APART?

Reads finished runs (sweep directories or runs; each run's ``config.json`` says its method, ε, α
and seed) and writes nothing into them: per (ε, method, α) the collapse rate, final and
best-by-validation test PGD-20 (mean ± s.e. over seeds), clean accuracy and training seconds per
epoch; per ε the best fixed α (highest mean final test PGD-20 among the α that collapsed in no
seed) against APART, N-FGSM and GradAlign, paired over seeds; optionally standard AutoAttack on
the final models of the best α, APART and N-FGSM (``--aa-n``). Definitions: ``lib/frontier.py``.
Checkpoint evaluations are cached in ``--cache`` (default ``<out>/frontier_eval.json``).

Writes ``<out>/frontier.{md,csv,png,pdf}`` (``frontier.csv``: one row per group) and
``frontier_runs.csv`` (one row per run; ``source``: ``measured`` now or ``recorded: <csv>``).
``--previous CSV ...``: an earlier analysis's ``frontier_runs.csv`` supplies the rows of the runs
not read now (matched by path; a run read now wins): runs whose directories are on another machine.
Recorded rows keep their numbers, AutoAttack included; nothing is evaluated for them.

    python analyses/frontier.py --runs /work/study/runs/e10-* /work/study/runs/e8-* [--aa-n 1000]
    python analyses/frontier.py --runs runs/frontier/e8 --previous figures/frontier_runs.csv --out figures
    python analyses/frontier.py --smoke        # seconds: tiny runs, the same code path
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from lib.catalog import data_for, make_run_config
from lib.frontier import (
    BASELINES,
    MEASURED,
    DataCache,
    EvalCache,
    FrontierRun,
    answer_rows,
    best_alpha,
    check_one_per_seed,
    evaluate_autoattack,
    evaluate_best,
    group_table,
    is_finished,
    pct,
    read_recorded,
    read_run,
    runs_frame,
    with_recorded,
)
from lib.outputs import add_caption, frame_markdown, provenance_line, write_figure, write_text
from lib.prediction import find_run_dirs
from lib.setting import Setting, build_parser, run_script, setting_from_args

from robustdrop.api import track
from robustdrop.environment import environment
from robustdrop.errors import RobustdropError
from robustdrop.formatting import format_eps
from robustdrop.plots._common import new_figure, run_palette

# The grid: α/ε of the fixed FGSM steps and the other methods, at ε = 8/255 and 10/255.
ALPHA_FRACTIONS = (0.25, 0.375, 0.5, 0.625, 0.75, 1.0)
OTHER_METHODS = ("APART", "N-FGSM", "GradAlign", "FGSM+", "RS-FGSM", "PGD-3")
EPSILONS = (8 / 255, 10 / 255)
AA_METHODS = ("apart", "n-fgsm")  # with the best fixed α


def expected_labels() -> list[tuple[float, str]]:
    return [(eps, f"FGSM α={format_eps(f * eps)}") for eps in EPSILONS for f in ALPHA_FRACTIONS] + \
           [(eps, m) for eps in EPSILONS for m in OTHER_METHODS]


# ---------------------------------------------------------------------------------------------
# --smoke: tiny runs through the same path
# ---------------------------------------------------------------------------------------------
def smoke_runs(setting: Setting) -> Path:
    """Train (or reuse) FGSM at two steps and APART, two seeds each, 2 epochs on synthetic data."""
    root = setting.runs_dir / "frontier"
    eps = make_run_config(setting).epsilon
    cells = [(f"fgsm-a{f}", dict(method="fgsm", alpha=f * eps)) for f in (0.5, 1.0)] + [("apart", dict(method="apart"))]
    for name, over in cells:
        for seed in (0, 1):
            path = root / f"{name}-s{seed}"
            if is_finished(path):
                print(f"reusing finished run {path}", flush=True)
                continue
            # both kinds of per-epoch weights: full checkpoints, and weights only (APART's full state holds Ω)
            kept = {"save_weights_every": 1} if over["method"] == "apart" else {"checkpoint_every": 1}
            cfg = make_run_config(setting, seed=seed, diagnostics=["none"], eval_pgd_steps=2, **kept, **over)
            track(cfg, runs_dir=root, name=path.name, overwrite=True, progress=False, data=data_for(setting))
    return root


# ---------------------------------------------------------------------------------------------
# The analysis
# ---------------------------------------------------------------------------------------------
def read_previous(csvs: Sequence[Path]) -> list[FrontierRun]:
    """The rows of every ``--previous`` file; a run in two of them is a one-line error (which row
    would be meant is not ours to guess)."""
    rows: dict[Path, FrontierRun] = {}
    for csv in csvs:
        for run in read_recorded(csv):
            key = Path(run.path).resolve()
            if key in rows:
                raise RobustdropError(f"run {run.path} is in both --previous {rows[key].source.removeprefix('recorded: ')} "
                                      f"and {csv}; give it in one of them")
            rows[key] = run
    return list(rows.values())


def collect(setting: Setting, paths: Sequence[Path], cache: EvalCache, aa_n: int,
            aa_measure: bool = True, aa_seeds: Sequence[int] | None = None,
            recorded: Sequence[FrontierRun] = ()) -> tuple[list[FrontierRun], list[Path]]:
    """Read every finished run, add the ``recorded`` rows of the runs not read
    (:func:`with_recorded`; one row per ε, group and seed), evaluate the best-by-validation
    checkpoints of the runs read and (``aa_n`` > 0) run AutoAttack on the compared final models
    read now (of ``aa_seeds`` only, when given: minutes per model); returns all rows and the
    unfinished runs skipped."""
    data = DataCache(data_for(setting))
    runs, skipped = [], []
    for path in find_run_dirs(paths):
        if not is_finished(path):
            skipped.append(path)
            continue
        runs.append(read_run(path))
    runs = with_recorded(runs, recorded)  # before the best α: it is chosen from every row
    check_one_per_seed(runs)  # before minutes of evaluation
    for run in runs:
        if run.source == MEASURED:  # a recorded row has its best_test_* already, and no checkpoint here
            evaluate_best(run, cache, data, device=setting.device)
    if aa_n > 0:
        groups = group_table(runs_frame(runs))
        for eps in sorted({r.epsilon for r in runs}):
            best = best_alpha(groups, eps)
            if best is None:
                continue
            # only the seeds where the best α and a compared method both finished: the comparison is paired
            here = [r for r in runs if r.epsilon == eps]
            seeds = {r.seed for r in here if r.label == best["label"]} & {r.seed for r in here if r.method in AA_METHODS}
            if aa_seeds is not None:
                seeds &= set(aa_seeds)
            for run in sorted(here, key=lambda r: r.seed):  # seed by seed: a stopped analysis leaves pairs
                # a recorded row has no checkpoint here: it keeps the AutoAttack numbers it was recorded with
                if run.source == MEASURED and run.seed in seeds and (run.label == best["label"] or run.method in AA_METHODS):
                    evaluate_autoattack(run, cache, data, n=aa_n, device=setting.device, measure=aa_measure)
    cache.save()
    return runs, skipped


def display_groups(groups: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for _, g in groups.sort_values(["epsilon", "method", "alpha"]).iterrows():
        rows.append({
            "ε": format_eps(g["epsilon"]), "method": g["label"],
            "α/ε": f"{g['alpha_over_eps']:.3g}" if not math.isnan(g["alpha_over_eps"]) else "",
            "seeds": g["seeds"], "collapsed": f"{g['collapsed']}/{g['runs']}",
            "final PGD-20 %": pct(g["final_test_pgd"], g["final_test_pgd_se"]),
            "best-val PGD-20 %": pct(g["best_test_pgd"], g["best_test_pgd_se"]),
            "final clean %": pct(g["final_test_clean"], g["final_test_clean_se"]),
            "AutoAttack %": pct(g["aa"], g["aa_se"]) + (f" (n={g['aa_n']})" if g["aa_runs"] else ""),
            "test n": f"{g['test_n']}", "train s/epoch": f"{g['train_s_per_epoch']:.1f}",
        })
    return pd.DataFrame(rows)


def display_answer(answer: pd.DataFrame) -> pd.DataFrame:
    names = {"final_test_pgd": "final PGD-20", "best_test_pgd": "best-val PGD-20", "aa": "AutoAttack (final)"}
    rows = []
    for _, a in answer.iterrows():
        rows.append({"ε": format_eps(a["epsilon"]), "comparison": f"{a['a']} − {a['b']}", "measure": names[a["column"]],
                     "pairs (seeds)": f"{a['pairs']} ({a['seeds']})", "means %": f"{pct(a['mean_a'])} vs {pct(a['mean_b'])}",
                     "difference (pts)": pct(a["diff"], a["diff_se"]), "t-test p": _p(a["p_t"]),
                     "Wilcoxon p": _p(a["p_wilcoxon"]), "seeds better": f"{a['wins_a']}/{a['pairs']}"})
    return pd.DataFrame(rows)


def _p(p: float) -> str:
    return "–" if p is None or math.isnan(p) else f"{p:.3f}"


def draw(df: pd.DataFrame, groups: pd.DataFrame) -> Any:
    """Final test PGD-20 against α/ε per ε: FGSM mean ± s.e. band, every seed (× = collapsed); the
    other methods as horizontal bands (mean ± s.e.)."""
    eps_list = sorted(df["epsilon"].unique())
    fig = new_figure((5.2 * len(eps_list), 4.2))
    axes = fig.subplots(1, len(eps_list), squeeze=False)[0]
    colors = dict(zip(BASELINES, run_palette(len(BASELINES) + 1)[1:]))
    for ax, eps in zip(axes, eps_list):
        here = df[df["epsilon"] == eps]
        fg = groups[(groups["epsilon"] == eps) & (groups["method"] == "fgsm")].sort_values("alpha_over_eps")
        if len(fg):
            x, y, se = fg["alpha_over_eps"], 100 * fg["final_test_pgd"], 100 * fg["final_test_pgd_se"].fillna(0)
            ax.plot(x, y, "o-", color="black", label="FGSM, fixed α (mean ± s.e.)")
            ax.fill_between(x, y - se, y + se, color="black", alpha=0.15)
            ax.scatter(x, 100 * fg["best_test_pgd"], s=40, facecolors="none", edgecolors="black", zorder=3,
                       label="FGSM, best-by-validation epoch (mean)")
            runs = here[here["method"] == "fgsm"]
            ok, bad = runs[~runs["collapsed"]], runs[runs["collapsed"]]
            ax.scatter(ok["alpha"] / eps, 100 * ok["final_test_pgd"], s=12, color="gray", zorder=3, label="one seed")
            ax.scatter(bad["alpha"] / eps, 100 * bad["final_test_pgd"], s=40, marker="x", color="red", zorder=4,
                       label="one seed, collapsed")
        for method in BASELINES:
            g = groups[(groups["epsilon"] == eps) & (groups["method"] == method)]
            if g.empty:
                continue
            g = g.iloc[0]
            m, s = 100 * g["final_test_pgd"], 100 * (0 if math.isnan(g["final_test_pgd_se"]) else g["final_test_pgd_se"])
            ax.axhspan(m - s, m + s, color=colors[method], alpha=0.25)
            ax.axhline(m, color=colors[method], lw=1.2,
                       label=f"{g['label']} ({g['runs']} seeds, {g['collapsed']} collapsed)")
        ax.set_xlabel("FGSM step α / ε")
        ax.set_ylabel("final test PGD-20 accuracy (%)")
        ax.set_title(f"ε = {format_eps(eps)}")
        ax.set_xlim(0.2, 1.05)
        ax.legend(fontsize="x-small", loc="best")
    return fig


def provenance(df: pd.DataFrame, recorded: Sequence[FrontierRun], previous: Sequence[Path], out: Path) -> str:
    """Per ``--previous`` file: how many of its rows the tables use, how many a run read now
    replaced, and whether their run directories are on this machine."""
    text = ""
    for csv in previous:
        source = f"recorded: {csv}"
        taken = df[df["source"] == source]
        total = sum(r.source == source for r in recorded)
        absent = sum(not Path(p).exists() for p in taken["path"])
        text += (f" {len(taken)} rows taken from `{csv}` (recorded by an earlier analysis, not measured now: "
                 + ("their run directories are not on this machine" if absent == len(taken) else
                    "their run directories are on this machine but were not read" if absent == 0 else
                    f"{absent} of their {len(taken)} run directories are not on this machine")
                 + (f"; {total - len(taken)} of its {total} rows replaced by the runs read now" if total > len(taken) else "")
                 + ("; this analysis overwrites that file" if csv.resolve() == (out / "frontier_runs.csv").resolve() else "")
                 + ").")
    return text


def markdown(setting: Setting, df: pd.DataFrame, groups: pd.DataFrame, answer: pd.DataFrame, skipped: list[Path],
             paths: Sequence[Path], aa_n: int, wall: float, aa_seeds: Sequence[int] | None = None,
             previous: Sequence[Path] = (), recorded: Sequence[FrontierRun] = ()) -> str:
    found = {(round(e, 6), lab) for e, lab in zip(groups["epsilon"], groups["label"])}
    missing = [f"{format_eps(e)} {lab}" for e, lab in expected_labels() if (round(e, 6), lab) not in found]
    seeds = sorted(df["seed"].unique())
    lines = ["# The step-size frontier: fixed-step FGSM against APART, N-FGSM and GradAlign", ""]
    if setting.smoke:
        lines += ["**SMOKE TEST (not a result)**: tiny synthetic runs, 2 epochs.", ""]
    lines += [
        f"{(df['source'] == MEASURED).sum()} finished runs read from {', '.join(map(str, paths))}; "
        f"{len(skipped)} unfinished runs left out"
        + (f" ({', '.join(p.parent.name + '/' + p.name for p in skipped[:12])}{' …' if len(skipped) > 12 else ''})"
           if skipped else "") + "."
        + provenance(df, recorded, previous, setting.out)
        + f" In all {len(df)} runs, seeds {', '.join(map(str, seeds))}.",
        "",
        "Definitions. *Collapsed*: a PGD drop — at some epoch the probe PGD-20 accuracy (1000 test images) fell "
        "below half its running best, with that best ≥ 5 % (the collapse-prediction study's outcome; the detector's "
        "own `collapse_onset` events, which need a second signal, are in frontier.csv as `onsets`). *Final*: the "
        "run's own evaluation at its last epoch on the whole test set (`test n`; clean and the run's evaluation PGD: "
        "PGD-20, step 2.5ε/20, 1 restart, at the run's ε on the quick preset). *Best-val*: the checkpoint of the "
        "epoch with the highest validation PGD accuracy (the run's held-out training images), evaluated on the full test set with `robustdrop.evaluation.evaluate_checkpoint` (same attack, "
        "seeded by the run's seed); the last epoch reuses the final row. Mean ± standard error over seeds. "
        "*train s/epoch*: median `time_train_s` of the run's epochs; the runs shared 2 CPU cores with other work "
        "(two cells at once, niced, beside other processes), so these are rough and only comparable within one sweep.",
        "",
        frame_markdown(display_groups(groups)), "",
        "## The answer: the best fixed α against the other methods, paired over seeds", "",
        "Best fixed α per ε: the FGSM α with the highest mean final test PGD-20 among the α whose runs collapsed in "
        "none of their seeds (at least 2 seeds). Difference = method − best α, in accuracy points, mean ± s.e. over "
        "the seeds both have; paired t-test and Wilcoxon signed-rank test, two-sided (with 5 pairs the smallest "
        "possible Wilcoxon p is 0.0625).", "",
    ]
    for eps in sorted(groups["epsilon"].unique()):
        best = best_alpha(groups, eps)
        lines.append(f"* ε = {format_eps(eps)}: best fixed α = "
                     + (f"{best['label']} ({pct(best['final_test_pgd'], best['final_test_pgd_se'])} %, "
                        f"{best['runs']} seeds)" if best is not None else "none qualifies (every α collapsed in some "
                                                                           "seed, or has fewer than 2 seeds)"))
    lines += ["", frame_markdown(display_answer(answer)) if len(answer) else "No comparison possible yet "
              "(a best α and a compared method with common seeds are both needed).", ""]
    seeds_text = f" (of seeds {', '.join(map(str, aa_seeds))} only)" if aa_seeds is not None else ""
    lines += ["AutoAttack: " + (f"standard L∞ AutoAttack (torchattacks: APGD-CE, APGD-T, FAB-T, Square) on the final "
                                f"models of the best α, APART and N-FGSM, for the seeds where the best α and one of "
                                f"those both finished{seeds_text}, n={aa_n} seeded class-balanced test images (the run's "
                                "seed: the same images for every method of one seed)." if aa_n > 0 else
                                f"only the rows already in the cache (`--aa-cached`, n={-aa_n}): seeds without one were "
                                "not attacked this time." if aa_n < 0 else "not run this time (`--aa-n 0`).")
              + (" Recorded rows keep the AutoAttack numbers of the analysis that measured them (their `aa_n` in "
                 "frontier_runs.csv); none is attacked again (no checkpoint here)." if recorded else ""), ""]
    lines += ["Missing cells of the issue's grid (no finished run yet): "
              + (", ".join(missing) if missing else "none") + ".", "",
              f"{provenance_line()} It took {wall:.0f} s on {', '.join(f'{k} {v}' for k, v in environment().items())}; "
              "checkpoint evaluations are cached in `frontier_eval.json`.", ""]
    return "\n".join(lines)


def analyse(setting: Setting, paths: Sequence[Path], cache_file: Path, aa_n: int, aa_measure: bool = True,
            aa_seeds: Sequence[int] | None = None, previous: Sequence[Path] = (),
            recorded: Sequence[FrontierRun] = ()) -> int:
    start = time.perf_counter()
    torch.set_num_threads(max(1, setting.threads))
    cache = EvalCache(cache_file)
    runs, skipped = collect(setting, paths, cache, aa_n, aa_measure, aa_seeds, recorded)
    if not runs:
        print(f"no finished runs under {', '.join(map(str, paths))} (and no --previous rows)", file=sys.stderr)
        return 2
    df = runs_frame(runs)
    groups = group_table(df)
    answer = answer_rows(df, groups)
    if aa_n and not aa_measure:
        aa_n = -aa_n  # the text says: cached rows only
    out = setting.out
    fig = draw(df, groups)
    add_caption(fig, ("SMOKE TEST (not a result) — " if setting.smoke else "")
                + f"quick preset, {len(df)} runs"
                + (f" ({(df['source'] != MEASURED).sum()} recorded by an earlier analysis)" if recorded else "")
                + f", seeds {', '.join(map(str, sorted(df['seed'].unique())))}; "
                  "test PGD-20 on the full test set")
    write_figure(fig, out, "frontier")
    write_text(out / "frontier.csv", groups.to_csv(index=False))
    write_text(out / "frontier_runs.csv", df.to_csv(index=False))
    write_text(out / "frontier.md", markdown(setting, df, groups, answer, skipped, paths, aa_n,
                                             time.perf_counter() - start, aa_seeds, previous, recorded))
    for _, a in answer[answer["column"] == "final_test_pgd"].iterrows() if len(answer) else []:
        print(f"ε={format_eps(a['epsilon'])}: {a['a']} − {a['b']} = {pct(a['diff'], a['diff_se'])} pts "
              f"({a['pairs']} seeds; t-test p {_p(a['p_t'])}, Wilcoxon p {_p(a['p_wilcoxon'])})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser(__doc__)
    parser.add_argument("--runs", type=Path, nargs="+", default=None,
                        help="run or sweep directories to read (default: <runs-dir>/frontier)")
    parser.add_argument("--cache", type=Path, default=None,
                        help="JSON cache of the checkpoint evaluations (default: <out>/frontier_eval.json)")
    parser.add_argument("--aa-cached", action="store_true",
                        help="with --aa-n: use only the AutoAttack rows already cached, attack nothing new")
    parser.add_argument("--aa-seeds", type=int, nargs="+", default=None,
                        help="with --aa-n: attack only these seeds' models (AutoAttack takes minutes per model on a CPU)")
    parser.add_argument("--previous", type=Path, nargs="+", default=[], metavar="CSV",
                        help="frontier_runs.csv of earlier analyses: their rows stand in for the runs not read now "
                             "(matched by path; a run read now wins), e.g. runs trained on another machine")
    args = parser.parse_args(argv)
    # bad input (a --previous file, a cell both read and recorded): one line, nothing trained or written
    try:
        recorded = read_previous(args.previous)  # first: a bad file costs nothing
        setting = setting_from_args(args)
        aa_n = args.aa_n if args.aa_n is not None else 0  # AutoAttack only when asked for (minutes per model)
        if setting.smoke:
            paths = args.runs or [smoke_runs(setting)]
        else:
            paths = args.runs or [setting.runs_dir / "frontier"]
        return analyse(setting, paths, args.cache or setting.out / "frontier_eval.json", aa_n, not args.aa_cached,
                       args.aa_seeds, args.previous, recorded)
    except RobustdropError as exc:
        print(f"frontier: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(run_script(main))
