"""The quick preset's shipped referee (``builtin:quick``): train the candidates, compare them on the
measurement they exist for, ship the clearest.

    python analyses/make_reference.py --preset quick [--runs-dir DIR] [--threads N] [--no-write]

1. Trains, or reuses from ``--runs-dir``, an FGSM run of the quick preset with a checkpoint every
   epoch (``fgsm-ckpt``) and every candidate in :data:`CANDIDATES` (PGD-3-trained on the quick
   preset's data, ε, schedule and seed): named cells of one sweep whose directory is ``--runs-dir``
   (:func:`lib.catalog.sweep_cells`; a finished run is reused by the package's one rule).
2. For every epoch of the FGSM run, on the preset's probe set (1000 class-balanced test images):
   each candidate's accuracy on the clean images, on the FGSM δ of that epoch's model and on
   random-sign noise of the same ε (one seeded draw per epoch; every candidate sees the same δ and
   noise), and what one epoch of the ``strength-ref`` diagnostic costs with it (FGSM δ of the
   current model plus one referee pass over the probe set, the best of 3 timings, one thread).
3. The gap, accuracy on noise − accuracy on FGSM δ (percentage points; the paper: 79.4 − 62 = 17
   before the collapse, 0.7 after): **before** = its mean over the robust phase, the epochs before
   the collapse whose probe PGD accuracy is at least half its peak; **after** = its mean over the
   last 5 epochs. The collapse epoch is the first from which probe PGD accuracy stays below a
   third of its peak (docs/quick-preset.md).
4. Ships the candidate with the largest gap before among those whose gap after is at most
   :data:`AFTER_MAX` points (ties: the cheaper): ``robustdrop/diagnostics/referees/quick.pt`` (weights
   and config) and ``quick.json`` (provenance: config, seed, data checksum, final clean / PGD
   accuracy, SHA-256, the runs it came from, this comparison), and writes ``docs/referee.md``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from lib.catalog import sweep_cells
from lib.outputs import write_text
from lib.setting import run_script

from robustdrop.attacks import FGSM, project, sign_noise
from robustdrop.data import CIFAR10_JPEG_SHA256, iterate_eval, load_dataset, probe_indices
from robustdrop.diagnostics import ReferenceSource, build_reference, find_reference
from robustdrop.diagnostics.referees import BUILTIN_DIR, write_builtin
from robustdrop.engine import TrackConfig, make_config
from robustdrop.environment import git_commit, versions
from robustdrop.formatting import format_eps, markdown_table
from robustdrop.plots.runs import eval_curve, open_run
from robustdrop.store import RunStore, load_checkpoint_file, result_checkpoint

REPO = Path(__file__).resolve().parents[1]
PRESET = "quick"
# 2.5ε/3 for ε = 10/255, to the 6 significant digits the candidates were first trained with.
PGD3_STEP = 0.0326797
FGSM_RUN = ("fgsm-ckpt", dict(method="fgsm", checkpoint_every=1))


@dataclass(frozen=True)
class Candidate:
    name: str
    overrides: dict[str, Any]
    what: str


CANDIDATES = [
    Candidate("cnn1w4-pgd3", dict(model="cnn1", width=4), "cnn1, 4 filters: the trained model's own architecture"),
    Candidate("cnn1w16-pgd3", dict(model="cnn1", width=16), "cnn1, 16 filters: a wider one-layer CNN"),
    Candidate("smallcnn8-pgd3", dict(model="smallcnn", width=8), "smallcnn, width 8: four conv-BN-ReLU layers"),
]
AFTER_MAX = 0.02  # the gap after the collapse must be within 2 points: FGSM δ has become noise
LAST_EPOCHS = 5
COMMAND = "python analyses/make_reference.py --preset quick"


def cells() -> dict[str, dict[str, Any]]:
    """The sweep cells: the FGSM run and every candidate, as overrides over the preset."""
    pgd3 = dict(method="pgd", pgd_steps=3, alpha=PGD3_STEP, eval_every=5)
    return {FGSM_RUN[0]: dict(FGSM_RUN[1]), **{c.name: {**pgd3, **c.overrides} for c in CANDIDATES}}


def ensure_runs(runs_dir: Path, names: Sequence[str], threads: int) -> None:
    """Reuse, resume or train the runs ``names`` (cells of one sweep in ``runs_dir``), one at a time."""
    result = sweep_cells(runs_dir, cells(), names, preset=PRESET, fixed={"diagnostics": ["none"]}, threads=threads)
    if result.failed or result.stopped:
        raise SystemExit(f"runs not finished: {', '.join(result.failed + result.stopped)} (logs in {runs_dir}/logs)")


# ---------------------------------------------------------------------------------------------
# the comparison
# ---------------------------------------------------------------------------------------------
def phases(pgd: pd.Series) -> tuple[list[int], list[int], int | None, int]:
    """``(robust-phase epochs, last epochs, collapse epoch, peak epoch)`` of a probe PGD curve."""
    peak_epoch, peak = int(pgd.idxmax()), float(pgd.max())
    below = pgd < peak / 3
    collapse = next((int(e) for e in pgd.index if e > peak_epoch and below[pgd.index >= e].all()), None)
    end = collapse if collapse is not None else int(pgd.index.max()) + 1
    robust = [int(e) for e in pgd.index if e < end and pgd[e] >= peak / 2]
    return robust, [int(e) for e in pgd.index[-LAST_EPOCHS:]], collapse, peak_epoch


def referee_accuracies(fgsm_dir: Path, referees: dict[str, torch.nn.Module], probe: tuple[torch.Tensor, torch.Tensor],
                       epsilon: float) -> tuple[pd.DataFrame, dict[str, float], float]:
    """Per epoch of the FGSM run and referee: accuracy on clean images, FGSM δ and sign noise; the
    best-of-3 seconds of one referee pass over the probe set and of the FGSM δ of one epoch."""
    cfg = TrackConfig.from_dict(RunStore.open(fgsm_dir).read_json(RunStore.CONFIG))
    model_src = {int(p.stem.split("_")[1]): p for p in sorted((fgsm_dir / "checkpoints").glob("epoch_*.pt"))}
    rows, pass_s, fgsm_s = [], {name: math.inf for name in referees}, math.inf
    for epoch, path in model_src.items():
        current = build_reference(ReferenceSource(path, path, cfg.to_dict(), load_checkpoint_file(path)["model"], epoch),
                                  num_classes=10, image_shape=(3, 32, 32))
        gen = torch.Generator().manual_seed(1000 + epoch)
        batches = list(iterate_eval(*probe, 500, torch.device("cpu")))
        start = time.perf_counter()
        deltas = [FGSM(epsilon)(current, x, y) for x, y in batches]
        fgsm_s = min(fgsm_s, time.perf_counter() - start)
        noises = [project(x, sign_noise(x, epsilon, gen), epsilon) for x, _ in batches]
        for name, ref in referees.items():
            hits = {"clean": 0, "fgsm": 0, "noise": 0}
            with torch.no_grad():
                for (x, y), d, z in zip(batches, deltas, noises):
                    hits["fgsm"] += int((ref(x + d).argmax(1) == y).sum())
                    hits["clean"] += int((ref(x).argmax(1) == y).sum())
                    hits["noise"] += int((ref(x + z).argmax(1) == y).sum())
            rows.append({"referee": name, "epoch": epoch, **{k: v / len(probe[1]) for k, v in hits.items()}})
    for name, ref in referees.items():
        for _ in range(3):
            start = time.perf_counter()
            with torch.no_grad():
                for x, _ in batches:
                    ref(x)
            pass_s[name] = min(pass_s[name], time.perf_counter() - start)
    return pd.DataFrame(rows), pass_s, fgsm_s


def final_accuracy(run_dir: Path) -> dict[str, Any]:
    """The run's last evaluation on the test set (else the probe set): clean, FGSM and PGD with specs."""
    df = open_run(run_dir).metrics
    out: dict[str, Any] = {}
    for split in ("test", "probe"):
        rows = df[(df["source"] == "eval") & (df["split"] == split) & (df["metric"] == "acc")]
        if rows.empty:
            continue
        last = rows[rows["epoch"] == rows["epoch"].max()]
        for _, r in last.iterrows():
            spec = (f"ε={format_eps(r['epsilon'])}, {int(r['steps'])} steps of {format_eps(r['step_size'])}, "
                    f"{int(r['restarts'])} restart(s)") if r["attack"] == "pgd" else (
                f"ε={format_eps(r['epsilon'])}" if r["attack"] == "fgsm" else "")
            out[f"{split}_{r['attack']}"] = {"value": float(r["value"]), "n": int(r["n"]), "epoch": int(r["epoch"]),
                                            "split": split, "attack": r["attack"], "spec": spec}
    return out


