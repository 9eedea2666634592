"""``robustdrop`` command line: a thin layer over :mod:`robustdrop.api` and :mod:`robustdrop.plots`."""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import warnings
from collections.abc import Callable, Sequence

import robustdrop._threads  # noqa: F401  (first: sets OMP_WAIT_POLICY before torch is imported)
from robustdrop.engine.config import PRESETS, RUNTIME_FIELDS, TrackConfig, field_parser, make_config
from robustdrop.errors import RobustdropError, RunInterrupted


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error that says where to look."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _argument_type(parse: Callable[[str], object], name: str) -> Callable[[str], object]:
    """``parse`` for argparse: its RobustdropError becomes argparse's one-line usage error."""

    def convert(text: str) -> object:
        try:
            return parse(text)
        except RobustdropError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = name  # argparse names the type in "invalid <name> value"
    return convert


def _finite_float(text: str) -> float:
    value = float(text)  # ValueError: argparse says "invalid float value"
    if not math.isfinite(value):
        raise RobustdropError(f"{text!r} is not a finite number")
    return value


FLOAT = _argument_type(_finite_float, "float")


def _field_type(f: dataclasses.Field) -> Callable[[str], object]:
    """The config's :func:`field_parser` for argparse: floats must be finite, and a parser's
    RobustdropError (``8/0``) is a one-line usage error."""
    parse = field_parser(f)
    if parse is float:
        return FLOAT
    if parse in (int, str):
        return parse
    return _argument_type(parse, "number")


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrackConfig field; defaults are suppressed so only given flags override."""
    group = parser.add_argument_group("run configuration (override the preset)")
    for f in dataclasses.fields(TrackConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f.metadata["help"]
        if "names" in f.metadata:  # a registry: list its names
            help_text += ": " + " | ".join(f.metadata["names"]())
        help_text += f" (default: {default})"
        kwargs = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        choices = f.metadata.get("choices")
        if callable(choices):  # a registry: what is registered now
            choices = choices()
        if isinstance(default, bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif "nargs" in f.metadata:
            item = FLOAT if f.metadata["item"] is float else f.metadata["item"]
            group.add_argument(flag, nargs=f.metadata["nargs"], type=item, **kwargs)
        else:
            group.add_argument(flag, type=_field_type(f), choices=choices, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="robustdrop", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    track = sub.add_parser("track", help="train while diagnostics log the robustness drop",
                           description="Train a model adversarially while hooks log robustness, perturbation "
                                       "strength and loss landscapes, and detect the collapse as it happens.")
    track.add_argument("--preset", choices=sorted(PRESETS), help="start from a preset: " + ", ".join(sorted(PRESETS)))
    track.add_argument("--runs-dir", default="runs", help="parent folder of run directories (default: ./runs)")
    track.add_argument("--name", help="run directory name (default: method-model-eps-timestamp)")
    track.add_argument("--overwrite", action="store_true", help="replace an existing run directory of that name")
    track.add_argument("--resume", metavar="RUN_DIR",
                       help="continue a run where its last checkpoint left it (with --epochs N: extend it to N "
                            "epochs; --device and --threads apply to this invocation)")
    track.add_argument("--dry-run", action="store_true",
                       help="resolve the config, load the data, time a few training steps, print the config and "
                            "the estimated cost, and exit without writing anything")
    track.add_argument("--no-progress", action="store_true", help="no progress bars (summary lines only)")
    _add_config_flags(track)
    track.set_defaults(func=_cmd_track)

    _add_sweep_parser(sub)

    from robustdrop.plots.cli import add_plot_parsers
    from robustdrop.tools_cli import add_tool_parsers

    add_plot_parsers(sub)
    add_tool_parsers(sub)
    return parser


def _cmd_track(args: argparse.Namespace) -> int:
    from robustdrop.api import dry_run, resume, track

    names = {f.name for f in dataclasses.fields(TrackConfig)}
    overrides = {k: v for k, v in vars(args).items() if k in names}
    if args.resume:
        allowed = {*RUNTIME_FIELDS, "epochs"}
        extra = sorted(set(overrides) - allowed) + (["preset"] if args.preset else [])
        extra += [flag for flag, given in (("dry-run", args.dry_run), ("overwrite", args.overwrite)) if given]
        if extra:
            raise RobustdropError(f"--resume continues a run with its own config (only --epochs, --device and "
                                  f"--threads may be given); drop {', '.join('--' + e.replace('_', '-') for e in extra)}")
        store = resume(args.resume, progress=not args.no_progress, device=overrides.get("device"),
                       threads=overrides.get("threads"), epochs=overrides.get("epochs"))
    else:
        config = make_config(args.preset, **overrides)
        if args.dry_run:
            dry_run(config, runs_dir=args.runs_dir, name=args.name, overwrite=args.overwrite, verbose=True)
            return 0
        store = track(config, runs_dir=args.runs_dir, name=args.name, overwrite=args.overwrite,
                      progress=not args.no_progress)
    from robustdrop.plots.summary import run_summary

    print(run_summary(store.path), flush=True)
    print(f"run directory: {store.path}")
    return 0


_SWEEP_EPILOG = """\
grid words: key=v1,v2 (values read as track's flag reads them: 8/255, fgsm, true; list keys join
items with +: diagnostics=none,default+landscape) or key=a:b (integers a..b-1: seed=0:5 is seeds
0,1,2,3,4). Keys are track's flags (train-subset or train_subset). Cells are named by their varied
values: epsilon=8_255-seed=0. Config flags below are fixed for every cell.

