"""The one rule for an existing run (robustdrop.reuse) and the checkpoint policy's run options
(keep_best, save_weights_every): small real trainings on synthetic data."""

from __future__ import annotations

import dataclasses
import json
import signal

import pandas as pd
import pytest
import torch
from helpers_runs import small_config
from test_preemption import SignalAt

from robustdrop.api import ensure, resume, track
from robustdrop.errors import RobustdropError, RunInterrupted
from robustdrop.reuse import NEUTRAL_FIELDS, OUTPUT_FIELDS, config_difference, decide
from robustdrop.store import RunStore


@pytest.fixture
def finished(synthetic_data, tmp_path, one_thread):
    cfg = small_config(epochs=2)
    track(cfg, runs_dir=tmp_path, name="r", data=synthetic_data, progress=False)
    return cfg, tmp_path / "r"


def test_start_reuse_and_retrain_by_the_config(finished, tmp_path):
    cfg, path = finished
    assert decide(tmp_path / "nothing", cfg).action == "start"
    assert decide(path, cfg).action == "reuse"
    # What cannot change a recorded number is not compared.
    neutral = dataclasses.replace(cfg, threads=3, device="cpu", eval_batch_size=7, data_dir="/elsewhere",
                                  channels_last=False)
    assert decide(path, neutral).action == "reuse"
    other = decide(path, dataclasses.replace(cfg, lr=0.1))
    assert other.action == "retrain" and other.differing == ("lr",) and "0.003 -> 0.1" in other.why
    assert decide(path, dataclasses.replace(cfg, epochs=3)).differing == ("epochs",)
    # A field added to robustdrop after the run was made counts as its default.
    stored = json.loads((path / "config.json").read_text())
    del stored["keep_best"]
    assert config_difference(stored, cfg) == []
    with pytest.raises(RobustdropError, match="unknown config keys"):
        config_difference({**stored, "from_the_future": 1}, cfg)
    assert set(NEUTRAL_FIELDS).isdisjoint(OUTPUT_FIELDS)


def test_a_referee_path_is_compared_by_its_folder_name(finished):
    cfg, path = finished
    a = dataclasses.replace(cfg, reference="/old/machine/runs/referee")
    b = dataclasses.replace(cfg, reference="runs/referee")
    assert config_difference(a, b) == [] and config_difference(a, dataclasses.replace(cfg, reference="x/ref2"))


def test_an_output_the_run_did_not_keep_means_retrain(finished):
    cfg, path = finished
    decision = decide(path, dataclasses.replace(cfg, keep_best="val/acc/pgd"))
    assert decision.action == "retrain" and decision.differing == ("keep_best",)
    # ... unless the finished run has the files (a run made before the option, by the analyses' hook).
    (path / "checkpoints" / "best_model.pt").write_bytes((path / "checkpoints" / "last.pt").read_bytes())
    assert decide(path, dataclasses.replace(cfg, keep_best="val/acc/pgd")).action == "reuse"
    assert decide(path, dataclasses.replace(cfg, save_weights_every=1)).action == "retrain"


def test_ensure_reuses_resumes_and_retrains(synthetic_data, tmp_path, one_thread):
    cfg = small_config(epochs=3)
    with pytest.raises(RunInterrupted):
        track(cfg, runs_dir=tmp_path, name="r", data=synthetic_data, progress=False,
              hooks=[SignalAt(signal.SIGTERM, step=9)])
    assert decide(tmp_path / "r", cfg).action == "resume"
    _, decision = ensure(dataclasses.replace(cfg, threads=1), runs_dir=tmp_path, name="r", data=synthetic_data,
                         progress=False)
    assert decision.action == "resume"
    csv = tmp_path / "r" / "metrics.csv"
    before = csv.stat().st_mtime_ns
    store, decision = ensure(cfg, runs_dir=tmp_path, name="r", data=synthetic_data, progress=False)
    assert decision.action == "reuse" and csv.stat().st_mtime_ns == before and store.path == tmp_path / "r"
    _, decision = ensure(dataclasses.replace(cfg, lr=0.001), runs_dir=tmp_path, name="r", data=synthetic_data,
                         progress=False)
    assert decision.action == "retrain"
    assert json.loads((tmp_path / "r" / "config.json").read_text())["lr"] == 0.001


