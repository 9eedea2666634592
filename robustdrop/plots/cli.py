"""``robustdrop plot ...`` and ``robustdrop compare ...``.

The main CLI calls :func:`add_plot_parsers` on its sub-parsers, then ``args.func(args)``; every
handler prints what it wrote and returns an exit code. Bad input raises
:class:`RobustdropError` (the main CLI prints its one line and exits 2).

Where figures go (``--out DIR``): by default into the run's own ``plots/`` folder when one run
is given, and into ``figures/`` under the current directory when several runs are compared.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from robustdrop.errors import RobustdropError

_OUT_HELP = "folder for the PNG and PDF (default: <run>/plots/ for one run, figures/ for several)"


def _epochs(values: Sequence[str] | None) -> list[int] | None:
    """``--epochs 20 30`` or ``--epochs 20,30``."""
    if not values:
        return None
    out: list[int] = []
    for value in values:
        for part in str(value).split(","):
            part = part.strip()
            if not part:
                continue
            try:
                out.append(int(part))
            except ValueError:
                raise RobustdropError(f"--epochs takes whole epoch numbers such as `20 30` or `20,30`, not {part!r}") from None
    return out


def default_out(runs: Sequence[str | Path], out: str | Path | None) -> Path:
    if out:
        return Path(out)
    if len(runs) == 1:
        return Path(runs[0]) / "plots"
    return Path("figures")


def _print_paths(paths: Sequence[Path]) -> int:
    for p in paths:
        print(p)
    return 0


def _cmd_collapse(args: argparse.Namespace) -> int:
    from robustdrop.plots.collapse import plot_collapse

    out = default_out(args.runs, args.out)
    return _print_paths(plot_collapse(args.runs, out, paper=args.paper, reference_free=args.reference_free))


def _cmd_perturbations(args: argparse.Namespace) -> int:
    from robustdrop.plots.perturbations import plot_perturbations

    return _print_paths(plot_perturbations(args.run, default_out([args.run], args.out), _epochs(args.epochs)))


def _cmd_landscape(args: argparse.Namespace) -> int:
    from robustdrop.plots.landscape import plot_landscape

    return _print_paths(plot_landscape(args.run, default_out([args.run], args.out), _epochs(args.epochs)))


def _cmd_curves(args: argparse.Namespace) -> int:
    from robustdrop.plots.curves import plot_curves

    return _print_paths(plot_curves(args.runs, default_out(args.runs, args.out), paper=args.paper))


def _cmd_apart(args: argparse.Namespace) -> int:
    from robustdrop.plots.curves import plot_apart

    return _print_paths(plot_apart(args.run, default_out([args.run], args.out)))


_SUFFIX_FORMAT = {".csv": "csv", ".md": "markdown", ".tex": "latex", ".txt": "terminal"}


def _cmd_onset(args: argparse.Namespace) -> int:
    from robustdrop.plots.sweeps import plot_onset

    return _print_paths(plot_onset(args.runs, default_out(args.runs, args.out)))


def _is_sweep(args: argparse.Namespace) -> bool:
    """compare aggregates over seeds for a sweep directory, or with --by-group."""
    from robustdrop.store import is_sweep_dir

    return args.by_group or any(is_sweep_dir(p) for p in args.runs)


def _cmd_compare(args: argparse.Namespace) -> int:
    from robustdrop.plots.tables import compare, format_table, write_robustbench_json
    from robustdrop.store import atomic_write_text

    fmt = args.format or (_SUFFIX_FORMAT.get(Path(args.out).suffix.lower(), "terminal") if args.out else "terminal")
    if args.robustbench and _is_sweep(args):
        raise RobustdropError("--robustbench writes one file per run directory; give run directories, not a sweep")
    if _is_sweep(args):
        from robustdrop.plots.sweeps import compare_sweep, format_sweep_table

        text = format_sweep_table(compare_sweep(args.runs), fmt)
    else:
        text = format_table(compare(args.runs), fmt)
    if args.out:
        out = Path(args.out)
        if out.is_dir():
            raise RobustdropError(f"--out {out} is a folder; give a file name such as {out / 'compare.md'}")
        atomic_write_text(out, text)
        print(out)
    else:
        print(text, end="")
    if args.robustbench:
        for run in args.runs:
            print(write_robustbench_json(run))
    return 0


def add_plot_parsers(subparsers: Any) -> None:
    """Register ``plot`` (collapse, perturbations, landscape, curves, onset, apart) and ``compare``."""
    plot = subparsers.add_parser(
        "plot", help="draw figures from run directories (PNG + PDF)",
        description="Draw figures from run directories; each command prints the files it wrote. --out DIR: " + _OUT_HELP + ".",
    )
    sub = plot.add_subparsers(dest="plot_command", metavar="FIGURE", required=True)

    p = sub.add_parser("collapse", help="the paper's Fig. 2: PGD accuracy, perturbation strength, collapse onset")
    p.add_argument("runs", nargs="+", help="run directories")
    p.add_argument("--out", help=_OUT_HELP)
    p.add_argument("--paper", action="store_true", help="overlay the curves digitized from the paper's Fig. 2")
    p.add_argument("--reference-free", action=argparse.BooleanOptionalAction, default=None,
                   help="panels with the measures that need no referee (loss increase of FGSM and noise, their "
                        "difference, alignment); default: drawn when a run has no referee curves")
    p.set_defaults(func=_cmd_collapse)

    p = sub.add_parser("perturbations", help="the paper's Fig. 1: probe images and their perturbations per epoch")
    p.add_argument("run", help="run directory")
    p.add_argument("--epochs", nargs="+", metavar="EPOCH",
                   help="epochs to show, e.g. `20 30` (default: last before the collapse onset, and the last)")
    p.add_argument("--out", help=_OUT_HELP)
    p.set_defaults(func=_cmd_perturbations)

    p = sub.add_parser("landscape", help="1-D loss profiles and 2-D loss contours across epochs")
    p.add_argument("run", help="run directory")
    p.add_argument("--epochs", nargs="+", metavar="EPOCH", help="epochs to draw (default: every stored one)")
    p.add_argument("--out", help=_OUT_HELP)
    p.set_defaults(func=_cmd_landscape)

    p = sub.add_parser("curves", help="clean / FGSM / PGD accuracy over epochs for one or more runs")
    p.add_argument("runs", nargs="+", help="run directories")
    p.add_argument("--out", help=_OUT_HELP)
    p.add_argument("--paper", action="store_true",
                   help="overlay the paper's digitized 200-epoch PGD-10 and APART curves")
    p.set_defaults(func=_cmd_curves)

    p = sub.add_parser("onset", help="a sweep's collapse-onset epochs and mean robust-accuracy curves per group",
                       description="Per group of a sweep (varied values except seed): the distribution of the "
                                   "collapse detector's onset epoch over the runs (runs without a collapse shown "
                                   "as 'none') and the probe PGD accuracy per epoch, mean ± 1 standard error.")
    p.add_argument("runs", nargs="+", help="a sweep directory, or run directories")
    p.add_argument("--out", help=_OUT_HELP)
    p.set_defaults(func=_cmd_onset)

    p = sub.add_parser("apart", help="APART's learned step sizes and perturbation size over training")
    p.add_argument("run", help="run directory")
    p.add_argument("--out", help=_OUT_HELP)
    p.set_defaults(func=_cmd_apart)

    c = subparsers.add_parser(
        "compare", help="one table row per run (or per sweep group): best/final accuracy, collapse onset, cost",
        description="Compare runs: best (by val, else probe, PGD accuracy) and final clean/FGSM/PGD accuracy, "
                    "collapse onset, seconds per epoch, passes per step and cost relative to a PGD-10 run. "
                    "Given a sweep directory (or --by-group): one row per group of varied values except seed, "
                    "aggregated over the seeds: runs, collapse rate, onset epoch median (range), best and final "
                    "probe PGD accuracy mean ± standard error, seconds per epoch.",
    )
    c.add_argument("runs", nargs="+", help="run directories, or a sweep directory")
    c.add_argument("--by-group", action="store_true",
                   help="aggregate the given run directories over seeds, as for a sweep directory")
    c.add_argument("--format", choices=["terminal", "csv", "markdown", "latex"],
                   help="table format (default: from the --out suffix .csv/.md/.tex, else terminal)")
    c.add_argument("--out", help="write the table to this file instead of printing it")
    c.add_argument("--robustbench", action="store_true",
                   help="also write <run>/robustbench.json (RobustBench model-info shape) for every run")
    c.set_defaults(func=_cmd_compare)
