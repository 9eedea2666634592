"""Long runs as users type them: the cost estimate after a warm-up, ``--dry-run``, whole-run
progress across ``--resume``, and extending a run with ``--resume RUN --epochs N``."""

from __future__ import annotations

import json
import re
import statistics

import pandas as pd
import pytest
import torch
from helpers_runs import small_config

from robustdrop.api import resume, track
from robustdrop.cli import main
from robustdrop.engine import Hook
from robustdrop.errors import RobustdropError
from robustdrop.store import RunStore

KEYS = ["epoch", "step", "split", "metric", "attack", "epsilon", "steps", "step_size", "restarts", "n", "source"]


def comparable(path) -> pd.DataFrame:
    frame = RunStore.open(path).metrics()
    return frame[~frame.metric.str.startswith("time")].reset_index(drop=True)


# ---------------------------------------------------------------------------------------------
# cost estimate and dry run
# ---------------------------------------------------------------------------------------------
def test_cost_estimate_is_printed_and_within_two_of_the_measured_epoch(synthetic_data, tmp_path, capsys, one_thread):
    cfg = small_config(width=16, epochs=4, eval_pgd_steps=3)
    store = track(cfg, runs_dir=tmp_path, name="r", data=synthetic_data, progress=False)
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("cost estimate")]
    assert len(lines) == 1 and "s/step" in lines[0] and "whole run (4 epochs)" in lines[0]
    (event,) = store.events("estimate")
    assert event["steps_timed"] == 5 and event["steps_per_epoch"] == 7 and event["eval_examples_timed"] == 32
    m = store.metrics()
    per_epoch = m[m.metric.isin(["time_train_s", "time_eval_s"])].groupby("epoch").value.sum()
    measured = statistics.median(per_epoch.tolist())
    assert measured / 2 <= event["epoch_s"] <= 2 * measured, (event, per_epoch.tolist())


def test_long_runs_get_advice():
    from robustdrop.engine.estimate import Estimate

    estimate = Estimate(device="cpu (x86_64, 2 threads)", on_cpu=True, seconds_per_step=2.75, steps_timed=5,
                        steps_per_epoch=383, epochs=200, epochs_left=200, train_s=2.75 * 383 * 200, eval_s=200 * 120,
                        eval_examples_timed=32, diagnostics=True)
    line = estimate.line()
    assert "about 65h" in line and "--preset quick" in line and "GPU" in line and "--train-subset" in line
    assert Estimate(**{**estimate.__dict__, "on_cpu": False}).advice() is not None  # 65 h on a GPU is long too
    assert Estimate(**{**estimate.__dict__, "train_s": 60.0, "eval_s": 10.0}).advice() is None


