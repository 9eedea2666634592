"""The collapse-prediction study (analyses/collapse_prediction.py): which runs collapse, when each
early signal and the early rule warn, lead times, hit and false-alarm rates, the threshold
trade-off, and the matched-strength controls of APART. Reads run directories only (every run's
``config.json`` says its method, ε, step and seed), so any sweep layout works.

Definitions (docs/collapse-prediction.md says why):

* **PGD drop epoch** of a run: the first epoch where its probe PGD accuracy is below ``DROP`` × its
  running best, with that best ≥ :data:`FLOOR` — the detector's ``pgd_drop`` signal, with the floor
  lowered from the detector's 0.1 so that the weaker ε = 12/255 runs (peaks 0.08–0.1) count.
* **Outcome**, from the run, not its method: *collapsing* (it has a PGD drop), *non-collapsing*
  (its best reached the floor and it never dropped), *never robust* (best below the floor; left out
  of both rates).
* **Warning epoch** of a signal: the first epoch its flag is on; of a rule (``early``, ``confirm``):
  the epoch it fires, i.e. when a user could act.
* **Lead** = PGD-drop epoch − warning epoch (positive = warned before the drop).
* **Hit**: a warning at or before the drop (lead ≥ 0); reported apart: hits more than
  :data:`VERY_EARLY` epochs early, warnings after the drop (late) and none at all (missed).
* **False alarm**: any warning on a non-collapsing run.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from robustdrop.diagnostics import (
    SIGNALS,
    CollapseDetector,
    CollapseRule,
    Verdict,
    first_epochs,
    signals_from_metrics,
)
from robustdrop.formatting import format_eps
from robustdrop.plots.runs import eval_curve, metric_curve, open_run, run_seconds
from robustdrop.plots.sweeps import std_error
from robustdrop.store import RunStore

FLOOR = 0.05          # best probe PGD accuracy a run must reach before a drop counts
# The a-priori early rule, the detector's default until the calibration chose align_fall alone
# (docs/collapse-prediction.md, "The early rule calibrated"): any early signal votes, fall 0.2. The
# study's tables, its trade-off and the calibration's comparison use it explicitly, so they stay
# what they were designed to be whatever the package default is.
APRIORI = CollapseRule(signals="all", fall=0.2)
VERY_EARLY = 5        # hits with a lead above this many epochs are listed apart
EARLY_SIGNALS = [s.name for s in SIGNALS if s.early]
ROWS = [*EARLY_SIGNALS, "early", "confirm"]  # the table's rows: each early signal, then both rules
ROW_TEXT = {
    "weak_fgsm": "FGSM ≤ 1.5× noise loss increase",
    "ref_weak": "referee: FGSM within 2 pts of noise",
    "misaligned": "grad alignment < 0.5",
    "align_fall": "grad alignment fell by 0.2",
    "cos_fall": "cos(δ_FGSM, δ_PGD) fell by 0.2",
    "ref_fall": "referee gap halved",
    "wong_fall": "Wong et al.'s check: minibatch PGD-5 acc fell by > 0.2",
    "early": "early rule (any of the above)",
    "confirm": "confirmatory rule (needs the PGD drop)",
}
# Thresholds of the trade-off (and of the calibration): the trend signals' falls.
FALLS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4)
REF_FALLS = (0.3, 0.5, 0.7, 0.85)
TREND = {"align_fall": "fall", "cos_fall": "fall", "ref_fall": "ref_fall"}
# The diagnostic that measures each early signal and the split of its time_s rows: a signal's cost per epoch.
COST_SOURCE = {"weak_fgsm": ("strength", "probe"), "misaligned": ("strength", "probe"),
               "align_fall": ("strength", "probe"), "cos_fall": ("strength", "probe"),
               "ref_weak": ("strength-ref", "probe"), "ref_fall": ("strength-ref", "probe"),
               "wong_fall": ("wong", "train")}


# --------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------
def find_run_dirs(paths: Iterable[Path]) -> list[Path]:
    """Run directories under ``paths``: each path itself if it is a run (``config.json`` and a
    metrics table), else the runs one or two levels below it (a sweep directory, a folder of sweeps)."""
    found: list[Path] = []
    for p in map(Path, paths):
        if _is_run(p):
            found.append(p)
            continue
        for child in sorted(p.iterdir()) if p.is_dir() else []:
            if _is_run(child):
                found.append(child)
            elif child.is_dir():
                found += [c for c in sorted(child.iterdir()) if _is_run(c)]
    return sorted(dict.fromkeys(found))


def _is_run(p: Path) -> bool:
    return (p / RunStore.CONFIG).is_file() and any((p / f).is_file() for f in ("metrics.parquet", "metrics.csv"))


def method_label(cfg: dict[str, Any]) -> str:
    """What a run trained with, for tables: ``FGSM``, ``FGSM α=2.6/255``, ``PGD-3``, ``RS-FGSM``, ..."""
    method, eps, alpha = cfg["method"], cfg["epsilon"], cfg.get("alpha")
    if method == "fgsm":
        return "FGSM" if alpha is None or abs(alpha - eps) < 1e-9 else f"FGSM α={format_eps(alpha)}"
    if method == "pgd":
        return f"PGD-{cfg['pgd_steps']}"
    return {"rs-fgsm": "RS-FGSM", "apart": "APART", "fgsm+": "FGSM+"}.get(method, method)


@dataclass
class RunSummary:
    """One run's numbers for the study."""

    path: Path
    method: str
    label: str
    epsilon: float
    seed: int
    alpha: float | None
    epochs: int
    outcome: str                      # collapsing | non-collapsing | never robust
    drop: int | None                  # the PGD drop epoch
    best_pgd: float
    best_epoch: int
    final_pgd: float                  # probe, last epoch
    final_test_pgd: float             # test split at the last epoch (NaN if not evaluated)
    final_test_clean: float
    test_n: int
    train_delta: float                # mean |δ| of the training perturbations, last epoch (strength or apart)
    apart_alpha: float                # APART / FGSM+: the learned input step α at the last epoch
    apart_delta: float                # APART / FGSM+: their own mean |δ| of the training perturbations, last epoch
    seconds: float                    # train + eval + diagnostics seconds
    first: dict[str, int | None] = field(default_factory=dict)   # warning epoch per signal and rule
    diag_seconds: dict[str, float] = field(default_factory=dict)  # median time_s per epoch, by (source, split)
    evaluated: set[str] = field(default_factory=set)            # signals whose inputs were logged
    inputs: dict[int, dict[str, float]] = field(default_factory=dict, repr=False)

    def lead(self, row: str) -> int | None:
        w = self.first.get(row)
        return None if w is None or self.drop is None else self.drop - w


