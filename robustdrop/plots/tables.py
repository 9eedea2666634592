"""Comparison tables over runs, and a RobustBench-shaped summary of one run."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from robustdrop.errors import RobustdropError
from robustdrop.formatting import format_eps, format_pct, format_ratio, is_missing, latex_table, markdown_table
from robustdrop.plots._common import attack_text
from robustdrop.plots.runs import (
    PathLike,
    Run,
    config_name,
    modal_spec,
    open_run,
    open_runs,
    passes_per_step,
    per_epoch,
    restrict_to_spec,
    seconds_per_epoch,
    select,
    train_seconds_per_epoch,
)
from robustdrop.store import atomic_write_text

FORMATS = ("terminal", "csv", "markdown", "latex")

COLUMNS = [
    "run", "method", "model", "dataset", "epochs",
    "selected_by", "best_epoch", "best_eval", "best_clean", "best_fgsm", "best_pgd",
    "final_epoch", "final_eval", "final_clean", "final_fgsm", "final_pgd",
    "fgsm_attack", "pgd_attack", "onset_epoch",
    "s_per_epoch", "train_s_per_epoch", "passes_per_step", "cost_vs_pgd10",
]

_HEADERS = {
    "run": "run", "method": "method", "model": "model", "dataset": "dataset", "epochs": "epochs",
    "selected_by": "best by", "best_epoch": "best ep.", "best_eval": "best on",
    "best_clean": "best clean %", "best_fgsm": "best FGSM %", "best_pgd": "best PGD %",
    "final_epoch": "final ep.", "final_eval": "final on",
    "final_clean": "final clean %", "final_fgsm": "final FGSM %", "final_pgd": "final PGD %",
    "fgsm_attack": "FGSM attack", "pgd_attack": "PGD attack", "onset_epoch": "onset ep.",
    "s_per_epoch": "s/epoch", "train_s_per_epoch": "train s/epoch", "passes_per_step": "passes/step",
    "cost_vs_pgd10": "cost vs PGD-10",
}
_ACC = {c for c in COLUMNS if c.split("_")[-1] in ("clean", "fgsm", "pgd") and c.startswith(("best", "final"))}
_INT = {"epochs", "best_epoch", "final_epoch", "onset_epoch"}
_EVAL_SPLITS = ("test", "probe", "val")


# --------------------------------------------------------------------------------------------
# Reading one run
# --------------------------------------------------------------------------------------------
def _eval_rows(run: Run, attack: str) -> tuple[pd.DataFrame, tuple | None]:
    rows = select(run.metrics, source="eval", metric="acc", attack=attack, split=_EVAL_SPLITS)
    spec = modal_spec(rows)
    return restrict_to_spec(rows, spec), spec


def _value_at(rows: pd.DataFrame, split: str, epoch: int) -> float:
    s = per_epoch(rows[rows["split"] == split])
    return float(s.get(epoch, math.nan))


def _n_at(rows: pd.DataFrame, split: str, epoch: int) -> int | None:
    hit = rows[(rows["split"] == split) & (rows["epoch"] == epoch)]
    return int(hit.sort_values("step")["n"].iloc[-1]) if len(hit) and int(hit["n"].iloc[-1]) > 0 else None


def _at_epoch(evals: dict[str, pd.DataFrame], epoch: int | None) -> dict[str, Any]:
    """Clean/FGSM/PGD accuracy at ``epoch`` on the first split (test, probe, val) with PGD there."""
    out: dict[str, Any] = {"eval": None, "none": math.nan, "fgsm": math.nan, "pgd": math.nan}
    if epoch is None:
        return out
    anchor = evals["pgd"] if not evals["pgd"].empty else evals["none"]
    for split in _EVAL_SPLITS:
        if ((anchor["split"] == split) & (anchor["epoch"] == epoch)).any():
            n = _n_at(anchor, split, epoch)
            out["eval"] = f"{split}, n={n}" if n else split
            for attack, rows in evals.items():
                out[attack] = _value_at(rows, split, epoch)
            break
    return out


def _dataset(cfg: dict[str, Any]) -> str | None:
    return config_name(cfg.get("dataset")) or config_name(cfg.get("data"))


def _model(cfg: dict[str, Any]) -> str | None:
    return config_name(cfg.get("model")) or config_name(cfg.get("arch"))


def _find_steps(obj: Any) -> list[int]:
    """Every integer under a key that mentions 'steps' in a (nested) config."""
    found: list[int] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if "steps" in str(k).lower() and isinstance(v, int) and not isinstance(v, bool):
                found.append(v)
            else:
                found.extend(_find_steps(v))
    return found


def is_pgd10(run: Run) -> bool:
    """Whether the run trained with PGD-10 (from its training rows, else from its config)."""
    train = select(run.metrics, split="train", metric=("acc", "loss"), attack="pgd")
    if not train.empty:
        return bool((train["steps"] == 10).any())
    method = re.sub(r"[^a-z0-9]", "", run.method.lower())
    if method == "pgd10":
        return True
    if method != "pgd":
        return False
    steps = run.config.get("pgd_steps")
    return steps == 10 if isinstance(steps, int) else 10 in _find_steps(run.config)


def _summary(run: Run) -> dict[str, Any]:
    df = run.metrics
    cfg = run.config
    evals: dict[str, pd.DataFrame] = {}
    specs: dict[str, tuple | None] = {}
    for attack in ("none", "fgsm", "pgd"):
        evals[attack], specs[attack] = _eval_rows(run, attack)

    pgd = evals["pgd"]
    best_epoch: int | None = None
    selected_by = None
    if not pgd.empty:
        select_split = next(s for s in ("val", "probe", "test") if (pgd["split"] == s).any())
        s = per_epoch(pgd[pgd["split"] == select_split])
        if (s.index >= 1).any():
            s = s[s.index >= 1]
        best_epoch = int(s.idxmax())
        selected_by = f"{select_split} {attack_text('pgd', specs['pgd']).split(' ')[0]}"
        final_epoch: int | None = int(pgd["epoch"].max())
    else:
        any_eval = pd.concat([evals["none"], evals["fgsm"]])
        final_epoch = int(any_eval["epoch"].max()) if not any_eval.empty else None
    best = _at_epoch(evals, best_epoch)
    final = _at_epoch(evals, final_epoch)

    epochs_run = int(df["epoch"].max()) if len(df) else 0

    return {
        "run": run.name,
        "method": run.method,
        "model": _model(cfg),
        "dataset": _dataset(cfg),
        "epochs": epochs_run,
        "selected_by": selected_by,
        "best_epoch": best_epoch,
        "best_eval": best["eval"],
        "best_clean": best["none"],
        "best_fgsm": best["fgsm"],
        "best_pgd": best["pgd"],
        "final_epoch": final_epoch,
        "final_eval": final["eval"],
        "final_clean": final["none"],
        "final_fgsm": final["fgsm"],
        "final_pgd": final["pgd"],
        "fgsm_attack": attack_text("fgsm", specs["fgsm"]) if specs["fgsm"] else None,
        "pgd_attack": attack_text("pgd", specs["pgd"]) if specs["pgd"] else None,
        "onset_epoch": run.onset_epoch(),
        "s_per_epoch": seconds_per_epoch(df),
        "train_s_per_epoch": train_seconds_per_epoch(df),
        "passes_per_step": sum(passes_per_step(df)),
        "cost_vs_pgd10": math.nan,
        "_pgd10": is_pgd10(run),
    }


def compare(runs: Sequence[PathLike] | PathLike) -> pd.DataFrame:
    """One row per run (columns: :data:`COLUMNS`).

    * ``best_*``: the epoch with the highest PGD accuracy on ``val`` if the run logged it, else
      on ``probe`` (else ``test``) — ``selected_by`` says which; the numbers at that epoch come
      from the first of test / probe / val that has PGD there (``best_eval`` says which, with n).
    * ``final_*``: the last epoch with a PGD evaluation, same split rule (``final_eval``).
    * ``fgsm_attack`` / ``pgd_attack``: the attack spec the numbers were measured with (the spec
      most of the run's evaluation rows carry).
    * ``onset_epoch``: first ``collapse_onset`` event, else empty.
    * ``s_per_epoch``: mean of ``time_train_s + time_eval_s`` over epochs
      (:func:`~robustdrop.plots.runs.seconds_per_epoch`); ``train_s_per_epoch``: median of
      ``time_train_s`` (:func:`~robustdrop.plots.runs.train_seconds_per_epoch`);
      ``passes_per_step``: ``passes_forward + passes_backward`` (``source=cost``);
      ``cost_vs_pgd10``: ``train_s_per_epoch`` relative to the first PGD-10 run among those
      compared (``df.attrs['pgd10_run']``).
    Accuracies are fractions in [0, 1].
    """
    opened = open_runs(runs)
    rows = [_summary(r) for r in opened]
    ref = next((r for r in rows if r["_pgd10"] and not math.isnan(r["train_s_per_epoch"])), None)
    for r in rows:
        if ref is not None and ref["train_s_per_epoch"] > 0:
            r["cost_vs_pgd10"] = r["train_s_per_epoch"] / ref["train_s_per_epoch"]
        del r["_pgd10"]
    df = pd.DataFrame(rows, columns=COLUMNS)
    for col in _INT:
        df[col] = df[col].astype("Int64")
    df.attrs["pgd10_run"] = ref["run"] if ref is not None else None
    return df


# --------------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------------
def _cell(col: str, value: Any) -> str:
    if is_missing(value):
        return ""
    if col in _ACC:
        return format_pct(value, 2)
    if col in _INT:
        return str(int(value))
    if col == "cost_vs_pgd10":
        return format_ratio(value)
    if col in ("s_per_epoch", "train_s_per_epoch"):
        return f"{float(value):.1f}"
    if col == "passes_per_step":
        v = float(value)
        return str(int(v)) if v.is_integer() else f"{v:.1f}"
    return str(value)


def _display(df: pd.DataFrame) -> tuple[list[str], list[list[str]], list[str]]:
    """Headers, string cells, and notes (attack specs shared by every run move to a note)."""
    cols = [c for c in df.columns if c in _HEADERS]
    notes: list[str] = []
    for col, what in (("fgsm_attack", "FGSM"), ("pgd_attack", "PGD")):
        values = {v for v in df[col] if isinstance(v, str)} if col in df else set()
        if len(values) == 1 and df[col].notna().all():
            cols.remove(col)
            notes.append(f"{what} = {values.pop()}")
    if "train_s_per_epoch" in cols:
        cols.remove("train_s_per_epoch")
    notes.insert(0, "accuracies in %")
    ref = df.attrs.get("pgd10_run")
    if ref:
        notes.append(f"cost = train s/epoch relative to {ref}")
    cells = [[_cell(c, v) for c, v in zip(cols, row)] for row in df[cols].itertuples(index=False)]
    return [_HEADERS[c] for c in cols], cells, notes


def _terminal(df: pd.DataFrame) -> str:
    headers, cells, notes = _display(df)
    # fields down, runs across: the table stays readable in a terminal with many columns
    table = [[h] + [row[i] for row in cells] for i, h in enumerate(headers)]
    widths = [max(len(r[j]) for r in table) for j in range(len(table[0]))]
    lines = ["  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in table]
    rule = "-" * max(len(line) for line in lines)
    return "\n".join([lines[0], rule, *lines[1:], rule, "; ".join(notes)]) + "\n"


def _markdown(df: pd.DataFrame) -> str:
    headers, cells, notes = _display(df)
    return markdown_table(headers, cells) + "\n" + "; ".join(notes) + ".\n"


def _latex(df: pd.DataFrame) -> str:
    headers, cells, notes = _display(df)
    return latex_table(headers, cells, "; ".join(notes) + ".")


def format_table(df: pd.DataFrame, fmt: str = "terminal") -> str:
    """Render :func:`compare`'s table as ``terminal`` (fields down, runs across), ``csv`` (raw
    numbers, accuracies as fractions), ``markdown`` or ``latex`` (booktabs; accuracies in %)."""
    if fmt == "csv":
        return df.to_csv(index=False)
    if fmt == "terminal":
        return _terminal(df)
    if fmt == "markdown":
        return _markdown(df)
    if fmt == "latex":
        return _latex(df)
    raise RobustdropError(f"unknown table format {fmt!r}; use one of {', '.join(FORMATS)}")


# --------------------------------------------------------------------------------------------
# RobustBench model-info JSON
# --------------------------------------------------------------------------------------------
def _autoattack(run: Run) -> tuple[float | None, str | None]:
    """The newest AutoAttack accuracy of the run (``robustdrop evaluate --attack autoattack`` or
    ``track --final-eval autoattack``): latest epoch, then most examples, then the last written;
    ``(None, None)`` if it was never measured."""
    rows = select(run.metrics, metric="acc", attack="autoattack")
    if rows.empty:
        return None, None
    row = rows.assign(_order=range(len(rows))).sort_values(["epoch", "n", "_order"]).iloc[-1]
    eps = format_eps(float(row["epsilon"]))
    return float(row["value"]), (f"standard AutoAttack (L-inf, ε={eps}) on {row['split']}, n={int(row['n'])}, "
                                 f"epoch {int(row['epoch'])}, by {row['source']}")


def robustbench_json(run: PathLike) -> dict[str, Any]:
    """The run's final numbers in RobustBench's ``model_info`` shape.

    RobustBench keys we cannot fill (``authors``, ``venue``, ``link``, ``reported`` = the paper's
    number) are ``null``; ``autoattack_acc`` is the run's newest AutoAttack accuracy (see
    :func:`_autoattack`; ``null`` if never measured), described in ``robustdrop_autoattack_eval``.
    Our own white-box number is under ``robustdrop_pgd_acc`` with its attack spec, split and epoch,
    so it is never mistaken for an AutoAttack result. Accuracies are percent strings, as
    RobustBench writes them.
    """
    r = open_run(run)
    aa_acc, aa_eval = _autoattack(r)
    row = compare([r.path]).iloc[0]
    eps = modal_spec(select(r.metrics, source="eval", metric="acc", attack="pgd"))
    eps_value = eps[0] if eps is not None else r.config.get("epsilon")
    dataset = row["dataset"]
    return {
        "link": None,
        "name": f"robustdrop {row['method']} ({row['run']})",
        "authors": None,
        "additional_data": False,
        "number_forward_passes": 1,
        "dataset": re.sub(r"[^a-z0-9]", "", dataset.lower().split("-")[0]) if isinstance(dataset, str) else None,
        "venue": None,
        "architecture": row["model"],
        "eps": format_eps(float(eps_value)) if isinstance(eps_value, (int, float, np.floating)) else None,
        "clean_acc": format_pct(row["final_clean"], 2) or None,
        "reported": None,
        "autoattack_acc": format_pct(aa_acc, 2) or None,
        "robustdrop_autoattack_eval": aa_eval,
        "robustdrop_pgd_acc": format_pct(row["final_pgd"], 2) or None,
        "robustdrop_pgd_attack": row["pgd_attack"],
        "robustdrop_eval": row["final_eval"],
        "robustdrop_dataset": dataset,
        "robustdrop_epoch": None if row["final_epoch"] is pd.NA else int(row["final_epoch"]),
        "robustdrop_note": (
            "clean_acc and robustdrop_pgd_acc are robustdrop's own evaluation of the final epoch "
            "(split and n in robustdrop_eval); "
            + ("autoattack_acc as described in robustdrop_autoattack_eval; " if aa_eval else
               "autoattack_acc is null: not measured (run `robustdrop evaluate RUN --attack autoattack`); ")
            + "reported is null: not measured"
        ),
    }


def write_robustbench_json(run: PathLike) -> Path:
    """Write :func:`robustbench_json` to ``<run>/robustbench.json``; returns the path."""
    info = robustbench_json(run)
    target = Path(run) / "robustbench.json"
    atomic_write_text(target, json.dumps(info, indent=2, ensure_ascii=False) + "\n")
    return target
