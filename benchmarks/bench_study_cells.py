"""What one cell of the collapse-prediction study costs, per training method.

Trains each of the study's methods (analyses/collapse_prediction.py: FGSM, RS-FGSM, PGD-3, APART,
FGSM+) for two epochs with the study's values (the quick preset, ``--threads 1``,
``--eval-batch-size 128``, default diagnostics), one after another, ``--repeats`` rounds
interleaved so that a change of load on a shared machine hits every method alike. Epoch 1 gives
the seconds of an ordinary epoch (train, evaluation of the probe and validation sets,
diagnostics); epoch 2 also evaluates the full test set, which a 30-epoch cell does once, at its
end. A cell is estimated as ``(epochs − 1) × epoch 1 + epoch 2`` and printed in minutes, with
each method's ratio to FGSM::

    python benchmarks/bench_study_cells.py                 # 1 round, the quick preset's full data
    python benchmarks/bench_study_cells.py --repeats 2 --methods fgsm pgd3

The estimate is for one cell running alone on one thread; two cells at once on two cores take
about as long each when the machine is otherwise idle.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

import pandas as pd

from robustdrop.api import track
from robustdrop.engine import make_config
from robustdrop.environment import environment

METHODS = {
    "fgsm": {"method": "fgsm"},
    "rs-fgsm": {"method": "rs-fgsm"},
    "pgd3": {"method": "pgd", "pgd_steps": 3, "alpha": 2.5 * (10 / 255) / 3},
    "apart": {"method": "apart"},
    "fgsm+": {"method": "fgsm+"},
}


def epoch_seconds(metrics: pd.DataFrame, epoch: int) -> float:
    rows = metrics[(metrics["source"] == "train") & (metrics["epoch"] == epoch)
                   & metrics["metric"].isin(["time_train_s", "time_eval_s", "time_diag_s"])]
    return float(rows["value"].sum())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--repeats", type=int, default=1, help="interleaved rounds over the methods")
    p.add_argument("--epochs", type=int, default=30, help="epochs of the cell the estimate is for")
    args = p.parse_args(argv)
    seen: dict[str, list[tuple[float, float]]] = {m: [] for m in args.methods}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for name in args.methods:
                cfg = make_config("quick", epochs=2, threads=1, eval_batch_size=128, **METHODS[name])
                start = time.perf_counter()
                store = track(cfg, runs_dir=tmp, name=f"{name}-{r}", progress=False)
                m = store.metrics()
                seen[name].append((epoch_seconds(m, 1), epoch_seconds(m, 2)))
                print(f"[{name} round {r}] epoch 1 {seen[name][-1][0]:.1f}s, epoch 2 (with the test set) "
                      f"{seen[name][-1][1]:.1f}s, wall {time.perf_counter() - start:.0f}s", flush=True)
    cell = {n: statistics.median((args.epochs - 1) * a + b for a, b in v) / 60 for n, v in seen.items()}
    base = cell.get("fgsm")
    print(f"\n{'method':<8} {'epoch s':>8} {'test-epoch s':>13} {'cell min':>9} {'vs FGSM':>8}")
    for n, v in seen.items():
        ratio = f"{cell[n] / base:.2f}×" if base else ""
        print(f"{n:<8} {statistics.median(a for a, _ in v):>8.1f} {statistics.median(b for _, b in v):>13.1f} "
              f"{cell[n]:>9.1f} {ratio:>8}")
    print(f"\n{environment()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
