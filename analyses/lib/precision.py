"""bf16 against fp32 on the GPU (issue 14, item 4): does bf16 autocast change what we measure?

Two questions, one record (``<runs_dir>/precision.json``, rendered by the GPU plan into
``figures/paper/bf16_vs_fp32.{json,md}``, :func:`precision_markdown`):

* **Evaluation.** The same checkpoints (the PGD-10 referee's final model, the most robust one, and
  FGSM's best model, before its collapse) evaluated on the test set — clean, FGSM, PGD-20 — once in
  fp32 and once under bf16 autocast, with the same PGD random starts. Per attack: both accuracies,
  their difference, and the examples on which the two disagree (robust in fp32 only / in bf16
  only), which tells a real precision effect from noise. Low-precision gradients can make an
  attack look weaker than it is; this measures by how much.
* **Training.** Two short FGSM runs that differ only in ``amp`` (``prec-bf16``, ``prec-fp32`` in
  the catalog): their per-epoch training loss and accuracy, their final models evaluated the same
  way (fp32, test set), and their seconds per epoch (trained side by side with the plan's other
  runs: indicative; the benchmarks part times both precisions alone).

On a CPU bf16 autocast is not used (``autocast_for`` is a no-op there), so only the fp32 half is
measured and the bf16 columns say so; the code path is the same.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lib.catalog import ref_name, run_dir
from lib.setting import Setting
from robustdrop.attacks import Attack, model_mode
from robustdrop.attacks.registry import build_attacks
from robustdrop.data import ImageData, iterate_eval, load_dataset, probe_indices
from robustdrop.diagnostics import build_reference, find_reference
from robustdrop.engine import autocast_for, resolve_device
from robustdrop.evaluation import CachedEvaluation, cached_checkpoint, run_attack_settings
from robustdrop.formatting import fixed, format_pct, markdown_table
from robustdrop.store import BEST, RunStore, atomic_write_text

PRECISION_FILE = "precision.json"
PAIR = ("prec-bf16", "prec-fp32")


def checkpoint_file(path: Path, which: str) -> Path:
    """The checkpoint the table evaluates: ``final`` (``result.pt``, else ``last.pt``) or ``best``."""
    return cached_checkpoint(path, which, CachedEvaluation(best=BEST))


def eval_attacks(cfg: dict[str, Any]) -> dict[str, Attack | None]:
    """Clean, FGSM and the run's evaluation PGD, at its evaluation ε (as the trainer's evaluation)."""
    names = ("clean", "fgsm", "pgd")
    return dict(zip(names, build_attacks(names, run_attack_settings(cfg, num_classes=0, seed=0))))


def correct_per_example(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, cfg: dict[str, Any], *,
                        device: torch.device, autocast: Callable[[], contextlib.AbstractContextManager],
                        seed: int, batch_size: int) -> tuple[dict[str, torch.Tensor], float]:
    """``({attack: (N,) bool correct}, seconds)`` for clean, FGSM and the run's evaluation PGD,
    batches and PGD random starts as :func:`robustdrop.engine.evaluate` (one generator, seeded)."""
    attacks = eval_attacks(cfg)
    generator = torch.Generator(device=device).manual_seed(seed)
    out: dict[str, list[torch.Tensor]] = {k: [] for k in attacks}
    channels_last = device.type == "cuda"
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    with model_mode(model, False):
        for x, y in iterate_eval(images, labels, batch_size, device, channels_last=channels_last):
            for name, attack in attacks.items():
                with autocast():
                    x_in = x if attack is None else x + attack(model, x, y, generator)
                    with torch.no_grad():
                        logits = model(x_in).float()
                out[name].append((logits.argmax(1) == y).cpu())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return {k: torch.cat(v) for k, v in out.items()}, time.perf_counter() - start


def compare_checkpoint(setting: Setting, label: str, checkpoint: Path, data: ImageData, device: torch.device,
                       n: int) -> dict[str, Any]:
    """fp32 vs bf16 autocast evaluation of one checkpoint on ``n`` test images (all when 0)."""
    source = find_reference(checkpoint)
    cfg = source.config
    model = build_reference(source, num_classes=data.num_classes, image_shape=data.image_shape, device=device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    n_all = len(data.test_y)
    n = n_all if n <= 0 else min(n, n_all)
    idx = probe_indices(data.test_y, n, setting.seed + 1) if n < n_all else torch.arange(n_all)
    images, labels = data.test_x[idx], data.test_y[idx]
    kw = dict(device=device, seed=setting.seed, batch_size=int(cfg.get("eval_batch_size", 500)))
    fp32, fp32_s = correct_per_example(model, images, labels, cfg, autocast=contextlib.nullcontext, **kw)
    bf16 = bf16_s = None
    if device.type == "cuda":
        bf16, bf16_s = correct_per_example(model, images, labels, cfg, autocast=autocast_for(device, True), **kw)
    attacks: dict[str, Any] = {}
    for name, ok32 in fp32.items():
        row: dict[str, Any] = {"fp32_acc": float(ok32.float().mean()), "bf16_acc": None, "bf16_minus_fp32": None,
                               "robust_fp32_only": None, "robust_bf16_only": None}
        if bf16 is not None:
            ok16 = bf16[name]
            row.update(bf16_acc=float(ok16.float().mean()),
                       bf16_minus_fp32=float(ok16.float().mean() - ok32.float().mean()),
                       robust_fp32_only=int((ok32 & ~ok16).sum()), robust_bf16_only=int((ok16 & ~ok32).sum()))
        attacks[name] = row
    return {"model": label, "checkpoint": str(checkpoint), "epoch": source.epoch, "n": n,
            "pgd": eval_attacks(cfg)["pgd"].spec().describe(), "attacks": attacks,
            "seconds_fp32": fp32_s, "seconds_bf16": bf16_s,
            "bf16": "bf16 autocast on CUDA" if bf16 is not None else "not measured: no CUDA (bf16 autocast is off on a CPU)"}


def training_pair(setting: Setting, data: ImageData, device: torch.device) -> dict[str, Any]:
    """The two short FGSM runs: per-epoch curves, seconds per epoch, and their final models
    evaluated the same way (fp32, test set)."""
    from robustdrop.plots.runs import eval_curve, metric_curve, open_run, train_seconds_per_epoch  # matplotlib

    out: dict[str, Any] = {}
    for name in PAIR:
        path = run_dir(setting, name)
        run = open_run(path)
        df = run.metrics
        curve = {
            "train_loss": metric_curve(df, source="train", metric="loss", attack=run.config["method"],
                                       split="train").round(6).tolist(),
            "train_acc": metric_curve(df, source="train", metric="acc", attack=run.config["method"],
                                      split="train").round(6).tolist(),
            "probe_pgd_own_eval": eval_curve(df).round(6).tolist(),
        }
        final = compare_checkpoint(setting, name, checkpoint_file(path, "final"), data, device, setting.eval_n)
        out[name] = {"amp": bool(run.config["amp"]), "epochs": int(run.config["epochs"]),
                     "train_subset": int(run.config["train_subset"]), "curves": curve,
                     "train_s_per_epoch": train_seconds_per_epoch(df),
                     "final_fp32_eval": {k: v["fp32_acc"] for k, v in final["attacks"].items()},
                     "final_eval_n": final["n"], "final_eval_pgd": final["pgd"]}
    return out


def measure_precision(setting: Setting) -> Path:
    """Both comparisons; writes ``<runs_dir>/precision.json`` and returns its path."""
    device = resolve_device(setting.device)
    ref = run_dir(setting, ref_name(setting))
    cfg = RunStore.open(ref).read_json(RunStore.CONFIG)
    data = load_dataset(cfg["dataset"], data_dir=cfg.get("data_dir"))  # the data the runs trained on
    checkpoints = [(f"{ref.name} (referee), final", checkpoint_file(ref, "final")),
                   ("fgsm, best (before the collapse)", checkpoint_file(run_dir(setting, "fgsm"), "best"))]
    record = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "evaluation": [compare_checkpoint(setting, label, ckpt, data, device, setting.eval_n)
                       for label, ckpt in checkpoints],
        "training": training_pair(setting, data, device),
    }
    target = setting.runs_dir / PRECISION_FILE
    atomic_write_text(target, json.dumps(record, indent=2) + "\n")
    print(f"wrote {target}", flush=True)
    return target


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