def _last(s: pd.Series) -> float:
    return float(s.iloc[-1]) if len(s) else math.nan


def summarize(path: Path, rule: CollapseRule | None = None, extra: pd.DataFrame | None = None) -> RunSummary:
    """Read one run: its outcome (with :data:`FLOOR`) and every signal's warning epoch under ``rule``
    (default: :data:`APRIORI`, the a-priori rule). ``extra``: metric rows measured after training
    and kept outside the run (e.g. the ``wong`` replay's), added to its metrics."""
    run = open_run(path)
    cfg, df = run.config, run.metrics
    if extra is not None and len(extra):
        df = pd.concat([df, extra[df.columns.intersection(extra.columns)]], ignore_index=True)
    inputs = signals_from_metrics(df)
    pgd = eval_curve(df)
    truth = first_epochs(_verdicts(inputs, CollapseRule(floor=FLOOR)))
    best = float(pgd.max()) if len(pgd) else math.nan
    drop = truth["pgd_drop"]
    outcome = "collapsing" if drop is not None else ("non-collapsing" if best >= FLOOR else "never robust")
    test = df[(df["source"] == "eval") & (df["split"] == "test")]
    delta = metric_curve(df, source="strength", metric="delta_abs_mean", attack="train-perturbation", split="train")
    method_rows = df[(df["source"] == cfg["method"]) & (df["split"] == "train")]
    return RunSummary(
        path=path, method=cfg["method"], label=method_label(cfg), epsilon=float(cfg["epsilon"]),
        seed=int(cfg["seed"]), alpha=cfg.get("alpha"), epochs=int(pgd.index.max()) if len(pgd) else 0,
        outcome=outcome, drop=drop, best_pgd=best, best_epoch=int(pgd.idxmax()) if len(pgd) else 0,
        final_pgd=_last(pgd), final_test_pgd=_last(eval_curve(df, split="test")),
        final_test_clean=_last(eval_curve(df, attack="none", split="test")),
        test_n=int(test["n"].max()) if len(test) else 0, train_delta=_last(delta),
        apart_alpha=_last(_per_epoch(method_rows, "alpha")), apart_delta=_last(_per_epoch(method_rows, "delta_abs_mean")),
        seconds=run_seconds(df), inputs=inputs, diag_seconds=_diag_seconds(df),
        **_warnings(inputs, rule or APRIORI))


