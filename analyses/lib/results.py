"""What the GPU plan leaves behind: metrics-only copies of its runs, the benchmark and precision
records and their tables, the README's results section, the plan's record, and one bundle.

Everything goes into the results folder (``figures/paper/``), which a command packs into
``<bundle>/paper.tar.gz`` (with ``gpu_plan.json`` and the command's log beside it) — the files
that come back from a GPU machine, small enough (no checkpoints) to come back and be committed.
"""

from __future__ import annotations

import io
import json
import math
import re
import shutil
import tarfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from lib.outputs import write_text
from lib.plan import RECORD_FILE, RESTORED, RUN_FILES
from robustdrop.formatting import fixed, format_pct, markdown_table
from robustdrop.store import atomic_write_bytes, atomic_write_text

BUNDLE = "paper.tar.gz"
BUNDLE_LIMIT = 16 * 2**20  # one file that comes back from the GPU machine
README_BEGIN = "<!-- gpu-plan results: written by analyses/gpu_plan.py, do not edit by hand -->"
README_END = "<!-- /gpu-plan results -->"


def export_runs(runs_dir: Path, results: Path, names: Iterable[str], snapshots: Iterable[str] = ("fgsm",)) -> list[str]:
    """Copy each run's metrics, config, manifest, events and cached evaluation (no checkpoints)
    into ``results/runs/<name>/``, and the perturbation snapshots of the runs ``snapshots``
    (Figure 1's; about 30 KB per epoch); returns the names copied."""
    copied = []
    for name in names:
        source = runs_dir / name
        if not (source / "config.json").is_file():
            continue
        target = results / "runs" / name
        fresh = target.with_name(f".{name}.tmp")
        shutil.rmtree(fresh, ignore_errors=True)
        fresh.mkdir(parents=True)
        for file in RUN_FILES:
            if (source / file).is_file():
                shutil.copy2(source / file, fresh / file)
        snaps = source / "arrays" / "snapshots"
        if name in snapshots and snaps.is_dir():
            shutil.copytree(snaps, fresh / "arrays" / "snapshots")
        shutil.rmtree(target, ignore_errors=True)
        fresh.rename(target)
        copied.append(name)
    return copied


def copy_record(runs_dir: Path, results: Path, name: str) -> Path | None:
    source = runs_dir / name
    if not source.is_file():
        return None
    results.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source, results / name)
    return results / name


# ------------------------------------------------------------------------------------------------
# Tables of the benchmark and precision records
# ------------------------------------------------------------------------------------------------
def benchmarks_markdown(bench: dict[str, Any], run_seconds: dict[str, float]) -> str:
    """``benchmarks.md``: the three benchmarks and the runs' own seconds per epoch."""
    train, apart = bench["bench_train"], bench["bench_apart"]
    lines = [f"# CUDA benchmarks ({bench['device']})", "",
             f"Measured with the GPU to themselves by `analyses/gpu_plan.py` (part `bench`, {bench['scale']}); "
             f"{bench['seconds']:.0f} s in all. Raw numbers: `benchmarks.json`.", "",
             "## Engine against bare compute (`benchmarks/bench_train.py`)", "",
             f"FGSM epoch of {train['model']} on {train['train_subset']} examples, median of {train['repeats']} "
             f"epochs: engine **{train['engine_s']:.2f} s**, bare loop {train['bare_s']:.2f} s, ratio "
             f"**{train['ratio']:.3f}** (goal ≤ 1.10).", "",
             "## APART / PGD-10 (`benchmarks/bench_apart.py`)", "",
             f"{apart['n']} examples, width {apart['width']:g}, batch {apart['batch_size']}, methods interleaved, "
             "fastest epoch:", ""]
    rows = [[m, f"{v['best_s']:.2f}", f"{v['median_s']:.2f}", f"{v['best_s'] / apart['methods']['pgd']['best_s']:.3f}"]
            for m, v in apart["methods"].items()]
    lines += [markdown_table(["method", "best s/epoch", "median s/epoch", "vs PGD-10"], rows), "",
              f"APART / PGD-10 = **{apart['apart_over_pgd10']:.3f}** (pass-count bound 2/11 = "
              f"{apart['pass_count_bound']:.3f}; the paper: about 1/4).", "",
              "## Forward-pass equivalents and FLOP rate (`benchmarks/bench_costs.py`)", ""]
    for precision, c in bench["bench_costs"].items():
        fe = ", ".join(f"{k} {v:.2f}" for k, v in c["fe"].items() if k != "forward")
        lines.append(f"* {precision}, batch {c['batch_size']}: forward {c['forward_gflop_per_image']:.3f} GFLOP/image, "
                     f"achieved {c['forward_tflops_achieved']:.1f} TFLOP/s in the forward pass; FE: {fe}.")
    if run_seconds:
        lines += ["", "## The plan's runs (trained side by side with the others)", "",
                  markdown_table(["run", "train s/epoch (median)"],
                                 [[k, fixed(v, 1)] for k, v in run_seconds.items()]),
                  "", "These ran concurrently with other trainings on the same GPU: indicative only."]
    return "\n".join(lines) + "\n"


