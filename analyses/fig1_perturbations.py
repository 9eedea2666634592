"""Figure 1 (paper.md E1): the FGSM perturbations of fixed test images before and after the collapse.

Uses the FGSM run of Figure 2 (same run, reused). Rows: the images, then the FGSM δ of the model at
the epoch with the best probe PGD accuracy before the ``collapse_onset`` event, at the onset epoch,
and at the last epoch (the paper: epochs 20 and 30). Without an onset: the best and the last epoch.
Writes ``<out>/fig1_perturbations.{png,pdf}`` and ``fig1_perturbations.md`` (the numbers).

    python analyses/fig1_perturbations.py [--scale quick|paper] [--smoke] [--runs-dir DIR] [--out DIR]
    python analyses/fig1_perturbations.py --from-run RUN_DIR   # draw from any finished FGSM run (trains nothing)
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from lib.catalog import ensure_cells, run_dir
from lib.outputs import provenance_line, setting_caption, write_figure, write_text
from lib.setting import Setting, build_parser, run_script, setting_from_args

from robustdrop.engine import TrackConfig
from robustdrop.formatting import fixed, format_eps, format_pct
from robustdrop.plots import perturbations_figure
from robustdrop.plots.runs import Run, array_epochs, eval_curve, metric_curve, open_run

RUN = "fgsm"


def needed(setting: Setting) -> list[str]:
    return [RUN]


def pick_epochs(run: Run) -> tuple[list[int], int | None, int | None]:
    """(epochs to show, onset, best epoch before the onset) from the run's probe PGD curve."""
    pgd = eval_curve(run.metrics)
    onset = run.onset_epoch()
    stored = list(array_epochs(run, "snapshots"))
    before = pgd[pgd.index < onset] if onset is not None else pgd
    before = before[before.index.isin(stored)]
    best = int(before.idxmax()) if len(before) else None
    last = stored[-1] if stored else None
    chosen = sorted({e for e in (best, onset, last) if e is not None and e in stored})
    return chosen, onset, best


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser(__doc__, sweep=True)
    parser.add_argument("--from-run", type=Path, default=None, metavar="RUN_DIR",
                        help="draw from this finished run (with snapshots) instead of the catalog's FGSM run")
    args = parser.parse_args(argv)
    setting = setting_from_args(args)
    if args.from_run is None:
        ensure_cells(setting, needed(setting))
    write_outputs(setting, args.from_run)
    return 0


def write_outputs(setting: Setting, path: Path | None = None) -> None:
    """Draw the figure and write its numbers from the finished FGSM run (``path``, default the
    catalog's); trains nothing."""
    path = path or run_dir(setting, RUN)
    run = open_run(path)
    epochs, onset, best = pick_epochs(run)
    fig = perturbations_figure(path, epochs)
    old = fig.get_suptitle()
    cfg = TrackConfig.from_dict(run.config)
    fig.suptitle(f"{old}\n{setting_caption(setting, cfg)}", fontsize="medium")
    write_figure(fig, setting.out, "fig1_perturbations")

    pgd = eval_curve(run.metrics)
    auto = metric_curve(run.metrics, source="snapshots", metric="delta_autocorr", attack="fgsm", split="probe")
    lines = [
        "# Figure 1: FGSM perturbations before and after the collapse", "",
        f"Run `{path.name}` ({setting_caption(setting, cfg)}; method {cfg.method}, step α={format_eps(cfg.alpha)}, "
        f"code {_commit(run)}).", "",
        f"Collapse onset (event `collapse_onset`): {onset if onset is not None else 'none detected'}; "
        f"best probe PGD epoch before it: {best}.", "",
        "| epoch | role | probe PGD acc % | δ autocorrelation (snapshots) |", "|---|---|---|---|",
    ]
    for e in epochs:
        role = "best before onset" if e == best else ("onset" if e == onset else "last")
        a = auto.get(e, np.nan)
        lines.append(f"| {e} | {role} | {format_pct(pgd.get(e, np.nan))} | {fixed(a, 3)} |")
    write_text(setting.out / "fig1_perturbations.md", "\n".join([*lines, "", provenance_line()]) + "\n")


def _commit(run: Run) -> str:
    """The git commit the run's manifest recorded (``unknown`` when none)."""
    manifest = run.store.read_json("manifest.json") if (run.path / "manifest.json").is_file() else {}
    return str(manifest.get("git_commit") or manifest.get("commit") or "unknown")[:10]


if __name__ == "__main__":
    sys.exit(run_script(main))