def _diag_seconds(df: pd.DataFrame) -> dict[str, float]:
    """Median per-epoch ``time_s`` of each diagnostic behind a signal, keyed ``source/split``."""
    out = {}
    for source, split in set(COST_SOURCE.values()):
        rows = df[(df["source"] == source) & (df["split"] == split) & (df["metric"] == "time_s")]
        if len(rows):
            out[f"{source}/{split}"] = float(rows.groupby("epoch")["value"].sum().median())
    return out


def signal_cost(runs: Sequence[RunSummary], row: str) -> float:
    """Median over ``runs`` of the seconds per epoch of the diagnostic(s) behind ``row`` (the
    early rule: all of them that ran); NaN for the confirmatory rule (the probe evaluation's)."""
    if row == "confirm":
        return math.nan
    keys = {f"{s}/{p}" for s, p in ([COST_SOURCE[row]] if row in COST_SOURCE else COST_SOURCE.values())}
    per_run = [sum(r.diag_seconds[k] for k in keys if k in r.diag_seconds) for r in runs
               if any(k in r.diag_seconds for k in keys)]
    return float(np.median(per_run)) if per_run else math.nan


def _per_epoch(rows: pd.DataFrame, metric: str) -> pd.Series:
    return rows[rows["metric"] == metric].groupby("epoch")["value"].last()


def _verdicts(inputs: dict[int, dict[str, float]], rule: CollapseRule) -> list[Verdict]:
    detector = CollapseDetector(rule)
    return [detector.update(epoch, values) for epoch, values in inputs.items()]


def _warnings(inputs: dict[int, dict[str, float]], rule: CollapseRule) -> dict[str, Any]:
    verdicts = _verdicts(inputs, rule)
    return {"first": first_epochs(verdicts), "evaluated": {k for v in verdicts for k in v.flags}}


def rescore(runs: Sequence[RunSummary], rule: CollapseRule) -> list[RunSummary]:
    """The runs with every warning epoch recomputed under ``rule`` (outcomes unchanged)."""
    return [replace(r, **_warnings(r.inputs, rule)) for r in runs]


# --------------------------------------------------------------------------------------------
# Lead times, hits and false alarms
# --------------------------------------------------------------------------------------------
def leads(runs: Sequence[RunSummary], row: str) -> list[int]:
    """Lead times (epochs) of ``row``'s warnings on the collapsing runs that it warned."""
    return [r.lead(row) for r in runs if r.outcome == "collapsing" and r.lead(row) is not None]


def measured(runs: Sequence[RunSummary], row: str) -> list[RunSummary]:
    """The runs where ``row`` could fire: a signal whose inputs were logged; a rule: every run."""
    return [r for r in runs if row in ("early", "confirm") or row in r.evaluated]


def signal_table(runs: Sequence[RunSummary]) -> pd.DataFrame:
    """One row per signal and rule (:data:`ROWS`): counts of hits, very early hits, late and missed
    warnings over the collapsing runs, lead-time quantiles, false alarms over the non-collapsing runs."""
    out = []
    for row in ROWS:
        here = measured(runs, row)
        coll = [r for r in here if r.outcome == "collapsing"]
        ctrl = [r for r in here if r.outcome == "non-collapsing"]
        ls = [r.lead(row) for r in coll]
        got = [x for x in ls if x is not None]
        hits = [x for x in got if x >= 0]
        alarms = [r for r in ctrl if r.first.get(row) is not None]
        out.append({
            "signal": row, "collapsing_runs": len(coll),
            "hits": len(hits), "hit_rate": len(hits) / len(coll) if coll else math.nan,
            "very_early": sum(x > VERY_EARLY for x in hits), "late": sum(x < 0 for x in got),
            "missed": sum(x is None for x in ls),
            "lead_median": float(np.median(got)) if got else math.nan,
            "lead_q25": float(np.percentile(got, 25)) if got else math.nan,
            "lead_q75": float(np.percentile(got, 75)) if got else math.nan,
            "lead_min": min(got) if got else math.nan, "lead_max": max(got) if got else math.nan,
            "control_runs": len(ctrl), "false_alarms": len(alarms),
            "false_alarm_rate": len(alarms) / len(ctrl) if ctrl else math.nan,
            "false_alarm_methods": ", ".join(sorted({r.label for r in alarms})),
            "cost_s_per_epoch": signal_cost(here, row),
        })
    return pd.DataFrame(out)


def by_epsilon(runs: Sequence[RunSummary], rows: Sequence[str] = ("align_fall", "cos_fall", "early", "confirm")) \
        -> pd.DataFrame:
    """:func:`signal_table` per ε for a few ``rows``: ε, signal, hits, collapsing runs, median lead,
    false alarms, control runs."""
    out = []
    for eps in sorted({r.epsilon for r in runs}):
        table = signal_table([r for r in runs if r.epsilon == eps])
        for _, t in table[table["signal"].isin(rows)].iterrows():
            out.append({"epsilon": eps, **{k: t[k] for k in ("signal", "hits", "collapsing_runs", "lead_median",
                                                            "false_alarms", "control_runs")}})
    return pd.DataFrame(out)


