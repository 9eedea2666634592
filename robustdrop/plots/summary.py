"""The end-of-run summary ``robustdrop track`` prints: what happened, where the files are, what to run next.

Reads the run directory only (like every figure), so it describes a finished, stopped or resumed
run alike::

    best probe PGD-20 (ε=10/255, step 2.5/255, 1 restart) accuracy: 19.8% at epoch 8 (n=1000 probe)
    collapse onset: epoch 16 (detector event)
    final, epoch 30: probe clean 24.7% · FGSM 95.9% · PGD-20 0.0%; test (n=10000) clean 24.1% · ...
    referee on FGSM δ vs random-sign noise: 24.9% vs 30.9% at epoch 8 (best), 30.0% vs 31.1% at epoch 30
    files: runs/x (config.json, metrics.parquet/.csv, events.jsonl, checkpoints/, arrays/)
    next: robustdrop plot collapse runs/x
"""

from __future__ import annotations

import math

from robustdrop.formatting import format_pct
from robustdrop.plots._common import attack_text, pick_curve
from robustdrop.plots.runs import PathLike, Run, eval_curve, modal_spec, open_run, select

_ATTACKS = (("none", "clean"), ("fgsm", "FGSM"), ("pgd", "PGD"))


def _final(run: Run, split: str) -> str | None:
    rows = select(run.metrics, source="eval", metric="acc", split=split)
    if rows.empty:
        return None
    last = rows[rows["epoch"] == rows["epoch"].max()].sort_values("step")
    parts = []
    for attack, name in _ATTACKS:
        hit = last[last["attack"] == attack]
        if len(hit):
            steps = int(hit["steps"].iloc[-1])
            parts.append(f"{name}{f'-{steps}' if attack == 'pgd' else ''} {format_pct(hit['value'].iloc[-1])}%")
    n = int(last["n"].max())
    return f"{split} (n={n}) " + " · ".join(parts)


def _referee(run: Run, epochs: list[tuple[str, int]]) -> str | None:
    fgsm = pick_curve(run.metrics, source="strength-ref", metric="ref_acc", attack="fgsm", splits=("probe",))
    noise = pick_curve(run.metrics, source="strength-ref", metric="ref_acc", attack="noise-sign", splits=("probe",))
    if fgsm is None or noise is None:
        return None
    parts = []
    for what, epoch in epochs:
        at = fgsm.values.get(epoch, math.nan)
        # the noise accuracy is measured every few epochs (it does not depend on the model): the latest one
        known = noise.values[noise.values.index <= epoch]
        if not math.isnan(at) and len(known):
            parts.append(f"{format_pct(at)}% vs {format_pct(known.iloc[-1])}% at epoch {epoch} ({what})")
    reference = run.config.get("reference")
    return (f"referee{f' ({reference})' if reference else ''} on FGSM δ vs random-sign noise: "
            + ", ".join(parts)) if parts else None


def run_summary(path: PathLike) -> str:
    """The summary of the run at ``path`` (see the module docstring), several lines."""
    run = open_run(path)
    df = run.metrics
    lines: list[str] = []
    pgd = eval_curve(df)
    epochs: list[tuple[str, int]] = []
    if len(pgd):
        spec = modal_spec(select(df, source="eval", metric="acc", attack="pgd", split="probe"))
        best = int(pgd.idxmax())
        n = int(select(df, source="eval", split="probe")["n"].max())
        lines.append(f"best probe {attack_text('pgd', spec)} accuracy: {format_pct(pgd.max())}% at epoch {best} "
                     f"(n={n} probe)")
        epochs.append(("best", best))
    onset = run.onset_epoch()
    lines.append(f"collapse onset: epoch {onset} (detector event in events.jsonl)" if onset is not None
                 else "collapse onset: none detected")
    last_epoch = int(df["epoch"].max()) if len(df) else 0
    finals = [t for t in (_final(run, s) for s in ("probe", "val", "test")) if t]
    if finals:
        lines.append(f"final, epoch {last_epoch}: " + "; ".join(finals))
    if onset is not None:
        epochs.append(("onset", onset))
    epochs.append(("last", last_epoch))
    referee = _referee(run, list(dict.fromkeys(epochs)))
    if referee:
        lines.append(referee)
    lines.append(f"files: {run.path} (config.json, metrics.parquet / metrics.csv, events.jsonl, checkpoints/, arrays/)")
    lines.append(f"next: robustdrop plot collapse {run.path}")
    return "\n".join(lines)

