"""The diagnostics of a finished training, from the checkpoints it saved: ``robustdrop diagnose``.

examples/fgsm_own_loop.py saves its weights every epoch (``ckpts/fgsm-own-loop/epoch_XX.pt``, a
dict ``{"model": state_dict, "epoch": e}``, as many training scripts do). Nothing needs to be
rerun to see whether that training collapsed: ``robustdrop diagnose`` loads each epoch's weights
into the architecture (``--model``: the file's ``Net``, here by path; ``package.module:factory``
works the same), evaluates the probe, replays the diagnostics and the collapse detector, and
writes an ordinary run directory. This script prints the command and runs it; run the command
yourself just as well:

    python examples/fgsm_own_loop.py            # first: the training that saves the checkpoints
    python examples/diagnose_checkpoints.py     # then: the offline diagnosis
    python examples/diagnose_checkpoints.py --probe-size 200      # shorter: fewer probe images
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoints", default="ckpts/fgsm-own-loop", help="the folder examples/fgsm_own_loop.py wrote")
    p.add_argument("--probe-size", type=int, default=1000)
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--name", default="fgsm-own-loop-offline")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    argv = ["diagnose", "--checkpoints", f"{args.checkpoints}/epoch_*.pt", "--model", f"{HERE / 'fgsm_own_loop.py'}:Net",
            "--normalize", "cifar10", "--epsilon", "10/255", "--reference", "builtin:quick",
            "--probe-size", str(args.probe_size), "--runs-dir", args.runs_dir, "--name", args.name,
            "--overwrite", "--threads", str(args.threads)]
    print("robustdrop " + shlex.join(argv), flush=True)
    from robustdrop.cli import main as robustdrop

    return robustdrop(argv)  # ends by printing the command that draws the figure


if __name__ == "__main__":
    sys.exit(main())