def compare(runs_dir: Path, candidates: Sequence[Candidate] = CANDIDATES) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The candidates table (one row per candidate) and the FGSM run's phases."""
    cfg = make_config(PRESET)
    data = load_dataset(cfg.dataset)
    idx = probe_indices(data.test_y, cfg.probe_size, cfg.seed)
    probe = (data.test_x[idx], data.test_y[idx])
    fgsm_dir = runs_dir / FGSM_RUN[0]
    pgd = eval_curve(open_run(fgsm_dir).metrics)
    robust, last, collapse, peak_epoch = phases(pgd)
    referees = {}
    for cand in candidates:
        src = find_reference(runs_dir / cand.name)
        referees[cand.name] = build_reference(src, num_classes=data.num_classes, image_shape=data.image_shape)
    acc, pass_s, fgsm_s = referee_accuracies(fgsm_dir, referees, probe, cfg.epsilon)
    acc["gap"] = acc["noise"] - acc["fgsm"]
    rows = []
    for cand in candidates:
        a = acc[acc["referee"] == cand.name].set_index("epoch")
        final = final_accuracy(runs_dir / cand.name)
        weights = sum(p.numel() for p in referees[cand.name].parameters())
        rows.append({
            "candidate": cand.name, "what": cand.what, "params": weights, "kb_fp32": weights * 4 / 1024,
            "test_clean": final.get("test_none", {}).get("value", math.nan),
            "test_pgd": final.get("test_pgd", {}).get("value", math.nan),
            "probe_clean": float(a["clean"].mean()), "noise": float(a["noise"].mean()),
            "fgsm_at_peak": float(a.loc[peak_epoch, "fgsm"]), "gap_at_peak": float(a.loc[peak_epoch, "gap"]),
            "gap_before": float(a.loc[robust, "gap"].mean()), "gap_after": float(a.loc[last, "gap"].mean()),
            "referee_pass_s": pass_s[cand.name], "epoch_s": pass_s[cand.name] + fgsm_s,
        })
    table = pd.DataFrame(rows)
    info = {"robust_epochs": robust, "last_epochs": last, "collapse": collapse, "peak_epoch": peak_epoch,
            "peak_pgd": float(pgd.max()), "per_epoch": acc}
    return table, info


