"""``robustdrop`` command line: a thin layer over :mod:`robustdrop.api` and :mod:`robustdrop.plots`."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence

import robustdrop._threads  # noqa: F401  (first: sets OMP_WAIT_POLICY before torch is imported)
from robustdrop.engine.config import PRESETS, TrackConfig, make_config, parse_fraction
from robustdrop.errors import RobustdropError


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error that says where to look."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _field_type(f: dataclasses.Field):
    if f.metadata.get("fraction"):
        return parse_fraction
    text = str(f.type)
    for name, kind in (("int", int), ("float", float), ("str", str)):
        if text.startswith(name):
            return kind
    return str


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
            group.add_argument(flag, nargs=f.metadata["nargs"], type=f.metadata["item"], **kwargs)
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
    track.add_argument("--resume", metavar="RUN_DIR", help="continue a run where its last checkpoint left it")
    track.add_argument("--no-progress", action="store_true", help="no progress bars (summary lines only)")
    _add_config_flags(track)
    track.set_defaults(func=_cmd_track)

    from robustdrop.plots.cli import add_plot_parsers
    from robustdrop.tools_cli import add_tool_parsers

    add_plot_parsers(sub)
    add_tool_parsers(sub)
    return parser


def _cmd_track(args: argparse.Namespace) -> int:
    from robustdrop.api import resume, track

    names = {f.name for f in dataclasses.fields(TrackConfig)}
    overrides = {k: v for k, v in vars(args).items() if k in names}
    if args.resume:
        allowed = {"device", "threads"}
        extra = sorted(set(overrides) - allowed) + (["preset"] if args.preset else [])
        if extra:
            raise RobustdropError(f"--resume continues a run with its own config; drop {', '.join('--' + e.replace('_', '-') for e in extra)}")
        store = resume(args.resume, progress=not args.no_progress, device=overrides.get("device"))
    else:
        config = make_config(args.preset, **overrides)
        store = track(config, runs_dir=args.runs_dir, name=args.name, overwrite=args.overwrite,
                      progress=not args.no_progress)
    from robustdrop.plots.summary import run_summary

    print(run_summary(store.path), flush=True)
    print(f"run directory: {store.path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except RobustdropError as exc:
        print(f"robustdrop: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("robustdrop: interrupted; resume with `robustdrop track --resume RUN_DIR`", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
