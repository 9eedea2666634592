"""Figure 2 (paper.md E2, §3): robustness and perturbation strength per epoch, and the collapse onset.

The referee (``lib.catalog.reference_for``): at quick scale the one the quick preset ships
(``builtin:quick``, docs/referee.md), attached to the FGSM, FGSM+ and APART runs during training;
at paper scale (and --smoke) a PGD-10 run on the same data, model and ε, trained alongside them:
they keep every epoch's weights and are measured on it once both are finished
(``lib.catalog.reference_deferred``: a ``kind="replay"`` sweep cell each, ``robustdrop.diagnostics.replay``). Either way every epoch gets the referee's
accuracy on the FGSM δ of the current model (the paper's strength measure) and on random-sign /
uniform noise of the same size.

Writes ``<out>/fig2_strength.{png,pdf}`` (the three runs, with the reference-free panels),
``fig2_strength_fgsm.{png,pdf}`` (the FGSM run alone, the paper's layout; the digitized paper
curves overlaid at paper scale) and ``fig2_strength.md`` (the numbers).

    python analyses/fig2_strength.py [--scale quick|paper] [--smoke] [--runs-dir DIR] [--out DIR] [--jobs N]
    python analyses/fig2_strength.py --from-runs FGSM_RUN [RUN ...]   # draw from finished runs (trains nothing)
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from lib.catalog import ensure_cells, measured, reference_for, reference_run, run_dir
from lib.outputs import add_caption, provenance_line, setting_caption, write_figure, write_text
from lib.setting import Setting, build_parser, run_script, setting_from_args

from robustdrop.diagnostics import verify_builtin
from robustdrop.formatting import fixed, format_pct
from robustdrop.plots import collapse_figure
from robustdrop.plots.runs import eval_curve, metric_curve, open_run, run_seconds

RUNS = ["fgsm", "fgsm+", "apart"]


def needed(setting: Setting) -> list[str]:
    """The runs, measured on the referee (after training: their replay cells, :mod:`lib.catalog`)."""
    ref = reference_run(setting)
    return [*([ref] if ref else []), *measured(setting, RUNS)]


def referee_text(setting: Setting) -> str:
    """One line on Figure 2's referee and its accuracy."""
    reference = reference_for(setting)
    if reference.startswith("builtin:"):
        _, provenance = verify_builtin(reference.split(":", 1)[1])
        cfg, acc = provenance["config"], provenance["accuracy"]
        return (f"referee: {reference} ({cfg['model']} width {cfg['width']:g}, PGD-{cfg['pgd_steps']}-trained; "
                f"test clean {format_pct(acc['test_none']['value'])}%, PGD-20 {format_pct(acc['test_pgd']['value'])}%; "
                "docs/referee.md)")
    ref_df = open_run(reference).metrics
    return (f"referee: {Path(reference).name} (final probe clean {format_pct(eval_curve(ref_df, 'none').iloc[-1])}%, "
            f"PGD {format_pct(eval_curve(ref_df).iloc[-1])}%)")


def _at(s: pd.Series, epoch: int | None) -> float:
    return float(s.get(epoch, math.nan)) if epoch is not None else math.nan