def _val_pgd(store: RunStore) -> pd.Series:
    m = store.metrics()
    return m[(m.split == "val") & (m.metric == "acc") & (m.attack == "pgd")].set_index("epoch")["value"]


def test_keep_best_and_weights_every_survive_a_mid_epoch_stop(synthetic_data, tmp_path, one_thread):
    cfg = small_config(epochs=4, keep_best="val/acc/pgd", save_weights_every=2)
    straight = track(cfg, runs_dir=tmp_path, name="straight", data=synthetic_data, progress=False)
    acc = _val_pgd(straight)
    best = torch.load(straight.checkpoint_path("best_model"), weights_only=True)
    assert best["epoch"] == int(acc.idxmax()) and best["value"] == pytest.approx(acc.max())  # ties: the first
    assert best["selected_by"] == "val/acc/pgd"
    weights = sorted(p.name for p in (straight.path / "checkpoints").glob("weights_epoch_*.pt"))
    assert weights == ["weights_epoch_0002.pt", "weights_epoch_0004.pt"]
    last = torch.load(straight.checkpoint_path("last"), weights_only=True)
    w4 = torch.load(straight.checkpoint_path("weights_epoch_0004"), weights_only=True)
    assert set(w4) >= {"model", "epoch", "step", "config"} and "optimizer" not in w4
    assert all(torch.equal(w4["model"][k], last["model"][k].cpu()) for k in last["model"])

    with pytest.raises(RunInterrupted):  # stopped inside epoch 3, after epoch 2's best and weights
        track(cfg, runs_dir=tmp_path, name="stopped", data=synthetic_data, progress=False,
              hooks=[SignalAt(signal.SIGTERM, step=2 * 7 + 3)])
    resumed = resume(tmp_path / "stopped", data=synthetic_data, progress=False)
    for name in ("best_model", "weights_epoch_0002", "weights_epoch_0004"):
        a = torch.load(straight.checkpoint_path(name), weights_only=True)
        b = torch.load(resumed.checkpoint_path(name), weights_only=True)
        assert a["epoch"] == b["epoch"] and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), name


def test_a_loss_metric_keeps_the_lowest(synthetic_data, tmp_path, one_thread):
    store = track(small_config(epochs=3, keep_best="val/loss/none"), runs_dir=tmp_path, name="r",
                  data=synthetic_data, progress=False)
    m = store.metrics()
    loss = m[(m.split == "val") & (m.metric == "loss") & (m.attack == "none")].set_index("epoch")["value"]
    assert torch.load(store.checkpoint_path("best_model"), weights_only=True)["epoch"] == int(loss.idxmin())


@pytest.mark.parametrize("bad", ["acc", "val acc", "/x"])
def test_keep_best_needs_a_metric_name(bad):
    with pytest.raises(RobustdropError, match="--keep-best names a metric"):
        small_config(keep_best=bad)


def test_a_keep_best_metric_the_run_does_not_measure_is_a_warning(tmp_path):
    from robustdrop.store import CheckpointSaver

    saver = CheckpointSaver(RunStore.create(tmp_path, "r"), keep_best="val/acc/pdg")
    state = {"epoch": 1, "step": 3, "config": {}, "model": {"w": torch.zeros(2)}}
    with pytest.warns(UserWarning, match="no metric 'val/acc/pdg' this epoch \\(there are: val/acc/pgd\\)"):
        saver.save(state, 1, metrics={"val/acc/pgd": 0.5, "train/loss": 1.0})
    assert not saver.store.checkpoint_path("best_model").is_file()
    saver.save(state, 1, metrics={"train/loss": 1.0})  # no evaluation this epoch (eval_every): silent
