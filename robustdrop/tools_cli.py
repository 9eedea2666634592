"""``robustdrop evaluate ...``, ``robustdrop diagnose ...`` and ``robustdrop export ...``.

The main CLI calls :func:`add_tool_parsers` on its sub-parsers, then ``args.func(args)``. Bad
input raises :class:`RobustdropError` (one line, exit 2).
"""

from __future__ import annotations

import argparse
from typing import Any

from robustdrop.engine.config import parse_fraction
from robustdrop.errors import RobustdropError


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from robustdrop.evaluation import evaluate_checkpoint, set_threads, write_report

    set_threads(args.threads)
    report = evaluate_checkpoint(
        args.checkpoint, attacks=args.attack, n=args.n, seed=args.seed, epsilon=args.epsilon,
        pgd_steps=args.pgd_steps, pgd_step_size=args.pgd_step_size, restarts=args.restarts,
        batch_size=args.batch_size, device=args.device, dataset=args.dataset, data_dir=args.data_dir,
        progress=not args.no_progress, model=args.model, normalize=_normalize(args),
    )
    print(report.table())
    print(f"rows written to {write_report(report, args.out)}")
    return 0


def _normalize(args: argparse.Namespace) -> tuple | None:
    """``--normalize`` as ``(mean, std)``; the channel count is checked against the data later."""
    from robustdrop.models.user import parse_normalize

    return parse_normalize(args.normalize)


def add_user_model_flags(parser: argparse.ArgumentParser) -> None:
    """``--model`` and ``--normalize``: a user's architecture (:mod:`robustdrop.models.user`)."""
    parser.add_argument("--model", metavar="PACKAGE.MODULE:FACTORY",
                        help="build the architecture of a checkpoint that other code saved: a function or class "
                             "called with no arguments (or num_classes= if it takes that), imported from the "
                             "current directory or PYTHONPATH; or path/to/file.py:factory")
    parser.add_argument("--normalize", nargs="+", metavar="VALUE",
                        help="MEAN STD: the model expects inputs normalized as (x - MEAN) / STD, each one value or "
                             "one per channel (e.g. --normalize 0.4914,0.4822,0.4465 0.2471,0.2435,0.2616), or the "
                             "name cifar10 for exactly those; attacks and ε stay in [0, 1] pixel units")


