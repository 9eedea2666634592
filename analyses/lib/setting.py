"""The command line every analysis script shares, the scales, and the :class:`Setting` it parses to.

Scales (``--scale``):

* ``quick`` (default): ``make_config("quick", ...)``: its data, model, ε, schedule and epochs; the
  expensive runs are scaled down where said (:data:`KNOBS`).
* ``paper``: ``make_config("paper", dataset="cifar10", data_dir=--data-dir, ...)``: the paper's
  settings (PreActResNet18, CIFAR-10, ε=8/255, PGD-10 referee, 200-epoch long runs); needs a GPU.
  ``--dataset cifar10-jpeg`` runs them on the embedded JPEG copy (no download, no --data-dir).
* ``--smoke``: the same code path in seconds: 2 epochs on a tiny synthetic data set
  (``robustdrop.data.make_synthetic``), the scale's model (a 1/16-width PreActResNet18 for
  ``paper``), written into a temporary runs dir and out dir unless given.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
SCALES = ("quick", "paper")

# Scale knobs of the runs that are not plain preset runs. ``ref_steps``: PGD steps of the
# reference / PGD row (step 2.5ε/k); ``ref_eval_every``: its probe/validation evaluation cadence
# (paper: every 5 epochs, a tenth of a PGD-10 epoch saved each time; the test set every 10 as the
# preset); ``long_*``: the long-run figure (E4); ``cost_*``: the timing runs of table_cost;
# ``prec_*``: the bf16-vs-fp32 training pair of the GPU plan; ``eval_n``: test examples of the
# tables' evaluation (0 = the whole test set); ``aa_n``: test examples of the tables' AutoAttack on
# the final models (0 = all; a subset of the ``eval_n`` images). Standard AutoAttack costs ≈35×
# PGD-20: 500 images ≈ 1.5 CPU-minutes per robust quick model (docs/baselines.md), ±1.8 points
# standard error at 20 % accuracy.
KNOBS: dict[str, dict[str, Any]] = {
    "quick": dict(ref_steps=3, ref_eval_every=1, long_steps=10, long_subset=5000, long_cycle=6, long_epochs=24,
                  long_eval_every=2, long_test_every=None, cost_subset=8192, cost_epochs=3, prec_epochs=3,
                  prec_subset=8192, eval_n=2000, aa_n=500),
    "paper": dict(ref_steps=10, ref_eval_every=5, long_steps=10, long_subset=0, long_cycle=30, long_epochs=200,
                  long_eval_every=2, long_test_every=2, cost_subset=10000, cost_epochs=3, prec_epochs=3,
                  prec_subset=20000, eval_n=0, aa_n=0),
}
QUICK_EVAL_BATCH = 128
SMOKE_KNOBS = dict(ref_eval_every=1, long_subset=0, long_cycle=1, long_epochs=2, long_eval_every=1,
                   long_test_every=None, cost_subset=0, cost_epochs=2, prec_epochs=2, prec_subset=0, eval_n=64,
                   aa_n=16)
# per scale: the paper scale's smoke referee is PGD-2 (PGD-10 is most of a smoke plan's CPU time)
SMOKE_SCALE_KNOBS: dict[str, dict[str, Any]] = {"quick": {}, "paper": dict(ref_steps=2)}
# Tiny synthetic data and settings of --smoke (everything else comes from the scale's preset).
SMOKE_DATA = dict(n_train=320, n_test=128, num_classes=10, size=32, channels=3, seed=0)
SMOKE_CONFIG: dict[str, dict[str, Any]] = {
    "quick": dict(dataset="synthetic", epochs=2, val_size=64, probe_size=64, batch_size=64, eval_batch_size=128,
                  test_every=0, diagnostics=["default", "strength:n=64"]),
    "paper": dict(dataset="synthetic", epochs=2, val_size=32, probe_size=32, batch_size=64, eval_batch_size=256,
                  test_every=0, width=1 / 16, eval_pgd_steps=3, eval_pgd_step_size=4 / 255,
                  diagnostics=["default", "strength:n=32,pgd_steps=2"]),
}


@dataclass
class Setting:
    """Where and how the analyses run (the parsed command line)."""

    scale: str = "quick"
    smoke: bool = False
    runs_dir: Path = field(default_factory=lambda: REPO / "runs" / "analyses" / "quick")
    out: Path = field(default_factory=lambda: REPO / "figures")
    data_dir: str | None = None
    dataset: str | None = None  # None: the scale's (quick: the preset's; paper: cifar10)
    # None: the rule of lib.catalog.reference_deferred (a referee that is a catalog run is measured
    # after training from per-epoch weights, a replay cell each; a shipped one is attached); True/False
    # forces it (tests that compare the two ways; the same numbers).
    deferred_reference: bool | None = None
    ref_epochs: int = 0  # epochs of the reference run (0: the preset's; the GPU plan's --ref-epochs)
    threads: int = 1
    jobs: int = 1
    device: str = "auto"
    seed: int = 0
    eval_n: int = 2000
    aa_n: int = 500
    autoattack: bool = True
    backend: str = "local"  # where the cells run: local processes (--jobs) or a Ray cluster
    max_minutes: float | None = None  # the cells' deadline (stopped ones continue on the next run)

    @property
    def knobs(self) -> dict[str, Any]:
        k = dict(KNOBS[self.scale])
        if self.smoke:
            k.update(SMOKE_KNOBS, **SMOKE_SCALE_KNOBS[self.scale])
        k["eval_n"] = self.eval_n
        k["aa_n"] = self.aa_n
        return k

    @property
    def tag(self) -> str:
        return f"{self.scale}{' smoke' if self.smoke else ''}"


def build_parser(description: str, *, jobs: int = 1, sweep: bool = False) -> argparse.ArgumentParser:
    """The shared options; ``sweep``: also ``--backend`` and ``--max-minutes`` (scripts that run
    catalog cells, :func:`lib.catalog.run_cells`)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=SCALES, default="quick",
                   help="quick: the quick preset on the embedded CIFAR-10 (JPEG copy), CPU; paper: the paper's "
                        "settings on CIFAR-10 (--data-dir), GPU (default: quick)")
    p.add_argument("--smoke", action="store_true",
                   help="seconds-long version on tiny synthetic data, 2 epochs (same code path; writes into a "
                        "temporary folder unless --runs-dir/--out are given)")
    p.add_argument("--runs-dir", type=Path, default=None,
                   help="where the runs live and are reused (default: runs/analyses/<scale>)")
    p.add_argument("--out", type=Path, default=None,
                   help="where figures and tables are written (default: figures/, figures/paper/ for --scale paper)")
    p.add_argument("--data-dir", default=None, help="--scale paper: folder with CIFAR-10's cifar-10-batches-py")
    p.add_argument("--dataset", default=None,
                   help="dataset of every run (default: the quick preset's on quick, cifar10 on paper; "
                        "cifar10-jpeg: the embedded JPEG copy, no --data-dir needed)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads per training process (default: 1 on quick/smoke, torch's default on paper)")
    p.add_argument("--jobs", type=int, default=jobs, help=f"trainings run in parallel processes (default: {jobs})")
    if sweep:
        p.add_argument("--backend", choices=("local", "ray"), default="local",
                       help="where the runs' sweep cells run: local processes (--jobs) or a Ray cluster "
                            "(RAY_ADDRESS; --runs-dir on a file system every node shares) (default: local)")
        p.add_argument("--max-minutes", type=float, default=None,
                       help="deadline for the runs: no run starts after it, running ones checkpoint and stop; the "
                            "same command continues them (default: none)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    p.add_argument("--seed", type=int, default=0, help="seed of every run (default: 0)")
    p.add_argument("--eval-n", type=int, default=None,
                   help="test examples of the tables' final/best evaluation, a seeded class-balanced subset "
                        "(0 = all; default: 2000 on quick, all on paper, 64 with --smoke)")
    p.add_argument("--aa-n", type=int, default=None,
                   help="test examples of the tables' standard AutoAttack on the final models, a seeded class-balanced "
                        "subset (of the --eval-n images when smaller; 0 = all; default: 500 on quick, all on paper, 16 with "
                        "--smoke)")
    p.add_argument("--no-autoattack", dest="autoattack", action="store_false",
                   help="leave the tables' AutoAttack column empty (it needs torchattacks: pip install "
                        "'robustdrop[eval]')")
    return p


def setting_from_args(args: argparse.Namespace) -> Setting:
    scale, smoke = args.scale, bool(args.smoke)
    if args.runs_dir is not None:
        runs_dir = Path(args.runs_dir)
    elif smoke:
        runs_dir = Path(tempfile.mkdtemp(prefix=f"robustdrop-smoke-{scale}-"))
    else:
        runs_dir = REPO / "runs" / "analyses" / scale
    if args.out is not None:
        out = Path(args.out)
    elif smoke:
        out = runs_dir / "figures"
    else:
        out = REPO / "figures" / ("paper" if scale == "paper" else "")
    threads = args.threads if args.threads is not None else (0 if scale == "paper" and not smoke else 1)
    if args.eval_n is not None:
        eval_n = args.eval_n
    else:
        eval_n = SMOKE_KNOBS["eval_n"] if smoke else KNOBS[scale]["eval_n"]
    aa_n = args.aa_n if args.aa_n is not None else (SMOKE_KNOBS["aa_n"] if smoke else KNOBS[scale]["aa_n"])
    return Setting(scale=scale, smoke=smoke, runs_dir=runs_dir, out=out, data_dir=args.data_dir,
                   dataset=args.dataset, threads=threads, jobs=max(1, int(args.jobs)), device=args.device,
                   seed=args.seed, eval_n=eval_n, aa_n=aa_n, autoattack=bool(args.autoattack), backend=getattr(args, "backend", "local"),
                   max_minutes=getattr(args, "max_minutes", None))


def parse_setting(description: str, argv: Sequence[str] | None, *, jobs: int = 1, sweep: bool = False) -> Setting:
    return setting_from_args(build_parser(description, jobs=jobs, sweep=sweep).parse_args(argv))


def run_script(main: Callable[[], int | None]) -> int:
    """A script's exit code: ``main()``'s, or, when a signal stopped its sweep (the cells checkpointed
    and were recorded ``stopped``), one line saying so and the shell's code for that signal (143 for
    SIGTERM) instead of a traceback."""
    from robustdrop.errors import RunInterrupted
    try:
        return main() or 0
    except RunInterrupted as exc:
        print(exc, file=sys.stderr)  # it says how to continue
        return exc.exit_code
