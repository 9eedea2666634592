"""The CUDA benchmarks of the GPU plan, measured with the GPU to themselves (nothing else of the
plan runs meanwhile): the scripts of ``benchmarks/``, called as functions.

* ``bench_train``: FGSM epoch of the engine against the bare compute of the same passes (goal
  ≤ 1.10), PreActResNet18 at full width on a train subset;
* ``bench_apart``: APART, FGSM+, FGSM and PGD-10 epochs on the same batches, interleaved: the
  APART / PGD-10 cost ratio (the paper: about 1/4; pass-count bound 2/11);
* ``bench_costs``: the forward-pass equivalents (FE) of every piece of a run and the achieved FLOP
  rate, in bf16 autocast and in fp32: what ``lib.estimate`` should assume next time.

Writes ``<runs_dir>/benchmarks.json``. Sizes per scale in :data:`SIZES` (``--smoke``: tiny).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from lib.catalog import load_data
from lib.setting import REPO, Setting
from robustdrop.engine import resolve_device
from robustdrop.environment import device_name, environment
from robustdrop.store import atomic_write_text

BENCH_FILE = "benchmarks.json"
SIZES = {
    "paper": dict(width=1.0, train_subset=10000, apart_n=10240, repeats=2, cost_batch=128, cost_repeats=5),
    "smoke": dict(width=1 / 16, train_subset=256, apart_n=256, repeats=1, cost_batch=32, cost_repeats=1),
}


def _scripts() -> tuple[Any, Any, Any]:
    folder = str(REPO / "benchmarks")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    import bench_apart
    import bench_costs
    import bench_train
    return bench_train, bench_apart, bench_costs


def run_benchmarks(setting: Setting) -> Path:
    """Run the three benchmarks at the setting's size; returns the path of ``benchmarks.json``."""
    bench_train, bench_apart, bench_costs = _scripts()
    size = SIZES["smoke" if setting.smoke else "paper"]
    device = resolve_device(setting.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    start = time.perf_counter()
    dataset = "synthetic" if setting.smoke else setting.dataset or "cifar10"
    data = load_data(setting, {"dataset": dataset, "data_dir": setting.data_dir})
    args = argparse.Namespace(dataset=dataset, train_subset=size["train_subset"], repeats=size["repeats"],
                              batch_size=128 if not setting.smoke else 64, device=str(device))
    train = bench_train.measure(args, "preactresnet18", size["width"], data=data)
    print(f"bench_train: engine {train['engine_s']:.3f} s/epoch, bare {train['bare_s']:.3f}, "
          f"ratio {train['ratio']:.3f}", flush=True)

    args = argparse.Namespace(model="preactresnet18", width=size["width"], n=size["apart_n"], batch_size=128,
                              repeats=size["repeats"], methods=["fgsm", "pgd", "fgsm+", "apart"])
    times = bench_apart.bench(device, args)
    apart = {m: {"best_s": min(ts), "median_s": statistics.median(ts), "epochs": len(ts)} for m, ts in times.items()}
    ratio = min(times["apart"]) / min(times["pgd"])

    costs = {}
    for fp32 in (False, True):
        args = argparse.Namespace(device=str(device), model="preactresnet18", width=size["width"],
                                  batch_size=size["cost_batch"], repeats=size["cost_repeats"], eval_pgd_steps=20,
                                  methods=["fgsm", "pgd", "fgsm+", "apart"], fp32=fp32)
        costs["fp32" if fp32 or device.type != "cuda" else "bf16"] = bench_costs.measure(args)
        if device.type != "cuda":
            break  # a CPU has one precision here
    record = {
        "device": device_name(device), "environment": environment(), "scale": setting.tag,
        "bench_train": {**train, "train_subset": size["train_subset"], "repeats": size["repeats"], "method": "fgsm",
                        "goal": "engine / bare <= 1.10"},
        "bench_apart": {"methods": apart, "n": size["apart_n"], "width": size["width"], "batch_size": 128,
                        "apart_over_pgd10": ratio, "pass_count_bound": 2 / 11,
                        "note": "fastest epoch of each method, methods interleaved; PGD-10 step 2/255"},
        "bench_costs": costs,
        "seconds": time.perf_counter() - start,
    }
    target = setting.runs_dir / BENCH_FILE
    atomic_write_text(target, json.dumps(record, indent=2) + "\n")
    print(f"wrote {target} (APART / PGD-10 {ratio:.3f}; engine / bare {train['ratio']:.3f})", flush=True)
    return target
