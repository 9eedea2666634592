"""Figure 1 (paper.md E1): the FGSM perturbations of fixed test images before and after the collapse.

Uses the FGSM run of Figure 2 (same run, reused). Rows: the images, then the FGSM δ of the model at
the epoch with the best probe PGD accuracy before the ``collapse_onset`` event, at the onset epoch,
and at the last epoch (the paper: epochs 20 and 30). Without an onset: the best and the last epoch.
Writes ``<out>/fig1_perturbations.{png,pdf}`` and ``fig1_perturbations.md`` (the numbers).

    python analyses/fig1_perturbations.py [--scale quick|paper] [--smoke] [--runs-dir DIR] [--out DIR]
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import numpy as np
from lib.catalog import run_dir
from lib.outputs import setting_caption, write_figure, write_text
from lib.setting import Setting, parse_setting
from lib.tasks import ensure_runs

from robustdrop.engine import TrackConfig
from robustdrop.formatting import fixed, format_pct
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
    setting = parse_setting(__doc__, argv)
    ensure_runs(setting, needed(setting))
    write_outputs(setting)
    return 0


def write_outputs(setting: Setting) -> None:
    """Draw the figure and write its numbers from the finished FGSM run; trains nothing."""
    path = run_dir(setting, RUN)
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
        f"Run `{path.name}` ({setting_caption(setting, cfg)}).", "",
        f"Collapse onset (event `collapse_onset`): {onset if onset is not None else 'none detected'}; "
        f"best probe PGD epoch before it: {best}.", "",
        "| epoch | role | probe PGD acc % | δ autocorrelation (snapshots) |", "|---|---|---|---|",
    ]
    for e in epochs:
        role = "best before onset" if e == best else ("onset" if e == onset else "last")
        a = auto.get(e, np.nan)
        lines.append(f"| {e} | {role} | {format_pct(pgd.get(e, np.nan))} | {fixed(a, 3)} |")
    write_text(setting.out / "fig1_perturbations.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
