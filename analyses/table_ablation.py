"""The ablation table (paper.md E6): APART, FGSM+ (our reading of the paper's curve, a hypothesis:
APART without layer-wise perturbations), APART without the learned initialization (``learned_init=False``) and APART without the learned
step size (``learned_step=False``; the step is fixed at ε).

Same columns and evaluation as ``table_methods.py`` (final and best checkpoints on the test set:
clean, PGD-20, CW-loss PGD-20; standard AutoAttack on the final one; onset; train seconds per epoch). APART and FGSM+ are the runs of
Figure 2 and the method table.

Writes ``<out>/table_ablation.{md,csv,tex}``.

    python analyses/table_ablation.py [--scale quick|paper] [--smoke] [--runs-dir DIR] [--out DIR] [--eval-n N] [--jobs N]
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import table_methods
from lib.catalog import ensure_cells
from lib.setting import Setting, parse_setting, run_script


def needed(setting: Setting) -> list[str]:
    return ["apart", "fgsm+", "apart-no-init", "apart-no-step"]


def main(argv: Sequence[str] | None = None) -> int:
    setting = parse_setting(__doc__, argv, sweep=True)
    names = needed(setting)
    ensure_cells(setting, names)
    table_methods.write(setting, names, "table_ablation",
                        "APART ablations: final and best clean / PGD / CW-loss PGD test accuracy, final AutoAttack")
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