def choose(table: pd.DataFrame) -> tuple[str, str]:
    """The candidate to ship and why (see the module docstring, step 4)."""
    ok = table[table["gap_after"].abs() <= AFTER_MAX]
    if ok.empty:
        raise SystemExit(f"no candidate's gap after the collapse is within {AFTER_MAX * 100:.0f} points; nothing shipped")
    best = ok.sort_values(["gap_before", "epoch_s"], ascending=[False, True]).iloc[0]
    return str(best["candidate"]), (
        f"the largest gap before the collapse ({best['gap_before'] * 100:.1f} points) among the candidates whose gap "
        f"after it is within {AFTER_MAX * 100:.0f} points ({best['gap_after'] * 100:.1f})")


# ---------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------
def table_markdown(table: pd.DataFrame) -> str:
    header = ["candidate", "params (KB fp32)", "test clean / PGD-20 %", "referee on noise %",
              "on FGSM δ at the PGD peak %", "gap before (pts)", "gap at peak", "gap after (pts)",
              "s/epoch (referee pass; + FGSM δ)"]
    body = [[r["candidate"], f"{r['params']:,} ({r['kb_fp32']:.0f})",
             f"{r['test_clean'] * 100:.1f} / {r['test_pgd'] * 100:.1f}", f"{r['noise'] * 100:.1f}",
             f"{r['fgsm_at_peak'] * 100:.1f}", f"{r['gap_before'] * 100:.1f}", f"{r['gap_at_peak'] * 100:.1f}",
             f"{r['gap_after'] * 100:.1f}", f"{r['referee_pass_s']:.2f}; {r['epoch_s']:.2f}"]
            for _, r in table.iterrows()]
    return markdown_table(header, body)


def ship(runs_dir: Path, name: str, why: str, table: pd.DataFrame, info: dict[str, Any]) -> tuple[Path, Path]:
    """Write ``builtin:quick`` from candidate ``name``'s result checkpoint, with its provenance."""
    run = runs_dir / name
    store = RunStore.open(run)
    config, manifest = store.read_json(RunStore.CONFIG), store.read_json(RunStore.MANIFEST)
    checkpoint = result_checkpoint(run)
    state = load_checkpoint_file(checkpoint)
    data = load_dataset(config["dataset"])
    row = table[table["candidate"] == name].iloc[0]
    provenance = {
        "name": PRESET, "command": COMMAND, "made_by_commit": git_commit(), "made_with": versions(),
        "seed": config["seed"], "epoch": int(state["epoch"]),
        "data": {"dataset": config["dataset"], "archive_sha256": CIFAR10_JPEG_SHA256,
                 "content_sha256": data.fingerprint(), "train_examples": manifest["dataset"]["train"],
                 "val_held_out": manifest["dataset"]["val"]},
        "accuracy": final_accuracy(run),
        "trained_by": {k: manifest.get(k) for k in ("robustdrop", "torch", "git_commit", "device", "threads",
                                                     "start_time", "command")},
        "comparison": {"chosen_because": why, "gap_before": float(row["gap_before"]),
                       "gap_after": float(row["gap_after"]), "fgsm_run_peak_epoch": info["peak_epoch"],
                       "fgsm_run_collapse_epoch": info["collapse"], "table": "docs/referee.md"},
    }
    return write_builtin(PRESET, state["model"], config, provenance, BUILTIN_DIR)


