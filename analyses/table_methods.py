"""The method table (paper.md E5, §5): FGSM, RS-FGSM, PGD, FGSM+ and APART, and the field's
single-step baselines N-FGSM and GradAlign (docs/baselines.md).

For each run, its FINAL checkpoint (last epoch) and its BEST one (the epoch with the highest
validation PGD accuracy, kept by the run option ``keep_best``) are loaded and evaluated on the test set
(``--eval-n`` examples, seeded and class-balanced; all at paper scale): clean, PGD-20 (the run's
evaluation spec) and CW-loss PGD-20 (the same PGD maximizing max_{j≠y} z_j − z_y), plus the
collapse onset and the median train seconds per epoch. The final checkpoint is also attacked with
the standard L∞ AutoAttack (APGD-CE, APGD-T, FAB-T, Square; ``robustdrop.evaluation``) on a
seeded class-balanced subset of ``--aa-n`` test images (500 at quick scale, all at paper scale;
empty column with a note where torchattacks is missing or with ``--no-autoattack``). The PGD row
is PGD-10 at paper scale and PGD-k with fewer steps at quick scale (``lib.setting.KNOBS``; said in
the table). The FGSM, FGSM+ and APART runs are the ones of Figure 2.

Writes ``<out>/table_methods.{md,csv,tex}``.

    python analyses/table_methods.py [--scale quick|paper] [--smoke] [--runs-dir DIR] [--out DIR] [--eval-n N]
                                     [--aa-n N] [--no-autoattack] [--jobs N]
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import Any

import pandas as pd
from lib.catalog import catalog, ensure_cells, preset_config, ref_name, run_dir, table_evaluation
from lib.outputs import frame_markdown, setting_caption, write_table
from lib.setting import KNOBS, Setting, parse_setting, run_script

from robustdrop.evaluation import evaluate_run_cached
from robustdrop.formatting import format_pct
from robustdrop.plots.runs import eval_curve, open_run, train_seconds_per_epoch


def needed(setting: Setting) -> list[str]:
    return ["fgsm", "rs-fgsm", ref_name(setting), "fgsm+", "apart", "n-fgsm", "gradalign"]


def table_rows(setting: Setting, names: Sequence[str]) -> list[dict[str, Any]]:
    cat = catalog(setting)
    rows = []
    for name in names:
        path = run_dir(setting, name)
        ev = evaluate_run_cached(path, table_evaluation(setting))  # cached in the run directory
        aa = ev.get("autoattack", {})
        run = open_run(path)
        df, cfg = run.metrics, run.config
        test = eval_curve(df, split="test")
        test_n = df[(df["source"] == "eval") & (df["split"] == "test") & (df["attack"] == "pgd")]["n"]
        rows.append({
            "run": name, "method": cfg["method"], "what": cat[name].what,
            "final_epoch": ev["final"]["epoch"], "final_clean": ev["final"]["clean"], "final_pgd": ev["final"]["pgd"],
            "final_cw": ev["final"]["cw"],
            "best_epoch": ev["best"]["epoch"], "best_clean": ev["best"]["clean"], "best_pgd": ev["best"]["pgd"],
            "best_cw": ev["best"]["cw"],
            "onset_epoch": run.onset_epoch(),
            "train_s_per_epoch": train_seconds_per_epoch(df),
            "log_final_test_pgd": float(test.iloc[-1]) if len(test) else math.nan,
            "log_final_test_n": int(test_n.iloc[-1]) if len(test_n) else 0,
            "eval_n": ev["final"]["n"], "pgd_attack": ev["final"]["pgd_attack"], "cw_attack": ev["final"]["cw_attack"],
            "epochs": cfg["epochs"], "train_subset": cfg["train_subset"],
            "final_aa": aa.get("autoattack", math.nan), "aa_n": aa.get("n", 0), "aa_clean": aa.get("clean", math.nan),
            "aa_pgd": aa.get("pgd", math.nan), "aa_seconds": aa.get("seconds", math.nan),
            "aa_attack": aa.get("attack", ""), "aa_torchattacks": aa.get("torchattacks", ""),
            "aa_missing": aa.get("missing", ""),
        })
    return rows


def display(rows: list[dict[str, Any]], steps: int) -> pd.DataFrame:
    k = f"PGD-{steps}"
    cw = f"CW-{steps}"
    out = []
    for r in rows:
        out.append({
            "run": r["run"], "training": r["what"],
            "final ep.": r["final_epoch"], "final clean %": format_pct(r["final_clean"], 2),
            f"final {k} %": format_pct(r["final_pgd"], 2), f"final {cw} %": format_pct(r["final_cw"], 2),
            "final AutoAttack %": format_pct(r["final_aa"], 2),
            "best ep.": r["best_epoch"], "best clean %": format_pct(r["best_clean"], 2),
            f"best {k} %": format_pct(r["best_pgd"], 2), f"best {cw} %": format_pct(r["best_cw"], 2),
            "onset ep.": "" if r["onset_epoch"] is None else r["onset_epoch"],
            "train s/epoch": f"{r['train_s_per_epoch']:.1f}",
            f"final {k} % (run log, full test)": format_pct(r["log_final_test_pgd"], 2),
        })
    return pd.DataFrame(out)


def notes(setting: Setting, rows: list[dict[str, Any]], names: Sequence[str]) -> list[str]:
    r0 = rows[0]
    n = r0["eval_n"]
    where = "the full test set" if setting.eval_n <= 0 else f"a seeded class-balanced subset of {n} test images"
    cfg = preset_config(setting)
    out = [
        f"{setting_caption(setting)}.",
        f"Accuracies in % on {where} (n={n}), white-box: {r0['pgd_attack']}; CW = the same PGD maximizing the "
        "CW margin max_{j≠y} z_j − z_y.",
        f"final = the last epoch's checkpoint; best = the checkpoint of the epoch with the highest validation PGD "
        f"accuracy (validation split of {cfg.val_size} held-out training images).",
        "onset = the collapse detector's `collapse_onset` event (empty: none).",
        "train s/epoch = median over epochs of the measured training time (time_train_s), "
        + ("on a shared 2-core CPU, 1 thread per run, 2 runs in parallel: indicative only; see table_cost for "
           "controlled timings." if setting.scale == "quick" else "on the GPU of the run."),
        f"The last column is the run's own final-epoch evaluation on the test set (n={r0['log_final_test_n']}).",
        autoattack_note(setting, rows),
    ]
    if setting.scale == "quick" and not setting.smoke and ref_name(setting) in names:
        out.append(f"The PGD row is PGD-{KNOBS['quick']['ref_steps']} (step 2.5ε/{KNOBS['quick']['ref_steps']}), "
                   "not the paper's PGD-10: fewer steps to fit the CPU budget; it is also Figure 2's reference model.")
    return out


def autoattack_note(setting: Setting, rows: list[dict[str, Any]]) -> str:
    """What the AutoAttack column is (attack, n, how the images were chosen, cost), or why it is empty."""
    done = [r for r in rows if r["aa_n"]]
    if not done:
        missing = next((r["aa_missing"] for r in rows if r["aa_missing"]), "")
        why = f"not measured: {missing}" if missing else "not run (--no-autoattack)"
        return f"final AutoAttack: {why}."
    r0 = done[0]
    n, eval_n = r0["aa_n"], rows[0]["eval_n"]
    where = "the whole test set" if setting.aa_n <= 0 else (
        f"a seeded class-balanced subset of {n} test images" + (f" (among the {eval_n} above)" if n <= eval_n else ""))
    gaps = [100 * (r["aa_pgd"] - r["final_aa"]) for r in done]
    secs = sorted(r["aa_seconds"] for r in done)
    return (f"final AutoAttack = the final checkpoint under the {r0['aa_attack']} (torchattacks "
            f"{r0['aa_torchattacks']} through robustdrop.attacks.AutoAttack), on {where}; on the same images it is "
            f"{min(gaps):.1f}–{max(gaps):.1f} points below {r0['pgd_attack'].split(' ')[0].upper()} (.csv: aa_clean, "
            f"aa_pgd); {secs[len(secs) // 2]:.0f} s wall per model (median)"
            + ("." if len(done) == len(rows) else f"; not measured for {[r['run'] for r in rows if not r['aa_n']]}."))


def write(setting: Setting, names: Sequence[str], stem: str, title: str) -> pd.DataFrame:
    rows = table_rows(setting, names)
    steps = int(preset_config(setting).eval_pgd_steps)
    shown = display(rows, steps)
    write_table(shown, pd.DataFrame(rows), setting.out, stem, title, notes(setting, rows, names))
    print(frame_markdown(shown))
    return shown


def main(argv: Sequence[str] | None = None) -> int:
    setting = parse_setting(__doc__, argv, sweep=True)
    names = needed(setting)
    ensure_cells(setting, names)
    write(setting, names, "table_methods",
          "Methods: final and best clean / PGD / CW-loss PGD test accuracy, final AutoAttack")
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
