"""Two quick runs sharing the CPU at once, with and without ``OMP_WAIT_POLICY=PASSIVE``.

``robustdrop track`` sets ``OMP_WAIT_POLICY=PASSIVE`` unless the user set it (robustdrop/_threads.py);
before, it was unset (libgomp's default: idle threads spin for a while). This starts ``--runs``
processes at the same moment, each a short form of the quick preset (``--epochs`` epochs on a
``--train-subset`` of the training set, no diagnostics, a 200-image probe) with torch's default
number of threads (one per core), once per wait policy, and reports each process's wall time. The
machine's load average and its busiest other processes are printed before each scenario, since
on a shared machine they are part of the measurement.

    python benchmarks/bench_threads.py                          # 2 runs x 2 epochs x 10000 images, unset vs PASSIVE
    python benchmarks/bench_threads.py --epochs 3 --train-subset 0 --policies unset PASSIVE ACTIVE
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from robustdrop.environment import environment

REPO = Path(__file__).resolve().parents[1]

# One short quick run through the Python API (the CLI would set the policy itself).
RUN = """
import sys, time
start = time.perf_counter()
from robustdrop import make_config, track
cfg = make_config("quick", epochs={epochs}, train_subset={subset}, diagnostics=["none"], probe_size=200,
                  val_size=0, threads={threads})
track(cfg, runs_dir=sys.argv[1], name=sys.argv[2], progress=False)
print(f"WALL {{time.perf_counter() - start:.2f}}")
"""


def busiest(exclude: set[int], k: int = 4) -> list[str]:
    """The ``k`` busiest other processes (``ps``), as ``pid %cpu command``."""
    try:
        out = subprocess.run(["ps", "-eo", "pid,pcpu,args", "--sort=-pcpu"], capture_output=True, text=True,
                             timeout=10).stdout.splitlines()[1:]
    except (OSError, subprocess.SubprocessError):
        return []
    rows = []
    for line in out:
        pid, cpu, cmd = line.strip().split(None, 2)
        if int(pid) not in exclude and float(cpu) >= 5:
            rows.append(f"{pid} {cpu}% {cmd[:110]}")
    return rows[:k]


def scenario(policy: str, args: argparse.Namespace, runs_dir: Path) -> list[float]:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if policy != "unset":
        env["OMP_WAIT_POLICY"] = policy
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    code = RUN.format(epochs=args.epochs, subset=args.train_subset, threads=args.threads)
    print(f"\n[{policy}] load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; busiest other processes:")
    for row in busiest({os.getpid()}):
        print(f"    {row}")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(runs_dir), f"{policy}-{i}"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(args.runs)]
    walls = []
    for p in procs:
        out, _ = p.communicate()
        line = next((ln for ln in out.splitlines() if ln.startswith("WALL ")), None)
        if p.returncode != 0 or line is None:
            raise SystemExit(f"[{policy}] a run failed:\n{out[-2000:]}")
        walls.append(float(line.split()[1]))
    print(f"[{policy}] wall seconds per run: {', '.join(f'{w:.1f}' for w in walls)} (max {max(walls):.1f})")
    return walls


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=2, help="concurrent runs (default 2)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--train-subset", type=int, default=10000, help="training examples (0 = all 49000)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per run (default 0: torch's default)")
    p.add_argument("--policies", nargs="+", default=["unset", "PASSIVE"],
                   help="OMP_WAIT_POLICY values to compare; 'unset' = libgomp's default (the old CLI)")
    args = p.parse_args()
    env = environment()
    print(f"{args.runs} concurrent quick runs, {args.epochs} epochs on {args.train_subset or 49000} images, "
          f"threads {args.threads or 'default'}; torch {env['torch']}, {env['cpus']} logical CPUs")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for policy in args.policies:
            results[policy] = scenario(policy, args, Path(tmp))
    print("\n| OMP_WAIT_POLICY | wall s per run | slowest |\n|---|---|---|")
    for policy, walls in results.items():
        print(f"| {policy} | {', '.join(f'{w:.1f}' for w in walls)} | {max(walls):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
