"""The machine this process runs on — library versions and hardware, described in one place for
run manifests (:func:`manifest`), benchmark headers and the analyses' records (:func:`environment`,
:func:`gpu_description`).

Imports nothing from robustdrop but its version (``robustdrop._version``), so every layer may use it.

Examples:
    >>> sorted(versions())
    ['numpy', 'python', 'robustdrop', 'torch']
    >>> device_name("cpu") != ""
    True
"""

from __future__ import annotations

import contextlib
import os
import platform
import socket
import subprocess
import sys
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch

from robustdrop._version import __version__


def versions() -> dict[str, str]:
    """Versions of robustdrop, Python, torch and NumPy."""
    return {"robustdrop": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__}


def device_name(device: torch.device | str) -> str:
    """The GPU's name for a CUDA device, else the CPU's (the processor, or the machine type where
    the OS does not name it, as Linux often does not)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def environment() -> dict[str, Any]:
    """Versions and hardware for a record of a measurement: ``torch``, ``python``, ``numpy``,
    ``cpus`` (logical cores), ``machine``, ``cuda`` (GPU 0's name, ``None`` without CUDA)."""
    v = versions()
    return {"torch": v["torch"], "python": v["python"], "cpus": os.cpu_count(), "machine": platform.machine(),
            "numpy": v["numpy"], "cuda": device_name("cuda:0") if torch.cuda.is_available() else None}


def gpu_description() -> dict[str, Any]:
    """GPU 0 for a record of a measurement: ``name``, ``memory_gib``, ``cuda`` and ``cudnn``
    (versions), ``multiprocessors``; ``{}`` without CUDA."""
    if not torch.cuda.is_available():
        return {}
    props = torch.cuda.get_device_properties(0)
    return {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1), "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(), "multiprocessors": props.multi_processor_count}


def git_commit() -> str | None:
    """The commit of the git checkout robustdrop is imported from (``None`` for an installed copy
    or without git)."""
    with contextlib.suppress(Exception):  # no git, not a checkout, a hung git: the manifest just says None
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        return out.stdout.strip() or None
    return None


def manifest(device: torch.device | str) -> dict[str, Any]:
    """What a run's ``manifest.json`` says about where and how it ran: the versions
    (:func:`versions`), ``device`` and ``device_name``, torch's CPU ``threads``, ``git_commit``,
    ``host``, ``start_time`` (UTC, ISO) and the ``command`` line. The trainer adds the run's own
    facts (seed, precision, dataset sizes)."""
    device = torch.device(device)
    return {**versions(), "device": str(device), "device_name": device_name(device),
            "threads": torch.get_num_threads(), "git_commit": git_commit(), "host": socket.gethostname(),
            "start_time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": sys.argv}
