"""The three benchmarks behind the paper's cost claims, as one JSON record (the GPU plan's ``bench`` part).

``bench_train`` (engine / bare compute per epoch; goal ≤ 1.10), ``bench_apart`` (APART / PGD-10 per
epoch, the methods interleaved) and ``bench_costs`` (forward-pass equivalents and the achieved FLOP
rate; on CUDA under bf16 autocast and in fp32), PreActResNet18 at full width; ``--smoke``: the same
code in seconds (width 1/16, a few hundred images). ``analyses/gpu_plan.py`` calls :func:`measure`
with the plan's data, the GPU to itself.

    python benchmarks/bench_paper.py --json benchmarks.json          # on the GPU the paper's runs use
    python benchmarks/bench_paper.py --smoke --device cpu            # the code path, on a CPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import bench_apart
import bench_costs
import bench_train

from robustdrop.data import make_synthetic
from robustdrop.engine import resolve_device
from robustdrop.environment import device_name

SIZES = {
    "paper": dict(width=1.0, train_subset=10000, apart_n=10240, repeats=2, cost_batch=128, cost_repeats=5),
    "smoke": dict(width=1 / 16, train_subset=256, apart_n=256, repeats=1, cost_batch=32, cost_repeats=1),
}
METHODS = ["fgsm", "pgd", "fgsm+", "apart"]


def measure(device: Any, *, smoke: bool, dataset: str, data: Any = None, scale: str = "paper") -> dict[str, Any]:
    """The record: ``device``, ``scale``, ``seconds`` (the whole measurement), ``bench_train``,
    ``bench_apart`` (best and median seconds per epoch of each method, APART / PGD-10) and
    ``bench_costs`` (per precision). ``data``: bench_train's ImageData (None: it loads ``dataset``)."""
    size, start, ns = SIZES["smoke" if smoke else "paper"], time.perf_counter(), argparse.Namespace
    train = bench_train.measure(ns(dataset=dataset, train_subset=size["train_subset"], repeats=size["repeats"],
                                   batch_size=64 if smoke else 128, device=str(device)),
                                "preactresnet18", size["width"], data=data)
    times = bench_apart.bench(device, ns(model="preactresnet18", width=size["width"], n=size["apart_n"],
                                         batch_size=128, repeats=size["repeats"], methods=METHODS))
    costs = {("fp32" if fp32 or device.type != "cuda" else "bf16"): bench_costs.measure(ns(
        device=str(device), model="preactresnet18", width=size["width"], batch_size=size["cost_batch"],
        repeats=size["cost_repeats"], eval_pgd_steps=20, methods=METHODS, fp32=fp32))
        for fp32 in ((False, True) if device.type == "cuda" else (True,))}
    return {"device": device_name(device), "scale": scale, "seconds": time.perf_counter() - start,
            "bench_train": {**train, "train_subset": size["train_subset"], "goal": "engine / bare <= 1.10"},
            "bench_apart": {"methods": {m: {"best_s": min(t), "median_s": statistics.median(t)}
                                        for m, t in times.items()},
                            "n": size["apart_n"], "apart_over_pgd10": min(times["apart"]) / min(times["pgd"]),
                            "note": "fastest epoch of each method, methods interleaved; PGD-10 step 2/255"},
            "bench_costs": costs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="seconds, not minutes: width 1/16, synthetic data")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dataset", default=None, help="bench_train's data (default: cifar10-jpeg; with --smoke: synthetic, in memory)")
    parser.add_argument("--json", default=None, help="also write the record to this file")
    args = parser.parse_args()
    dataset = args.dataset or ("synthetic" if args.smoke else "cifar10-jpeg")
    data = make_synthetic(n_train=320, n_test=128, seed=0) if dataset == "synthetic" else None
    record = measure(resolve_device(args.device), smoke=args.smoke, dataset=dataset, data=data,
                     scale="paper smoke" if args.smoke else "paper")
    text = json.dumps(record, indent=2) + "\n"
    print(text, end="")
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