--file study.toml:
  [sweep]
  name = "eps-study"
  preset = "quick"
  [sweep.grid]
  seed = "0:5"
  epsilon = ["8/255", "10/255", "12/255"]
  [sweep.fixed]
  epochs = 10
  [sweep.cells.referee]      # named cells (before the grid's, in this order); "@name" = that
  method = "pgd"             # cell's run directory, and the cell waits for it
  [sweep.cells.fgsm-ref]
  reference = "@referee"
  [sweep.cells.fgsm-eval]    # kind = "evaluate": evaluate a finished run (robustdrop evaluate)
  kind = "evaluate"
  run = "@fgsm-ref"
  attacks = ["pgd"]
  [sweep.cells.fgsm-wong]    # kind = "replay": diagnostics over a finished run's per-epoch weights
  kind = "replay"            # (trained with save_weights_every = 1), rows into its metrics
  run = "@fgsm"
  diagnostics = ["wong"]     # and/or reference = "@referee" (strength-ref)

Rerun the same command to continue: finished cells are skipped (the run reuse rule), stopped and
killed ones resume from their checkpoints. Read the results with `robustdrop compare SWEEP_DIR` and `robustdrop plot onset SWEEP_DIR`.
"""


def _add_sweep_parser(sub: argparse._SubParsersAction) -> None:
    sw = sub.add_parser("sweep", help="run a grid of track configurations as one experiment (local or Ray)",
                        description="Run every combination of the grid's values as one run directory in "
                                    "<runs-dir>/<name>/, with sweep.json recording the grid and each cell's "
                                    "config and status.",
                        epilog=_SWEEP_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sw.add_argument("--grid", nargs="+", default=[], metavar="KEY=VALUES",
                    help="varied values, e.g. seed=0:5 epsilon=8/255,10/255 method=fgsm,apart")
    sw.add_argument("--file", help="a TOML file with [sweep] name, preset, grid and fixed (see below)")
    sw.add_argument("--preset", choices=sorted(PRESETS), help="every cell starts from this preset")
    sw.add_argument("--name", help="sweep directory name (default: <preset>-<grid keys>, e.g. quick-epsilon-seed)")
    sw.add_argument("--runs-dir", default="runs", help="parent folder of the sweep directory (default: ./runs)")
    sw.add_argument("--extend", action="store_true",
                    help="add cells (more values of the same keys) to an existing sweep; fixed values cannot change")
    sw.add_argument("--backend", choices=("local", "ray"), default="local",
                    help="local: processes on this machine (default); ray: tasks on a Ray cluster (--address)")
    sw.add_argument("--jobs", type=int, help="local: cells at once (default: the CPU cores)")
    sw.add_argument("--address", help="ray: the head's HOST:PORT (the runs dir must be on a shared filesystem)")
    sw.add_argument("--cpus-per-cell", type=float,
                    help="CPU threads per cell (local default: cores // jobs; ray default: 1, the task's num_cpus)")
    sw.add_argument("--gpus-per-cell", type=float, default=0.0,
                    help="ray: GPUs per task (default 0; 0.25: four cells share a GPU). Local cells share the "
                         "GPUs they see: --jobs 4 on one GPU runs four cells on it")
    sw.add_argument("--max-minutes", type=float,
                    help="deadline: no cell starts after it; running cells checkpoint and stop (recorded as "
                         "stopped); the same command continues them")
    sw.add_argument("--no-progress", action="store_true", help="no progress bar (one line per finished cell)")
    sw.add_argument("--dry-run", action="store_true",
                    help="print the cells in order with the engine's cost estimate of each training; write nothing")
    _add_config_flags(sw)
    sw.set_defaults(func=_cmd_sweep)


def _cmd_sweep(args: argparse.Namespace) -> int:
    from robustdrop.sweeps import parse_grid, plan_sweep, read_toml, run_sweep

    names = {f.name for f in dataclasses.fields(TrackConfig)}
    fixed = {k: v for k, v in vars(args).items() if k in names}
    spec = read_toml(args.file) if args.file else {"name": None, "preset": None, "grid": {}, "fixed": {}, "cells": {}}
    grid = dict(spec["grid"])
    for key, values in parse_grid(args.grid).items():
        if key in grid:
            raise RobustdropError(f"sweep key {key} is in both --file and --grid; give it once")
        grid[key] = values
    plan = plan_sweep(grid, preset=args.preset or spec["preset"], fixed={**spec["fixed"], **fixed},
                      name=args.name or spec["name"], cells=spec["cells"])
    if args.dry_run:
        from robustdrop.sweeps.runner import dry_run_sweep

        dry_run_sweep(plan, runs_dir=args.runs_dir, jobs=args.jobs or 1)
        return 0
    result = run_sweep(plan, runs_dir=args.runs_dir, backend=args.backend, jobs=args.jobs, address=args.address,
                       cpus_per_cell=args.cpus_per_cell, gpus_per_cell=args.gpus_per_cell, extend=args.extend,
                       progress=not args.no_progress, command=["robustdrop", *args.argv], max_minutes=args.max_minutes)
    # 1: a cell failed; 143: cells were stopped (a signal or --max-minutes; checkpointed, the same command continues them)
    return 1 if result.failed else 143 if result.stopped else 0


def _one_line(text: object) -> str:
    return " ".join(str(text).splitlines())


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"robustdrop: warning: {_one_line(message)}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (2: bad input or environment; 130 / 143:
    stopped by SIGINT / SIGTERM after a checkpoint)."""
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning  # one line, no source line
        return _main(argv)


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error, already printed as one line (2)
        return exc.code if isinstance(exc.code, int) else 2
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return int(args.func(args) or 0)
    except RobustdropError as exc:
        print(f"robustdrop: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except RunInterrupted as exc:
        print(f"robustdrop: {_one_line(exc)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        todo = "rerun the same command" if args.command == "sweep" else "`robustdrop track --resume RUN_DIR`"
        print(f"robustdrop: interrupted; what the last checkpoint holds is kept (continue with {todo})",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
