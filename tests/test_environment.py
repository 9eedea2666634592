"""robustdrop.environment: the one description of the machine (versions, hardware)."""

from __future__ import annotations

import numpy as np
import torch

import robustdrop
from robustdrop.environment import device_name, environment, versions


def test_versions_and_environment_name_what_ran():
    v = versions()
    assert v["robustdrop"] == robustdrop.__version__ and v["torch"] == torch.__version__
    assert v["numpy"] == np.__version__
    env = environment()
    assert set(env) == {"torch", "python", "cpus", "machine", "numpy", "cuda"}
    assert env["cpus"] >= 1 and (env["cuda"] is None) == (not torch.cuda.is_available())
    assert device_name("cpu") and device_name(torch.device("cpu")) == device_name("cpu")