def _pct(x: Any) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format_pct(x, 2)


def precision_markdown(rec: dict[str, Any]) -> str:
    """``bf16_vs_fp32.md``: evaluation of the same checkpoints, and the training pair."""
    lines = [f"# bf16 autocast against fp32 ({rec['device']})", "",
             "Written by `analyses/gpu_plan.py` (part `bf16`, `analyses/lib/precision.py`); raw numbers: "
             "`bf16_vs_fp32.json`.", "", "## The same checkpoint evaluated in fp32 and under bf16 autocast", ""]
    for ev in rec["evaluation"]:
        lines += [f"{ev['model']} (epoch {ev['epoch']}), n = {ev['n']} test images, PGD: {ev['pgd']}; "
                  f"bf16: {ev['bf16']}; seconds fp32 {ev['seconds_fp32']:.1f}"
                  + (f", bf16 {ev['seconds_bf16']:.1f}" if ev["seconds_bf16"] is not None else "") + ".", ""]
        rows = []
        for attack, a in ev["attacks"].items():
            rows.append([attack, _pct(a["fp32_acc"]), _pct(a["bf16_acc"]),
                         "—" if a["bf16_minus_fp32"] is None else f"{100 * a['bf16_minus_fp32']:+.2f}",
                         "—" if a["robust_fp32_only"] is None else str(a["robust_fp32_only"]),
                         "—" if a["robust_bf16_only"] is None else str(a["robust_bf16_only"])])
        lines += [markdown_table(["attack", "fp32 acc %", "bf16 acc %", "bf16 − fp32 (points)",
                                  "correct in fp32 only", "correct in bf16 only"], rows), ""]
    lines += ["## Training in bf16 against fp32 (FGSM, same seed; `prec-bf16`, `prec-fp32`)", ""]
    rows = []
    for name, t in rec["training"].items():
        ev = t["final_fp32_eval"]
        rows.append([name, "bf16 autocast" if t["amp"] else "fp32", str(t["epochs"]),
                     " → ".join(f"{v:.3f}" for v in t["curves"]["train_loss"]), _pct(ev.get("clean")),
                     _pct(ev.get("pgd")), fixed(t["train_s_per_epoch"], 1)])
    lines += [markdown_table(["run", "training", "epochs", "train loss per epoch", "final clean % (fp32 eval)",
                              "final PGD % (fp32 eval)", "train s/epoch"], rows), "",
              "Both final models are evaluated the same way (fp32, the test set); seconds per epoch were measured "
              "side by side with other trainings (indicative)."]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------
