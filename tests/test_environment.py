"""robustdrop.environment: the one description of the machine (versions, hardware)."""

from __future__ import annotations

import numpy as np
import torch

import robustdrop
from robustdrop.environment import device_name, environment, gpu_description, versions


def test_versions_and_environment_name_what_ran():
    v = versions()
    assert v["robustdrop"] == robustdrop.__version__ and v["torch"] == torch.__version__
    assert v["numpy"] == np.__version__
    env = environment()
    assert set(env) == {"torch", "python", "cpus", "machine", "numpy", "cuda"}
    assert env["cpus"] >= 1 and (env["cuda"] is None) == (not torch.cuda.is_available())
    assert device_name("cpu") and device_name(torch.device("cpu")) == device_name("cpu")


def test_the_version_has_one_home_read_by_packaging_and_records():
    """pyproject's dynamic version, ``robustdrop.__version__`` and what records write all come from
    ``robustdrop/_version.py`` (so the package need not import itself for its version)."""
    from pathlib import Path

    from setuptools.config.pyprojecttoml import read_configuration

    from robustdrop._version import __version__

    root = Path(__file__).resolve().parents[1]
    assert read_configuration(root / "pyproject.toml", expand=True)["project"]["version"] == __version__
    assert robustdrop.__version__ == __version__ == versions()["robustdrop"]
    for module in ("robustdrop/environment.py", "robustdrop/engine/trainer.py", "robustdrop/sweeps/runner.py"):
        source = (root / module).read_text()
        assert "robustdrop.__version__" not in source and "\nimport robustdrop\n" not in source, module


def test_manifest_names_the_machine_the_checkout_and_the_command():
    import socket
    import subprocess
    import sys
    from datetime import datetime, timezone
    from pathlib import Path

    from robustdrop.environment import manifest

    m = manifest("cpu")
    assert {k: m[k] for k in versions()} == versions()
    assert (m["device"], m["device_name"], m["threads"]) == ("cpu", device_name("cpu"), torch.get_num_threads())
    assert m["host"] == socket.gethostname() and m["command"] == sys.argv
    started = datetime.fromisoformat(m["start_time"])
    assert abs((datetime.now(timezone.utc) - started).total_seconds()) < 60
    git = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                         cwd=Path(robustdrop.__file__).parent)
    assert m["git_commit"] == (git.stdout.strip() if git.returncode == 0 else None)


def test_gpu_description_names_gpu_0_and_is_empty_without_cuda(monkeypatch):
    from types import SimpleNamespace

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_description() == {}
    props = SimpleNamespace(name="H100", total_memory=80 * 2**30 - 2**20, multi_processor_count=132)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 90100)
    assert gpu_description() == {"name": "H100", "memory_gib": 80.0, "cuda": "12.4", "cudnn": 90100,
                                 "multiprocessors": 132}
