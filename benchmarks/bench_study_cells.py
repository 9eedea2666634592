"""What one cell of the collapse-prediction study costs, per training method.

Runs each of the study's methods (analyses/collapse_prediction.py: FGSM, RS-FGSM, PGD-3, APART,
FGSM+) with the study's values (the quick preset, ``--threads 1``, ``--eval-batch-size 128``,
default diagnostics) twice: for 1 epoch and for 2 epochs, ``--repeats`` rounds interleaved. It
measures the **CPU seconds of this process** (``time.process_time``), which another job on a
shared machine inflates far less than wall time. The 1-epoch run's last epoch also evaluates the
full test set, as a 30-epoch cell does once at its end; the difference of the two runs is one
ordinary epoch (training, probe and validation evaluation, diagnostics). A cell is estimated as
``cpu(1 epoch) + (epochs − 1) × (cpu(2 epochs) − cpu(1 epoch))``, in minutes of one core, with each
method's ratio to FGSM::

    python benchmarks/bench_study_cells.py                 # 1 round, the quick preset's full data
    python benchmarks/bench_study_cells.py --repeats 2 --methods fgsm pgd3

Two cells at once on a 2-core machine take about these minutes each when nothing else runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

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


def cpu_seconds(name: str, epochs: int, runs_dir: str, tag: str) -> float:
    """CPU seconds of this process for one run of ``name`` with ``epochs`` epochs."""
    cfg = make_config("quick", epochs=epochs, threads=1, eval_batch_size=128, **METHODS[name])
    start = time.process_time()
    track(cfg, runs_dir=runs_dir, name=f"{name}-{epochs}-{tag}", progress=False)
    return time.process_time() - start


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
                one, two = cpu_seconds(name, 1, tmp, str(r)), cpu_seconds(name, 2, tmp, str(r))
                seen[name].append((one, two - one))
                print(f"[{name} round {r}] CPU s: 1 epoch (with the test set) {one:.1f}, an ordinary epoch "
                      f"{two - one:.1f}", flush=True)
    cell = {n: statistics.median(last + (args.epochs - 1) * epoch for last, epoch in v) / 60 for n, v in seen.items()}
    base = cell.get("fgsm")
    print(f"\n{'method':<8} {'epoch CPU s':>12} {'last-epoch CPU s':>17} {'cell CPU min':>13} {'vs FGSM':>8}")
    for n, v in seen.items():
        ratio = f"{cell[n] / base:.2f}×" if base else ""
        print(f"{n:<8} {statistics.median(e for _, e in v):>12.1f} {statistics.median(a for a, _ in v):>17.1f} "
              f"{cell[n]:>13.1f} {ratio:>8}")
    print(f"\n{environment()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
