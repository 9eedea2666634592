"""The ``wong`` check replayed after training over per-epoch checkpoints (analyses/lib/wong_replay.py)
gives the rows the attached diagnostic logged, leaves the run directory untouched, and feeds the
collapse detector's ``wong_fall`` offline."""

from __future__ import annotations

import hashlib
import importlib
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from helpers_runs import small_config

from robustdrop.api import track
from robustdrop.data import make_synthetic
from robustdrop.diagnostics import detect_collapse
from robustdrop.errors import RobustdropError
from robustdrop.store import RunStore

ANALYSES = Path(__file__).resolve().parents[1] / "analyses"


@pytest.fixture(scope="module")
def replay_lib():
    sys.path.insert(0, str(ANALYSES))
    try:
        yield importlib.import_module("lib.wong_replay")
    finally:
        sys.path.remove(str(ANALYSES))


@pytest.fixture(scope="module")
def data():
    return make_synthetic(n_train=256, n_test=128, num_classes=10, size=16, channels=3, seed=0)


def _digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def test_replay_gives_the_attached_rows_and_leaves_the_run_alone(replay_lib, data, tmp_path):
    torch.set_num_threads(1)
    cfg = small_config(model="smallcnn", epochs=3, val_size=32, checkpoint_every=1,
                       diagnostics=["wong:n=32"], seed=3)  # batch norm: train-mode BN must not leak
    store = track(cfg, runs_dir=tmp_path, name="live", progress=False, data=data)
    path = tmp_path / "live"
    live = store.metrics()
    live = live[(live["source"] == "wong") & (live["metric"] != "time_s")].reset_index(drop=True)
    assert list(live[live["metric"] == "acc"]["epoch"]) == [1, 2, 3]
    before = _digest(path)
    got = replay_lib.replay_wong(path, data, n=32)
    got = got[got["metric"] != "time_s"].reset_index(drop=True)
    pd.testing.assert_frame_equal(got[live.columns], live)
    assert _digest(path) == before  # nothing in the run directory changed

    # the table: measured once per training, then reused; wong_fall reads it offline
    table = tmp_path / "out" / "wong.csv"
    rows = replay_lib.wong_table([path], table, lambda c: data)
    assert set(rows["run"]) == {str(path)} and (rows["metric"] == "acc").sum() == 3
    mtime = table.stat().st_mtime_ns
    replay_lib.wong_table([path], table, lambda c: data)
    assert table.stat().st_mtime_ns == mtime
    bare = RunStore.open(path).metrics()
    bare = bare[bare["source"] != "wong"]
    merged = replay_lib.with_wong(bare, pd.read_csv(table), path)
    assert "wong_fall" in detect_collapse(merged)[-1].flags


def test_replay_needs_every_epochs_checkpoint(replay_lib, data, tmp_path):
    torch.set_num_threads(1)
    track(small_config(epochs=2, val_size=32), runs_dir=tmp_path, name="plain", progress=False, data=data)
    with pytest.raises(RobustdropError, match="lacks the weights of epochs \\[1, 2\\].*--save-weights-every 1 \\(or --checkpoint-every 1\\)"):
        replay_lib.replay_wong(tmp_path / "plain", data)
