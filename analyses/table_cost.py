"""The cost table (paper.md E7, §6.8): forward/backward passes per training step, measured train
seconds per epoch, cost relative to PGD-10, and the APART / PGD-10 ratio (the paper: ≈1/4).

The times come from dedicated timing runs (``cost-*`` in ``lib.catalog``): every method on the
same seeded train subset, same batch size and threads, no diagnostics, trained ONE AFTER ANOTHER
on this machine (never in parallel, whatever ``--jobs`` and ``--backend`` say), the first epoch
left out as warm-up; the per-epoch median of ``time_train_s`` is used. Where the method table's full runs exist in the runs dir, their
median train seconds per epoch are listed too (they are not trained here).

Writes ``<out>/table_cost.{md,csv,tex}``.

    python analyses/table_cost.py [--scale quick|paper] [--smoke] [--runs-dir DIR] [--out DIR]
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Sequence

import pandas as pd
from lib.catalog import cost_run_names, ensure_cells, ref_name, run_dir
from lib.outputs import frame_markdown, setting_caption, write_table
from lib.setting import Setting, parse_setting, run_script

from robustdrop.environment import environment
from robustdrop.formatting import fixed, format_ratio
from robustdrop.plots.runs import examples_per_epoch, open_run, passes_per_step, train_seconds_per_epoch
from robustdrop.store import RunStore

FULL_RUN = {"cost-fgsm": "fgsm", "cost-rs-fgsm": "rs-fgsm", "cost-fgsm+": "fgsm+", "cost-apart": "apart",
            "cost-n-fgsm": "n-fgsm", "cost-gradalign": "gradalign"}


def needed(setting: Setting) -> list[str]:
    return cost_run_names()


def main(argv: Sequence[str] | None = None) -> int:
    setting = parse_setting(__doc__, argv, sweep=True)
    names = needed(setting)
    # timings: one run at a time, on this machine (a Ray cluster would run them side by side)
    ensure_cells(dataclasses.replace(setting, backend="local"), names, jobs=1)
    full_runs = {**FULL_RUN, "cost-pgd10": ref_name(setting) if setting.knobs["ref_steps"] == 10 else ""}
    raw = []
    for name in names:
        path = run_dir(setting, name)
        run = open_run(path)
        df, cfg = run.metrics, run.config
        fwd, bwd = passes_per_step(df)
        per_epoch = train_seconds_per_epoch(df, skip_first=True)
        n = examples_per_epoch(df)
        full = full_runs.get(name) or ""
        full_path = run_dir(setting, full) if full else None
        full_s = full_n = math.nan
        if full_path is not None and (full_path / RunStore.CONFIG).is_file():
            full_df = open_run(full_path).metrics
            full_s, full_n = train_seconds_per_epoch(full_df), examples_per_epoch(full_df)
        raw.append({"run": name, "method": cfg["method"], "pgd_steps": cfg["pgd_steps"] if cfg["method"] == "pgd" else 0,
                    "passes_forward": fwd, "passes_backward": bwd, "train_examples": n,
                    "train_s_per_epoch": per_epoch, "s_per_1k_examples": 1000 * per_epoch / n if n else math.nan,
                    "full_run": full if full_path is not None and not math.isnan(full_s) else "",
                    "full_run_train_s_per_epoch": full_s,
                    "full_run_s_per_1k_examples": 1000 * full_s / full_n if full_n else math.nan})
    table = pd.DataFrame(raw)
    pgd10 = table[table["run"] == "cost-pgd10"].iloc[0]
    table["cost_vs_pgd10"] = table["train_s_per_epoch"] / pgd10["train_s_per_epoch"]
    passes = table["passes_forward"] + table["passes_backward"]
    table["passes_vs_pgd10"] = passes / (pgd10["passes_forward"] + pgd10["passes_backward"])
    apart = table[table["run"] == "cost-apart"].iloc[0]
    ratio, pass_ratio = float(apart["cost_vs_pgd10"]), float(apart["passes_vs_pgd10"])
    fgsm = table[table["run"] == "cost-fgsm"].iloc[0]
    vs_fgsm = {m: float(table[table["run"] == f"cost-{m}"].iloc[0]["train_s_per_epoch"] / fgsm["train_s_per_epoch"])
               for m in ("n-fgsm", "gradalign")}

    label = {"fgsm": "FGSM", "rs-fgsm": "RS-FGSM", "pgd": "PGD", "fgsm+": "FGSM+", "apart": "APART", "n-fgsm": "N-FGSM",
             "gradalign": "GradAlign"}
    shown = pd.DataFrame([{
        "method": label[r.method] + (f"-{r.pgd_steps}" if r.method == "pgd" else ""),
        "passes/step (fwd+bwd)": f"{r.passes_forward:g}+{r.passes_backward:g}",
        "pass ratio vs PGD-10": f"{r.passes_vs_pgd10:.2f}",
        "train s/epoch": f"{r.train_s_per_epoch:.2f}",
        "s per 1k examples": f"{r.s_per_1k_examples:.3f}",
        "cost vs PGD-10": format_ratio(r.cost_vs_pgd10),
        "full run: train s/epoch": fixed(r.full_run_train_s_per_epoch, 1),
        "full run: s per 1k examples": fixed(r.full_run_s_per_1k_examples, 3),
    } for r in table.itertuples()])
    cfg0 = open_run(run_dir(setting, names[0])).config
    env = environment()
    hw = (f"GPU {env['cuda']}" if setting.device != "cpu" and env["cuda"] else
          f"CPU ({env['cpus']} cores, shared with other jobs), {setting.threads or 'default'} torch thread(s)")
    notes = [
        f"{setting_caption(setting)}.",
        f"APART / PGD-10 measured cost: {ratio:.2f} (pass-count bound {pass_ratio:.2f}); the paper: about 1/4.",
        f"The field's single-step baselines per epoch: N-FGSM {vs_fgsm['n-fgsm']:.2f}× and GradAlign (double "
        f"backpropagation) {vs_fgsm['gradalign']:.2f}× FGSM.",
        f"Timing runs: {int(table['train_examples'].iloc[0])} training examples per epoch (seeded subset), batch "
        f"{cfg0['batch_size']}, {cfg0['epochs']} epochs each, no diagnostics, run one after another; train s/epoch = "
        f"median over epochs 2..{cfg0['epochs']} of time_train_s (training steps only, no evaluation).",
        f"Hardware: {hw}, torch {env['torch']}.",
        "full run = the method table's run of the same method on the full training set (median over its epochs; "
        "trained two at a time, so only indicative).",
    ]
    write_table(shown, table, setting.out, "table_cost", "Training cost per method", notes)
    print(frame_markdown(shown))
    print(f"APART / PGD-10 cost: {ratio:.2f} (passes: {pass_ratio:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