def test_dry_run_prints_config_and_estimate_and_writes_nothing(image_folder, folder_cache, tmp_path, capsys):
    runs = tmp_path / "runs"
    code = main(["track", "--dataset", f"folder:{image_folder}", "--model", "cnn1", "--width", "2", "--epochs", "3",
                 "--batch-size", "32", "--val-size", "32", "--probe-size", "32", "--threads", "1", "--runs-dir",
                 str(runs), "--name", "r", "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0
    config = json.loads(out[out.index("{"):out.index("}\n") + 1])
    assert config["epochs"] == 3 and config["model"] == "cnn1"
    assert re.search(r"cost estimate on cpu .* s/step .* whole run \(3 epochs\): about", out)
    assert "nothing was written" in out
    assert not runs.exists()


def test_dry_run_with_reference_auto_trains_no_referee(image_folder, folder_cache, tmp_path, capsys):
    runs = tmp_path / "runs"
    code = main(["track", "--dataset", f"folder:{image_folder}", "--model", "cnn1", "--width", "2", "--epochs", "2",
                 "--batch-size", "32", "--val-size", "32", "--probe-size", "32", "--threads", "1", "--runs-dir",
                 str(runs), "--diagnostics", "default", "--reference", "auto", "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0 and "--reference auto: a dry run neither trains" in out
    assert '"reference": "auto"' in out  # the resolved config is the one the run would use
    assert not runs.exists() and not (folder_cache / "referees").exists()


# ---------------------------------------------------------------------------------------------
# whole-run progress across resume
# ---------------------------------------------------------------------------------------------
class StopIn(Hook):
    name = "stop-in"

    def __init__(self, epoch):
        super().__init__(every_n_steps=1)
        self.epoch = epoch

    def on_train_step(self, run, batch, out):
        if run.epoch == self.epoch:
            raise KeyboardInterrupt


def test_run_progress_counts_the_whole_run_across_resume(synthetic_data, tmp_path, capsys, one_thread):
    cfg = small_config(epochs=3)
    with pytest.raises(KeyboardInterrupt):
        track(cfg, runs_dir=tmp_path, name="r", data=synthetic_data, progress=False, hooks=[StopIn(3)])
    before = torch.load(tmp_path / "r" / "checkpoints" / "last.pt", weights_only=True)["elapsed_s"]
    assert "run 2/3 epochs" in capsys.readouterr().out
    resume(tmp_path / "r", data=synthetic_data, progress=False)
    out = capsys.readouterr().out
    after = torch.load(tmp_path / "r" / "checkpoints" / "last.pt", weights_only=True)["elapsed_s"]
    assert after > before > 0  # the elapsed time continues from the checkpoint's
    summary = [line for line in out.splitlines() if line.startswith("epoch   3/3")]
    assert len(summary) == 1 and re.search(r"run 3/3 epochs, \d+s elapsed, ~0s left", summary[0])


# ---------------------------------------------------------------------------------------------
# extension
# ---------------------------------------------------------------------------------------------
def extra_rows(longer: pd.DataFrame, shorter: pd.DataFrame) -> pd.DataFrame:
    """Rows of ``longer`` whose key is not in ``shorter`` (values aside)."""
    merged = longer.merge(shorter[KEYS].drop_duplicates(), on=KEYS, how="left", indicator=True)
    return merged[merged["_merge"] == "left_only"].drop(columns="_merge")


@pytest.mark.parametrize("schedule,extra", [
    ("cyclic-repeat", dict(cycle_epochs=2, diagnostics=["strength:n=64", "collapse"])),
    ("piecewise", dict(lr_milestones=[0.5], optimizer="sgd", lr=0.05)),
    ("constant", {}),
])
def test_extended_run_equals_a_run_planned_that_long(schedule, extra, synthetic_data, tmp_path, one_thread):
    """Extending 2 -> 4 epochs gives the metrics of a run planned for 4 from the start (a piecewise
    run's milestones stay at their epochs: the planned run says so with --schedule-epochs 2).

    The one legitimate difference is what the original run did at its end, epoch 2: the full test
    set evaluation (and diagnostics whose cadence includes the last epoch). Those rows are extra;
    every other row is equal."""
    short = small_config(schedule=schedule, epochs=2, **extra)
    planned = small_config(schedule=schedule, epochs=4, schedule_epochs=2 if schedule == "piecewise" else None,
                           **extra)
    long_run = track(planned, runs_dir=tmp_path, name="planned", data=synthetic_data, progress=False)
    track(short, runs_dir=tmp_path, name="extended", data=synthetic_data, progress=False)
    resume(tmp_path / "extended", epochs=4, data=synthetic_data, progress=False)

    ext, ref = comparable(tmp_path / "extended"), comparable(long_run.path)
    extras = extra_rows(ext, ref)
    assert set(zip(extras.epoch, extras.split)) == {(2, "test")}  # the old end's full test evaluation
    kept = ext.merge(extras[KEYS], on=KEYS, how="left", indicator=True)
    kept = kept[kept["_merge"] == "left_only"].drop(columns="_merge")
    pd.testing.assert_frame_equal(kept.reset_index(drop=True), ref)

    store = RunStore.open(tmp_path / "extended")
    config = store.read_json("config.json")
    assert config["epochs"] == 4 and config["schedule_epochs"] == (2 if schedule == "piecewise" else None)
    (event,) = store.events("extend")
    assert (event["from_epochs"], event["to_epochs"], event["epoch"]) == (2, 4, 2)
    (change,) = store.read_json("manifest.json")["config_history"]
    assert change["changes"]["epochs"] == [2, 4] and change["epoch"] == 2
    if schedule == "piecewise":  # the LR after the old end stays at its last value
        lr = store.metrics().query("metric == 'lr'").value.tolist()
        assert lr[1] == lr[2] == lr[3] == pytest.approx(0.005)


def test_extending_a_one_cycle_run_is_refused_with_the_alternative(synthetic_data, tmp_path, one_thread):
    track(small_config(epochs=1), runs_dir=tmp_path, name="r", data=synthetic_data, progress=False)
    before = {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir() if p.is_file()}
    with pytest.raises(RobustdropError, match=r"--schedule cyclic is one LR cycle .* --schedule cyclic-repeat "
                                              r"--cycle-epochs 1 --epochs 3"):
        resume(tmp_path / "r", epochs=3, data=synthetic_data, progress=False)
    assert {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir() if p.is_file()} == before


def test_an_extension_is_not_a_shortening_and_a_stopped_run_stays_stopped(synthetic_data, tmp_path, one_thread):
    track(small_config(epochs=2, schedule="constant"), runs_dir=tmp_path, name="r", data=synthetic_data,
          progress=False)
    with pytest.raises(RobustdropError, match="extended, not shortened"):
        resume(tmp_path / "r", epochs=1, data=synthetic_data, progress=False)

    class Stop(Hook):
        name = "stopper"

        def on_epoch_end(self, run, epoch):
            run.request_stop("a test asked")

    track(small_config(epochs=3, schedule="constant"), runs_dir=tmp_path, name="s", data=synthetic_data,
          progress=False, hooks=[Stop()])
    with pytest.raises(RobustdropError, match="stopped at epoch 1 of 3"):
        resume(tmp_path / "s", epochs=5, data=synthetic_data, progress=False)