def summarize(path: Path) -> dict[str, Any]:
    """The numbers of one run that the figure shows (probe split unless said)."""
    run = open_run(path)
    df = run.metrics
    pgd = eval_curve(df)
    onset = run.onset_epoch()
    before = pgd[pgd.index < onset] if onset is not None else pgd
    best = int(before.idxmax()) if len(before) else None
    peak = int(pgd.idxmax()) if len(pgd) else None
    last = int(pgd.index.max()) if len(pgd) else None
    ref = metric_curve(df, source="strength-ref", metric="ref_acc", attack="fgsm", split="probe")
    noise = metric_curve(df, source="strength-ref", metric="ref_acc", attack="noise-sign", split="probe")
    # FGSM's loss increase minus random-sign noise's on the run's own model (the figure's middle panel)
    gap = (metric_curve(df, source="strength", metric="loss_increase", attack="fgsm", split="probe")
           - metric_curve(df, source="strength", metric="loss_increase", attack="noise-sign", split="probe"))
    test_pgd = eval_curve(df, split="test")
    return {
        "run": path.name, "onset": onset, "peak_epoch": peak, "peak_pgd": _at(pgd, peak),
        "best_before_onset": best, "final_epoch": last, "final_pgd": _at(pgd, last),
        "final_test_pgd": float(test_pgd.iloc[-1]) if len(test_pgd) else math.nan,
        "final_test_n": int(df[(df["source"] == "eval") & (df["split"] == "test")]["n"].max() or 0)
        if (df["split"] == "test").any() else 0,
        "ref_fgsm_best": _at(ref, best), "ref_fgsm_onset": _at(ref, onset), "ref_fgsm_last": _at(ref, last),
        "ref_fgsm_min": float(ref.min()) if len(ref) else math.nan,
        "ref_noise_mean": float(noise.mean()) if len(noise) else math.nan,
        "ref_noise_onset": _at(noise, onset), "ref_noise_last": _at(noise, last),
        "gap_best": _at(gap, best), "gap_onset": _at(gap, onset), "gap_last": _at(gap, last),
        "seconds": run_seconds(df),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser(__doc__, sweep=True)
    parser.add_argument("--from-runs", type=Path, nargs="+", default=None, metavar="RUN_DIR",
                        help="draw from these finished runs measured on the setting's referee (the first gets the "
                             "single-run figure) instead of the catalog's fgsm, fgsm+ and apart")
    args = parser.parse_args(argv)
    setting = setting_from_args(args)
    if args.from_runs is None:
        ensure_cells(setting, needed(setting))
    write_outputs(setting, args.from_runs or RUNS)
    return 0


def write_outputs(setting: Setting, runs: Sequence[str | Path]) -> None:
    """Draw the figures and write the numbers from finished (and measured) runs ``runs`` (catalog
    names or run directories; the first one also gets the paper's single-run layout); trains nothing."""
    paths = [Path(n) if isinstance(n, Path) else run_dir(setting, n) for n in runs]
    caption = setting_caption(setting)
    ref_text = referee_text(setting)
    fgsm_df = open_run(paths[0]).metrics

    fig = collapse_figure(paths, reference_free=True)
    add_caption(fig, f"{caption}\n{ref_text}")
    write_figure(fig, setting.out, "fig2_strength")
    paper = setting.scale == "paper" and not setting.smoke
    fig = collapse_figure(paths[0], paper=paper)
    add_caption(fig, f"{caption}\n{ref_text}")
    write_figure(fig, setting.out, "fig2_strength_fgsm")

    rows = [summarize(p) for p in paths]
    lines = [
        "# Figure 2: robustness and perturbation strength per epoch", "",
        f"{caption}.", "",
        f"{ref_text}. Accuracies in % on the fixed probe subset of the test set (n={int(fgsm_df[fgsm_df['split'] == 'probe']['n'].max())}) "
        "unless said; `ref FGSM` = the reference model's accuracy on the FGSM δ of the run (lower = stronger), "
        "`ref noise` = on random-sign noise of the same ε (mean over epochs); loss gap = FGSM's loss increase minus "
        "random-sign noise's on the run's own model, in nats (≈0: FGSM no stronger than noise).", "",
        "| run | peak PGD (epoch) | final PGD | final test PGD | onset | ref FGSM: best-before-onset / onset / last "
        "| ref noise (onset / last) | loss gap: best / onset / last | compute s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['run']} | {format_pct(r['peak_pgd'])} ({r['peak_epoch']}) | {format_pct(r['final_pgd'])} | "
            f"{format_pct(r['final_test_pgd'])} (n={r['final_test_n']}) | {r['onset'] if r['onset'] is not None else '—'} | "
            f"{format_pct(r['ref_fgsm_best'])} / {format_pct(r['ref_fgsm_onset'])} / {format_pct(r['ref_fgsm_last'])} | "
            f"{format_pct(r['ref_noise_onset'])} / {format_pct(r['ref_noise_last'])} (mean {format_pct(r['ref_noise_mean'])}) | "
            f"{fixed(r['gap_best'])} / {fixed(r['gap_onset'])} / {fixed(r['gap_last'])} | {r['seconds']:.0f} |")
    write_text(setting.out / "fig2_strength.md", "\n".join([*lines, "", provenance_line()]) + "\n")
    for r in rows:
        print(f"{r['run']}: peak PGD {format_pct(r['peak_pgd'])}% @ {r['peak_epoch']}, final {format_pct(r['final_pgd'])}%, "
              f"onset {r['onset']}, ref FGSM {format_pct(r['ref_fgsm_best'])}→{format_pct(r['ref_fgsm_last'])}% "
              f"vs noise {format_pct(r['ref_noise_mean'])}%")


if __name__ == "__main__":
    sys.exit(run_script(main))
