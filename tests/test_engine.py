"""The training engine: every method trains, every number carries its spec, runs resume exactly,
and bad input fails with one clear line without touching existing results."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from robustdrop.api import resume, track
from robustdrop.engine import Hook, make_config
from robustdrop.errors import RobustdropError
from robustdrop.store import RunStore


def small_config(**overrides):
    values = dict(model="cnn1", width=4, epochs=3, batch_size=64, val_size=64, probe_size=64, lr=0.003,
                  optimizer="adam", weight_decay=5e-4, lr_peak_at=0.4, eval_pgd_steps=3, eval_batch_size=128,
                  diagnostics=["none"], epsilon=8 / 255)
    values.update(overrides)
    return make_config(**values)


def comparable(store: RunStore) -> pd.DataFrame:
    """Metrics without wall-clock rows (the only ones allowed to differ between runs)."""
    frame = store.metrics()
    return frame[~frame.metric.str.startswith("time_")].reset_index(drop=True)


@pytest.mark.parametrize("method", ["fgsm", "rs-fgsm", "pgd"])
def test_each_method_trains_and_logs_specs(method, synthetic_data, tmp_path):
    store = track(small_config(method=method, epochs=2, pgd_steps=2), runs_dir=tmp_path, name=method,
                  data=synthetic_data, progress=False)
    m = store.metrics()
    train_loss = m[(m.split == "train") & (m.metric == "loss")]
    assert len(train_loss) == 2 and train_loss.value.notna().all()
    assert (train_loss.attack == method).all()
    pgd = m[(m.split == "probe") & (m.attack == "pgd") & (m.metric == "acc")]
    assert len(pgd) == 2
    assert (pgd.steps == 3).all() and (pgd.restarts == 1).all() and (pgd.n == 64).all()
    assert pgd.step_size.iloc[0] == pytest.approx(2 / 255) and pgd.epsilon.iloc[0] == pytest.approx(8 / 255)
    passes = m[(m.metric == "passes_forward")].value.iloc[0]
    assert passes == (3 if method == "pgd" else 2)
    # The full test set is evaluated at the end, and the CSV holds the same table as the Parquet file.
    assert (m.split == "test").any()
    csv = pd.read_csv(store.path / "metrics.csv")
    assert len(csv) == len(m) and list(csv.columns) == list(m.columns)
    manifest = store.read_json("manifest.json")
    assert manifest["seed"] == 0 and "torch" in manifest and manifest["dataset"]["probe"] == 64
    from robustdrop.environment import manifest as machine  # the machine's part comes from robustdrop.environment

    assert set(machine("cpu")) <= set(manifest) and manifest["device_name"] == machine("cpu")["device_name"]


def test_a_method_registered_by_a_user_is_accepted_end_to_end(synthetic_data, tmp_path, monkeypatch):
    from robustdrop.attacks import FGSM
    from robustdrop.cli import build_parser
    from robustdrop.methods import AttackTraining, register_method
    from robustdrop.methods.registry import METHODS

    with monkeypatch.context() as patch:
        patch.setattr(METHODS, "_entries", dict(METHODS._entries))  # forgotten after the block

        @register_method("half-fgsm")
        def _half_fgsm(config):
            return AttackTraining("half-fgsm", FGSM(config.epsilon / 2))

        args = build_parser().parse_args(["track", "--method", "half-fgsm"])
        assert args.method == "half-fgsm"
        store = track(small_config(method="half-fgsm", epochs=1), runs_dir=tmp_path, name="half",
                      data=synthetic_data, progress=False)
        train = store.metrics().query("split == 'train' and metric == 'loss'")
        assert list(train.attack) == ["half-fgsm"] and train.epsilon.iloc[0] == pytest.approx(4 / 255)
    with pytest.raises(RobustdropError, match="unknown method 'half-fgsm'; choose one of: fgsm, rs-fgsm, pgd"):
        small_config(method="half-fgsm")


class CrashAt(Hook):
    """Raises in the middle of an epoch, as a kill would interrupt it."""

    name = "crash"

    def __init__(self, step):
        super().__init__(every_n_steps=1)
        self.crash_step = step

    def on_train_step(self, run, batch, out):
        if run.step == self.crash_step:
            raise KeyboardInterrupt


@pytest.mark.parametrize("overrides", [
    {},
    # SGD with CyclicLR-style momentum cycling (the APART authors' recipe): the momentum at each
    # step follows from the schedule's position, which the checkpoint carries.
    {"optimizer": "sgd", "lr": 0.02, "cycle_momentum": True, "base_momentum": 0.8, "max_momentum": 0.95},
], ids=["adam", "sgd-cycle-momentum"])
def test_resume_after_interruption_equals_uninterrupted_run(synthetic_data, tmp_path, overrides):
    cfg = small_config(epochs=4, method="rs-fgsm", **overrides)
    straight = track(cfg, runs_dir=tmp_path, name="straight", data=synthetic_data, progress=False)
    steps_per_epoch = 448 // 64
    with pytest.raises(KeyboardInterrupt):
        track(cfg, runs_dir=tmp_path, name="killed", data=synthetic_data, progress=False,
              hooks=[CrashAt(2 * steps_per_epoch + 3)])
    partial = RunStore.open(tmp_path / "killed")
    assert partial.metrics().epoch.max() == 2  # epoch 3 died before being logged
    resumed = resume(tmp_path / "killed", data=synthetic_data, progress=False)
    pd.testing.assert_frame_equal(comparable(straight), comparable(RunStore.open(resumed.path)))
    assert [e["kind"] for e in resumed.events() if e["kind"] != "estimate"] == ["resume"]
    if overrides.get("cycle_momentum"):
        m = straight.metrics()
        momentum = m[m.metric == "momentum"].value.tolist()
        # The last step (6, 13, 20, 27) of each epoch in a 28-step triangle that peaks at 0.4·28 steps.
        scale = [s / (0.4 * 28) if s <= 0.4 * 28 else (1 - s / 28) / 0.6 for s in (6, 13, 20, 27)]
        assert momentum == pytest.approx([0.95 - 0.15 * x for x in scale])


def test_resume_of_finished_run_does_nothing(synthetic_data, tmp_path, capsys):
    track(small_config(epochs=1), runs_dir=tmp_path, name="done", data=synthetic_data, progress=False)
    before = (tmp_path / "done" / "metrics.csv").read_bytes()
    resume(tmp_path / "done", data=synthetic_data, progress=False)
    assert "already finished" in capsys.readouterr().out
    assert (tmp_path / "done" / "metrics.csv").read_bytes() == before


def test_existing_run_directory_is_refused_and_untouched(synthetic_data, tmp_path):
    track(small_config(epochs=1), runs_dir=tmp_path, name="r", data=synthetic_data, progress=False)
    before = {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir() if p.is_file()}
    with pytest.raises(RobustdropError, match="--resume"):
        track(small_config(epochs=1), runs_dir=tmp_path, name="r", data=synthetic_data, progress=False)
    assert {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir() if p.is_file()} == before


def test_corrupt_checkpoint_gives_clear_error(synthetic_data, tmp_path):
    track(small_config(epochs=1), runs_dir=tmp_path, name="r", data=synthetic_data, progress=False)
    ckpt = tmp_path / "r" / "checkpoints" / "last.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    with pytest.raises(RobustdropError, match="corrupt"):
        resume(tmp_path / "r", data=synthetic_data, progress=False)


def test_mismatched_checkpoint_gives_clear_error(synthetic_data, tmp_path):
    track(small_config(epochs=1), runs_dir=tmp_path, name="a", data=synthetic_data, progress=False)
    track(small_config(epochs=2, width=8), runs_dir=tmp_path, name="b", data=synthetic_data, progress=False)
    (tmp_path / "a" / "checkpoints" / "last.pt").write_bytes((tmp_path / "b" / "checkpoints" / "last.pt").read_bytes())
    with pytest.raises(RobustdropError, match="does not match"):
        resume(tmp_path / "a", data=synthetic_data, progress=False)


def test_run_written_before_a_config_field_existed_still_resumes(synthetic_data, tmp_path):
    """A newer robustdrop adds config fields; resuming an older run must not call it a mismatch."""
    import torch

    with pytest.raises(KeyboardInterrupt):
        track(small_config(epochs=2), runs_dir=tmp_path, name="old", data=synthetic_data, progress=False,
              hooks=[CrashAt(448 // 64 + 2)])
    run = tmp_path / "old"
    store = RunStore.open(run)
    config = store.read_json(RunStore.CONFIG)
    del config["gradalign_lambda"]  # as if the field did not exist when the run was made
    store.write_json(RunStore.CONFIG, config)
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    del state["config"]["gradalign_lambda"]
    torch.save(state, run / "checkpoints" / "last.pt")
    resume(run, data=synthetic_data, progress=False)
    assert RunStore.open(run).metrics()["epoch"].max() == 2


def test_nan_loss_stops_with_clear_error(synthetic_data, tmp_path, monkeypatch):
    from robustdrop.methods import AttackTraining

    real_step = AttackTraining.train_step

    def diverging_step(self, model, batch, optimizer):
        out = real_step(self, model, batch, optimizer)
        out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(AttackTraining, "train_step", diverging_step)
    with pytest.raises(RobustdropError, match="lower --lr"):
        track(small_config(epochs=2), runs_dir=tmp_path, name="nan", data=synthetic_data, progress=False)
    assert RunStore.open(tmp_path / "nan").events("nan_loss")


def _wait_for(path, predicate, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {path}")


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_cli_run(tmp_path, cifar10_jpeg, cifar10_jpeg_cache_dir):
    """The promise of the README: `kill -9` a run, `--resume` it, get the same metrics."""
    env = {**os.environ, "ROBUSTDROP_CACHE": str(cifar10_jpeg_cache_dir)}
    args = [sys.executable, "-m", "robustdrop", "track", "--preset", "quick", "--train-subset", "3000",
            "--val-size", "200", "--probe-size", "100", "--epochs", "4", "--eval-pgd-steps", "3",
            "--diagnostics", "none", "--no-progress", "--runs-dir", str(tmp_path), "--threads", "1"]
    subprocess.run(args + ["--name", "straight"], env=env, check=True, capture_output=True)

    proc = subprocess.Popen(args + ["--name", "killed"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    last = tmp_path / "killed" / "checkpoints" / "last.pt"
    _wait_for(last, lambda: True)
    time.sleep(0.3)  # inside epoch 2 (or later): the kill lands mid-epoch or mid-write
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = subprocess.run([sys.executable, "-m", "robustdrop", "track", "--resume", str(tmp_path / "killed"),
                           "--no-progress"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    pd.testing.assert_frame_equal(comparable(RunStore.open(tmp_path / "straight")),
                                  comparable(RunStore.open(tmp_path / "killed")))
