"""Safe OpenMP threading for the command line: imported by :mod:`robustdrop.cli` before anything
imports torch.

torch's CPU thread pool is OpenMP (libgomp). With ``OMP_WAIT_POLICY`` unset, its idle threads
spin for a while before they sleep, which is harmless on an idle machine and ruinous on a shared
one: two runs with two threads each on 2 busy cores spent their time spinning (docs/quick-preset.md
measured 10–40x slower epochs; ``benchmarks/bench_threads.py`` measures it on your machine).
``PASSIVE`` makes waiting threads sleep at once. The variable only counts if it is set before the
OpenMP runtime starts, i.e. before the process imports torch, so it is set here, and only when the
user has not set it. Python API users set it themselves, before ``import torch``::

    OMP_WAIT_POLICY=PASSIVE python my_script.py      # or os.environ.setdefault(...) as the first line
"""

from __future__ import annotations

import os

DEFAULT_WAIT_POLICY = "PASSIVE"

os.environ.setdefault("OMP_WAIT_POLICY", DEFAULT_WAIT_POLICY)
