"""The machine this process runs on — library versions and hardware, described in one place for
run manifests, benchmark headers and the analyses' records.

Imports nothing from robustdrop but its version (``robustdrop._version``), so every layer may use it.

Examples:
    >>> sorted(versions())
    ['numpy', 'python', 'robustdrop', 'torch']
    >>> device_name("cpu") != ""
    True
"""

from __future__ import annotations

import os
import platform
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