def write_doc(table: pd.DataFrame, info: dict[str, Any], name: str, why: str, out: Path) -> Path:
    robust, last = info["robust_epochs"], info["last_epochs"]
    lines = [
        "# The quick preset's referee (`builtin:quick`)", "",
        "Generated by `" + COMMAND + "` (analyses/make_reference.py); rerun it to reproduce.", "",
        "The paper's Figure 2 measures perturbation strength on a fixed robust **referee**: its accuracy on the FGSM "
        "δ of the model being trained against its accuracy on random noise of the same size. `--preset quick` uses "
        "a referee shipped in the package (`robustdrop/diagnostics/referees/quick.pt`, provenance in `quick.json` "
        "beside it, checked against it on every load), so the first command already logs it. Other settings: "
        "`--reference auto` trains one (PGD-5, the run's data, model, ε and schedule, at most 30 epochs) once and "
        "caches it.", "",
        "## Candidates", "",
        "All PGD-3-trained (step 2.5ε/3) with the quick preset's data (CIFAR-10 JPEG copy, 1000 examples held out), "
        "ε = 10/255, Adam cyclic LR to 0.003, 30 epochs, seed 0. Measured on the FGSM quick run `fgsm-ckpt` "
        f"(seed 0; probe PGD-20 peak {info['peak_pgd'] * 100:.1f}% at epoch {info['peak_epoch']}, collapse at epoch "
        f"{info['collapse']}) with its checkpoint of every epoch, on the 1000 probe images: "
        f"**gap** = referee accuracy on random-sign noise − on the FGSM δ of the current model, in points; "
        f"*before* = mean over the robust phase (epochs {robust[0]}–{robust[-1]}: before the collapse, PGD accuracy "
        f"≥ half its peak), *after* = mean over epochs {last[0]}–{last[-1]}. The paper (PreActResNet18, PGD-10 "
        "referee): 79.4 − 62 = 17 points before, 0.7 after. Cost: seconds per epoch of the referee's pass over the "
        "probe set and of that plus the FGSM δ (best of 3, one thread, on a shared 2-core CPU).", "",
        table_markdown(table), "",
        f"**Shipped: `{name}`**: {why}.", "",
        "## Per epoch", "",
        "Referee accuracy (%) on FGSM δ / on noise, per epoch of the FGSM run.", "",
    ]
    acc = info["per_epoch"]
    wide = acc.pivot_table(index="epoch", columns="referee", values=["fgsm", "noise"])
    header = ["epoch"] + [f"{c}: FGSM / noise" for c in table["candidate"]]
    body = [[str(e)] + [f"{wide.loc[e, ('fgsm', c)] * 100:.1f} / {wide.loc[e, ('noise', c)] * 100:.1f}"
                        for c in table["candidate"]] for e in wide.index]
    lines += [markdown_table(header, body), ""]
    return write_text(out, "\n".join(lines))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=[PRESET], default=PRESET,
                   help="the preset whose referee to make (only quick ships one; elsewhere use --reference auto)")
    p.add_argument("--runs-dir", type=Path, default=REPO / "runs" / "referee" / PRESET,
                   help="where the FGSM run and the candidates are trained or reused (default: runs/referee/quick)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--candidates", nargs="+", choices=[c.name for c in CANDIDATES], metavar="NAME",
                   help="compare only these candidates (default: all of " + ", ".join(c.name for c in CANDIDATES) + ")")
    p.add_argument("--no-write", action="store_true", help="compare only: do not write the referee or the doc")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    candidates = [c for c in CANDIDATES if args.candidates is None or c.name in args.candidates]
    ensure_runs(args.runs_dir, [FGSM_RUN[0], *(c.name for c in candidates)], args.threads)
    table, info = compare(args.runs_dir, candidates)
    name, why = choose(table)
    print(table_markdown(table))
    print(f"ship {name}: {why}")
    if not args.no_write:
        for path in ship(args.runs_dir, name, why, table, info):
            print(f"wrote {path}")
        write_doc(table, info, name, why, REPO / "docs" / "referee.md")
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
