"""The examples/ scripts, each run in a shortened form in a subprocess (as a user runs them)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from robustdrop.store import RunStore

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SHORT = ["--epochs", "2", "--train-subset", "256", "--probe-size", "50", "--threads", "1"]


@pytest.fixture
def env(robustdrop_env, cifar10_jpeg, cifar10_jpeg_cache_dir):
    """The subprocess imports this robustdrop and reads the session's decoded cifar10-jpeg cache."""
    return {**robustdrop_env, "ROBUSTDROP_CACHE": str(cifar10_jpeg_cache_dir), "OMP_NUM_THREADS": "1"}


def _run(script: str, args: list[str], cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run([sys.executable, str(EXAMPLES / script), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _probe(run: Path, attack: str) -> pd.Series:
    m = RunStore.open(run).metrics()
    rows = m[(m.split == "probe") & (m.metric == "acc") & (m.attack == attack) & (m.source == "eval")]
    return rows.set_index("epoch").value.sort_index()


def test_own_loop_then_offline_diagnosis(tmp_path, env):
    out = _run("fgsm_own_loop.py", SHORT, tmp_path, env)
    assert "robustdrop plot collapse runs/fgsm-own-loop" in out
    live = tmp_path / "runs" / "fgsm-own-loop"
    assert list(_probe(live, "pgd").index) == [1, 2]
    assert sorted(p.name for p in (tmp_path / "ckpts" / "fgsm-own-loop").iterdir()) == ["epoch_01.pt", "epoch_02.pt"]
    m = RunStore.open(live).metrics()
    assert ((m.split == "train") & (m.attack == "train-perturbation")).any()  # observe() got the loop's δ

    out = _run("diagnose_checkpoints.py", ["--probe-size", "50"], tmp_path, env)
    assert "robustdrop plot collapse runs/fgsm-own-loop-offline" in out
    offline = tmp_path / "runs" / "fgsm-own-loop-offline"
    # the same weights on the same probe with the same seeded generators: the replay measures exactly
    # what the live monitor measured, every probe value (evaluation, strength, referee, detector)
    values = []
    for run in (live, offline):
        m = RunStore.open(run).metrics()
        m = m[(m.split == "probe") & (m.metric != "time_s")]
        values.append(m.set_index(["epoch", "source", "metric", "attack"]).value.sort_index())
    assert len(values[0]) > 40
    pd.testing.assert_series_equal(values[1], values[0])


def test_lightning_example(tmp_path, env):
    pytest.importorskip("lightning")
    out = _run("fgsm_lightning.py", SHORT, tmp_path, env)
    assert "robustdrop plot collapse runs/fgsm-lightning" in out
    assert list(_probe(tmp_path / "runs" / "fgsm-lightning", "pgd").index) == [1, 2]
    assert sorted(p.name for p in (tmp_path / "ckpts" / "fgsm-lightning").iterdir()) == [
        "epoch=0-step=2.ckpt", "epoch=1-step=4.ckpt"]
    logged = pd.read_csv(next((tmp_path / "runs").glob("fgsm-lightning-lightning-logs/*/metrics.csv")))
    assert logged["robustdrop/probe/acc/pgd"].notna().sum() == 2