def tradeoff(runs: Sequence[RunSummary]) -> pd.DataFrame:
    """Each trend signal at every threshold of :data:`FALLS` / :data:`REF_FALLS`: hit rate, median
    lead and false-alarm rate (how the warning's earliness trades against its false alarms), the
    other thresholds those of :data:`APRIORI`."""
    out = []
    for row, option in TREND.items():
        for value in (REF_FALLS if option == "ref_fall" else FALLS):
            table = signal_table(rescore(runs, replace(APRIORI, **{option: value})))
            t = table[table["signal"] == row].iloc[0]
            if t["collapsing_runs"] == 0 and t["control_runs"] == 0:
                continue
            out.append({"signal": row, "option": option, "value": value, "hit_rate": t["hit_rate"],
                        "lead_median": t["lead_median"], "false_alarm_rate": t["false_alarm_rate"],
                        "collapsing_runs": t["collapsing_runs"], "control_runs": t["control_runs"]})
    return pd.DataFrame(out, columns=["signal", "option", "value", "hit_rate", "lead_median", "false_alarm_rate",
                                      "collapsing_runs", "control_runs"])


def calibrate(runs: Sequence[RunSummary]) -> dict[str, float]:
    """Thresholds chosen on calibration runs: per trend option (``fall``, ``ref_fall``), among the
    values where every signal of that option had collapsing and non-collapsing runs to judge it and
    no false alarm, the one with the longest mean of the signals' median leads (ties: the larger,
    less sensitive value). Options that cannot be judged there are left out (they keep their
    a-priori value)."""
    table = tradeoff(runs)
    chosen: dict[str, float] = {}
    for option, rows in table.groupby("option"):
        judged = rows.groupby("value").filter(
            lambda g: bool((g["control_runs"] > 0).all() and (g["collapsing_runs"] > 0).all()
                           and (g["false_alarm_rate"] == 0).all()))
        lead = judged.groupby("value")["lead_median"].mean().dropna()
        if len(lead):
            chosen[str(option)] = float(max(lead.index, key=lambda v: (lead[v], v)))
    return chosen


# --------------------------------------------------------------------------------------------
# The matched-strength controls (APART's small perturbations)
# --------------------------------------------------------------------------------------------
def matched_values(runs: Sequence[RunSummary], method: str = "apart") -> pd.DataFrame:
    """Per ε, over the ``method`` runs: the mean (and range) of the learned input step α at the
    last epoch and of the mean |δ| of the training perturbations at the last epoch — the steps
    of the matched-strength FGSM controls."""
    df = pd.DataFrame([vars(r) for r in runs if r.method == method])
    if df.empty:
        return df
    stats = {f"{name}_{f}": (f"apart_{name}", f) for name in ("alpha", "delta") for f in ("mean", "min", "max")}
    return df.groupby("epsilon").agg(runs=("seed", "size"), seeds=("seed", lambda s: ",".join(map(str, sorted(s)))),
                                     **stats).reset_index()


def strength_table(runs: Sequence[RunSummary]) -> pd.DataFrame:
    """Per (ε, method label): runs, how many collapsed, final and best robust accuracy (mean and
    standard error over seeds), final clean accuracy, and the training perturbations' mean |δ| / ε."""
    df = pd.DataFrame([vars(r) for r in runs])
    if df.empty:
        return df
    out = []
    for (eps, label), g in df.groupby(["epsilon", "label"], sort=True):
        out.append({"epsilon": eps, "method": label, "alpha": g["alpha"].dropna().mean() if g["alpha"].notna().any()
                    else math.nan, "runs": len(g), "seeds": ",".join(map(str, sorted(g["seed"]))),
                    "collapsed": int((g["outcome"] == "collapsing").sum()),
                    "final_test_pgd": g["final_test_pgd"].mean(), "final_test_pgd_se": std_error(g["final_test_pgd"]),
                    "final_pgd": g["final_pgd"].mean(), "final_pgd_se": std_error(g["final_pgd"]),
                    "best_pgd": g["best_pgd"].mean(), "best_pgd_se": std_error(g["best_pgd"]),
                    "final_test_clean": g["final_test_clean"].mean(),
                    "delta_over_eps": (g["train_delta"] / g["epsilon"]).mean(), "test_n": int(g["test_n"].max())})
    return pd.DataFrame(out)