# The README's results section
# ------------------------------------------------------------------------------------------------
def readme_section(numbers: dict[str, Any]) -> str:
    """The generated section of ``figures/paper/README.md``: each number next to the paper's."""
    def cell(key: str, fmt: str = "pct") -> str:
        v = numbers.get(key)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "not measured yet"
        return _pct(v) + " %" if fmt == "pct" else (f"{v:.3f}" if fmt == "ratio" else str(v))

    rows = [
        ["FGSM: PGD-20 accuracy at its peak (epoch)", "44.36 % (epoch 20)",
         cell("fgsm_peak_pgd") + (f" (epoch {numbers['fgsm_peak_epoch']})" if numbers.get("fgsm_peak_epoch") else "")],
        ["FGSM: PGD-20 accuracy at the last epoch", "0 % (epoch 30)", cell("fgsm_final_pgd")],
        ["FGSM: collapse onset (detector)", "epoch 21", cell("fgsm_onset", "raw")],
        ["referee on FGSM δ, best epoch before the collapse", "≈ 62 %", cell("ref_fgsm_before")],
        ["referee on FGSM δ, last epoch", "≈ 78.7 %", cell("ref_fgsm_after")],
        ["referee on random-sign noise (mean)", "≈ 79.4 %", cell("ref_noise")],
        ["FGSM+: PGD-20 accuracy at the last epoch", "≈ 46 %", cell("fgsm+_final_pgd")],
        ["APART: PGD-20 accuracy at the last epoch (probe)", "≈ 49 % (test set; a third-party run of the authors' code)",
         cell("apart_final_pgd")],
        ["APART: final test PGD-20 (table)", "comparable to PGD-10", cell("apart_test_pgd")],
        ["PGD-10: final test PGD-20 (table)", "≈ 47 % (peak, 200-epoch figure)", cell("pgd10_test_pgd")],
        ["APART / PGD-10 training cost (benchmark)", "≈ 1/4", cell("apart_over_pgd10", "ratio")],
    ]
    table = markdown_table(["quantity", "paper", "here"], rows)
    status = numbers.get("status", "")
    return "\n".join([README_BEGIN, "", "## Results of the last GPU plan run", "", status, "", table.rstrip(), "",
                      "Accuracies on the fixed 1000-image probe subset of the test set unless the row says test "
                      "(the full test set); the paper's numbers are from `shared/paper.md` (E2, E5, E7).", "",
                      README_END])


def write_readme(results: Path, section: str, template: str) -> Path:
    """Replace the generated section of ``results/README.md`` (the whole file from ``template``
    when it is missing or has no section)."""
    path = results / "README.md"
    text = path.read_text() if path.is_file() else template
    pattern = re.compile(re.escape(README_BEGIN) + ".*?" + re.escape(README_END), re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section + "\n"
    return write_text(path, text)


# ------------------------------------------------------------------------------------------------
# The record and the bundle
# ------------------------------------------------------------------------------------------------
def write_record(results: Path, record: dict[str, Any]) -> Path:
    results.mkdir(parents=True, exist_ok=True)
    target = results / RECORD_FILE
    atomic_write_text(target, json.dumps(record, indent=2, default=str) + "\n")
    return target


def pack(results: Path, bundle: Path, extra: Sequence[Path] = ()) -> list[Path]:
    """``bundle/paper.tar.gz`` (the results folder as ``paper/``) and copies of ``extra`` files;
    refuses nothing, but says when the archive is over the 16 MiB a file may have to come back."""
    bundle.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path in sorted(results.rglob("*")):
            if path.is_file() and not path.name.startswith(".") and path.name != RESTORED:
                tar.add(path, arcname=f"paper/{path.relative_to(results)}")
    atomic_write_bytes(bundle / BUNDLE, buf.getvalue())
    out = [bundle / BUNDLE]
    if len(buf.getvalue()) > BUNDLE_LIMIT:
        print(f"WARNING: {bundle / BUNDLE} is {len(buf.getvalue()) / 2**20:.1f} MiB, over the 16 MiB a file may have "
              "to come back from the GPU machine", flush=True)
    for file in extra:
        if file.is_file():
            shutil.copy2(file, bundle / file.name)
            out.append(bundle / file.name)
    return out
