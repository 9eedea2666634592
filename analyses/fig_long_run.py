"""The paper's long-run figure (paper.md E4): PGD-10 vs APART trained for many epochs with a
repeating cyclic learning rate (the paper: 200 epochs, 30-epoch cycles, PGD-20 test accuracy).

At paper scale: 200 epochs, ``--schedule cyclic-repeat --cycle-epochs 30``, PGD-10 (step 2/255).
At quick scale it is SCALED DOWN (said in the figure): a few short cycles on a seeded train subset
(``lib.setting.KNOBS["quick"]``: ``long_cycle`` epochs per cycle, ``long_epochs`` epochs, ``long_subset``
examples), both methods evaluated every ``long_eval_every`` epochs.

Writes ``<out>/fig_long_run.{png,pdf}`` (clean / FGSM / PGD accuracy per epoch; digitized paper
curves overlaid at paper scale), ``fig_long_run_apart.{png,pdf}`` (APART's learned step sizes over
the long run) and ``fig_long_run.md`` (peak per cycle, best, final, drop).

    python analyses/fig_long_run.py [--scale quick|paper] [--smoke] [--runs-dir DIR] [--out DIR] [--jobs N]
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence

from lib.catalog import ensure_cells, long_run_names, run_dir
from lib.outputs import add_caption, provenance_line, setting_caption, write_figure, write_text
from lib.setting import Setting, parse_setting, run_script

from robustdrop.engine import TrackConfig
from robustdrop.formatting import format_pct
from robustdrop.plots import apart_figure, curves_figure
from robustdrop.plots.runs import eval_curve, open_run, run_seconds


def needed(setting: Setting) -> list[str]:
    return long_run_names(setting)


def main(argv: Sequence[str] | None = None) -> int:
    setting = parse_setting(__doc__, argv, sweep=True)
    names = needed(setting)
    ensure_cells(setting, names)
    paths = {n: run_dir(setting, n) for n in names}
    cfg = TrackConfig.from_dict(open_run(paths[names[0]]).config)
    cycles = cfg.epochs / cfg.cycle_epochs
    subset = f"seeded train subset of {cfg.train_subset} examples" if cfg.train_subset else "full training set"
    scaled = (f"SCALED DOWN: {cfg.epochs} epochs = {cycles:g} cycles of {cfg.cycle_epochs} epochs, {subset}, "
              f"evaluated every {cfg.eval_every} epochs; the paper: 200 epochs, 30-epoch cycles, PreActResNet18, "
              "full CIFAR-10")
    if setting.scale == "paper" and not setting.smoke:
        scaled = f"{cfg.epochs} epochs, cycles of {cfg.cycle_epochs} epochs (cyclic-repeat), {subset}"
    caption = f"{setting_caption(setting, cfg, epochs=False)}\n{scaled} — PGD-{cfg.pgd_steps} training vs APART"
    fig = curves_figure([paths[n] for n in names], paper=setting.scale == "paper" and not setting.smoke)
    add_caption(fig, caption)
    write_figure(fig, setting.out, "fig_long_run")
    fig = apart_figure(paths["long-apart"])
    add_caption(fig, caption)
    write_figure(fig, setting.out, "fig_long_run_apart")

    lines = ["# Long run: PGD-10 vs APART with a repeating cyclic LR", "", caption.replace("\n", ". ") + ".", "",
             "Probe PGD accuracy in % (the fixed probe subset of the test set); `drop` = best − final.", "",
             "| run | peak per cycle (epoch) | best (epoch) | final | drop | final test PGD | compute s |",
             "|---|---|---|---|---|---|---|"]
    for n in names:
        df = open_run(paths[n]).metrics
        pgd = eval_curve(df)
        peaks = []
        for c in range(math.ceil(cycles)):
            part = pgd[(pgd.index > c * cfg.cycle_epochs) & (pgd.index <= (c + 1) * cfg.cycle_epochs)]
            if len(part):
                peaks.append(f"{format_pct(part.max())} ({int(part.idxmax())})")
        test = eval_curve(df, split="test")
        best_e = int(pgd.idxmax())
        lines.append(f"| {n} | {', '.join(peaks)} | {format_pct(pgd.max())} ({best_e}) | {format_pct(pgd.iloc[-1])} | "
                     f"{format_pct(pgd.max() - pgd.iloc[-1])} | {format_pct(test.iloc[-1]) if len(test) else ''} | "
                     f"{run_seconds(df):.0f} |")
        print(f"{n}: best PGD {format_pct(pgd.max())}% @ {best_e}, final {format_pct(pgd.iloc[-1])}%")
    write_text(setting.out / "fig_long_run.md", "\n".join([*lines, "", provenance_line()]) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