def _cmd_diagnose(args: argparse.Namespace) -> int:
    from robustdrop.diagnose import diagnose_checkpoints
    from robustdrop.evaluation import set_threads

    set_threads(args.threads)
    if not args.model:
        raise RobustdropError("diagnose needs --model package.module:factory, the architecture the checkpoints hold")
    reference = None if args.reference == "none" else args.reference
    run = diagnose_checkpoints(
        args.checkpoints, model=args.model, epsilon=args.epsilon, normalize=_normalize(args), dataset=args.dataset,
        data_dir=args.data_dir, probe_size=args.probe_size, reference=reference, diagnostics=args.diagnostics,
        seed=args.seed, runs_dir=args.runs_dir, name=args.name, overwrite=args.overwrite, device=args.device,
        progress=not args.no_progress,
    )
    print(f"run directory: {run}")
    print(f"draw the figure: robustdrop plot collapse {run}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    if not args.tensorboard:
        raise RobustdropError("say what to export to: --tensorboard DIR")
    from robustdrop.store.tensorboard import export_tensorboard

    for run in args.runs:
        print(export_tensorboard(run, args.tensorboard))
    return 0


def add_tool_parsers(subparsers: Any) -> None:
    """Register ``evaluate``, ``diagnose`` and ``export``."""
    from robustdrop.attacks.registry import EVAL_ATTACKS

    e = subparsers.add_parser(
        "evaluate", help="accuracy of a saved checkpoint under clean / FGSM / PGD-k / AutoAttack",
        description="Evaluate a run's checkpoint (checkpoints/result.pt, else last.pt) or a checkpoint file on a "
                    "seeded class-balanced test subset (--n) or the whole test set (--n 0). Results are metric rows "
                    "(source=evaluate, with the attack spec, n and the checkpoint's epoch): appended to the run's "
                    "metrics, else to <checkpoint>.evaluate.csv, or to --out.",
    )
    e.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT",
                   help="run directory or checkpoints/*.pt file; with --model, any checkpoint file of that model")
    e.add_argument("--attack", nargs="+", default=["fgsm", "pgd"], choices=EVAL_ATTACKS.names(),
                   help="attacks to run; clean accuracy is always measured (default: fgsm pgd); cw = the PGD with the "
                        "Carlini-Wagner margin loss; autoattack = standard L-inf AutoAttack, needs robustdrop[eval]")
    e.add_argument("--n", type=int, default=1000,
                   help="seeded class-balanced test subset size; 0 = the whole test set (default: 1000)")
    e.add_argument("--seed", type=int, help="seed of the subset and the attacks (default: the run's)")
    e.add_argument("--epsilon", type=parse_fraction,
                   help="L-inf radius in pixel units, e.g. 8/255 (default: the run's; required with --model)")
    e.add_argument("--pgd-steps", type=int, help="PGD steps (default: the run's --eval-pgd-steps)")
    e.add_argument("--pgd-step-size", type=parse_fraction, help="PGD step, e.g. 2/255 (default: the run's)")
    e.add_argument("--restarts", type=int, help="PGD restarts (default: the run's --eval-restarts)")
    e.add_argument("--batch-size", type=int, help="evaluation batch size (default: the run's)")
    e.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    e.add_argument("--dataset", help="test set (default: the run's dataset; with --model cifar10-jpeg)")
    e.add_argument("--data-dir", help="folder with the dataset files (default: the run's)")
    e.add_argument("--out", help="write the rows to this .csv / .parquet file (appended if it exists)")
    e.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_user_model_flags(e)
    e.set_defaults(func=_cmd_evaluate)

    d = subparsers.add_parser(
        "diagnose", help="replay the diagnostics over per-epoch checkpoints that any code saved",
        description="Load each per-epoch checkpoint (--checkpoints, a quoted glob) into your architecture (--model) "
                    "and run the epoch's end as robustdrop's Monitor does during training: probe evaluation (clean, "
                    "FGSM, PGD-20), the default diagnostics and the collapse detector. Writes an ordinary run "
                    "directory (plot collapse, plot curves, compare, export read it). Nothing is trained.",
        epilog="Epochs: a Lightning checkpoint's recorded epoch + 1 (Lightning counts from 0); other files by name: "
               "the number after 'epoch' (epoch_12.pt, ckpt-epoch=03.ckpt), else the name's only number.",
    )
    d.add_argument("--checkpoints", required=True, metavar="GLOB",
                   help="the per-epoch checkpoint files, quoted, e.g. 'ckpts/epoch_*.pt'")
    d.add_argument("--epsilon", type=parse_fraction, required=True,
                   help="L-inf radius of the training, in [0, 1] pixel units, e.g. 8/255 (also with --normalize)")
    d.add_argument("--dataset", default="cifar10-jpeg",
                   help="the data the probe is drawn from (its test split; default: cifar10-jpeg, embedded)")
    d.add_argument("--data-dir", help="folder with the dataset files")
    d.add_argument("--probe-size", type=int, default=1000,
                   help="seeded class-balanced test subset evaluated per checkpoint (0 = all; default 1000)")
    d.add_argument("--reference", default="builtin:quick",
                   help="the referee of strength-ref: builtin:quick (default), a robustdrop run directory or "
                        "checkpoint, or none")
    d.add_argument("--diagnostics", nargs="+", default=["default"], help="default (the default) or all (+ landscapes)")
    d.add_argument("--seed", type=int, default=0, help="seed of the probe subset and the diagnostics (default 0)")
    d.add_argument("--runs-dir", default="runs", help="parent folder of the run directory (default: ./runs)")
    d.add_argument("--name", help="run directory name (default: diagnose-<checkpoint folder>)")
    d.add_argument("--overwrite", action="store_true", help="replace an existing run directory of that name")
    d.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    d.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")
    d.add_argument("--no-progress", action="store_true", help="no line per checkpoint")
    add_user_model_flags(d)
    d.set_defaults(func=_cmd_diagnose)

    x = subparsers.add_parser(
        "export", help="convert run directories for other tools (TensorBoard)",
        description="Write every metric row of each run as TensorBoard scalars into DIR/<run name>/, with the same "
                    "tags as `track --tensorboard` (see robustdrop.store.tensorboard).",
    )
    x.add_argument("runs", nargs="+", metavar="RUN", help="run directories")
    x.add_argument("--tensorboard", metavar="DIR", help="TensorBoard log folder (view with tensorboard --logdir DIR)")
    x.set_defaults(func=_cmd_export)
