"""``robustdrop sweep``: grid parsing and naming, the sweep record (resume / --extend rules), real
cells in worker processes (a failing cell, SIGKILL + resume), reading a sweep, and the Ray backend.

Cells that train use a tiny image-folder dataset (``folder:PATH``, 16x16, a few hundred images)
cached in a test-private ``$ROBUSTDROP_CACHE``, cnn1 and one thread, so a cell takes seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

import robustdrop
from robustdrop.cli import main
from robustdrop.data import load_dataset, make_synthetic, write_image_folder
from robustdrop.errors import RobustdropError
from robustdrop.plots.sweeps import compare_sweep, format_sweep_table, plot_onset, std_error, sweep_metrics
from robustdrop.store import RunStore, SweepRecord
from robustdrop.sweeps import parse_grid, plan_sweep, read_toml, toml_text
from robustdrop.sweeps.runner import open_sweep

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# Grid words, values, names
# --------------------------------------------------------------------------------------------
def test_grid_words_read_values_like_track_flags():
    grid = parse_grid(["seed=0:3,10", "epsilon=8/255,0.05", "method=fgsm,rs-fgsm", "augment=true,no",
                       "diagnostics=none,default+landscape", "width=none,4", "train-subset=100"])
    assert grid["seed"] == [0, 1, 2, 10]  # a:b is range(a, b)
    assert grid["epsilon"] == [8 / 255, 0.05]
    assert grid["method"] == ["fgsm", "rs-fgsm"]
    assert grid["augment"] == [True, False]
    assert grid["diagnostics"] == [["none"], ["default", "landscape"]]
    assert grid["width"] == [None, 4.0]
    assert grid["train_subset"] == [100]


@pytest.mark.parametrize("words, message", [
    (["foo=1"], "unknown sweep key 'foo'; valid keys .*seed"),
    (["seed=3:1"], "empty"),
    (["epsilon=0:3"], "not an integer"),
    (["epochs=ten"], "cannot read 'ten' as int"),
    (["seed=1,1"], "twice"),
    (["method=fgsm,nope"], "not one of fgsm"),
    (["seed"], "not key=values"),
    (["seed=1", "seed=2"], "given twice"),
])
def test_bad_grid_words_are_one_line_errors(words, message):
    with pytest.raises(RobustdropError, match=message) as info:
        plan_sweep(parse_grid(words), preset="quick")
    assert "\n" not in str(info.value)


def test_cell_names_come_from_the_varied_values_only_and_are_stable():
    plan = plan_sweep(parse_grid(["seed=0:2", "epsilon=8/255,2.5/255", "method=fgsm+"]), preset="quick",
                      fixed={"epochs": 3})
    names = [c.name for c in plan.cells]
    assert "epsilon=8_255-method=fgsm+-seed=0" in names
    assert "epsilon=2.5_255-method=fgsm+-seed=1" in names
    assert all("/" not in n and " " not in n and "epochs" not in n for n in names)
    swapped = plan_sweep(parse_grid(["method=fgsm+", "epsilon=8/255,2.5/255", "seed=0:2"]), preset="quick",
                         fixed={"epochs": 3})
    assert sorted(c.name for c in swapped.cells) == sorted(names)
    cell = plan.cell("epsilon=8_255-method=fgsm+-seed=1")
    assert (cell.config.epsilon, cell.config.seed, cell.config.epochs, cell.config.model) == (8 / 255, 1, 3, "cnn1")
    assert plan.name == "quick-epsilon-method-seed"


def test_every_cell_is_validated_before_anything_is_created(tmp_path):
    with pytest.raises(RobustdropError, match=r"cell epsilon=510_255.*--epsilon must be in"):
        plan_sweep(parse_grid(["epsilon=8/255,2"]), preset="quick")
    with pytest.raises(RobustdropError, match="unknown diagnostic|diagnostic"):
        plan_sweep(parse_grid(["diagnostics=default,nosuch"]), preset="quick")
    with pytest.raises(RobustdropError, match="both varied"):
        plan_sweep(parse_grid(["seed=0:2"]), fixed={"seed": 3})
    code = main(["sweep", "--preset", "quick", "--grid", "seed=0:2", "epsilon=8/255,2", "--runs-dir", str(tmp_path)])
    assert code == 2 and not any(tmp_path.iterdir())


def test_toml_file_says_the_same_as_grid_words(tmp_path):
    toml = tmp_path / "study.toml"
    toml.write_text('[sweep]\nname = "eps-study"\npreset = "quick"\n[sweep.grid]\nseed = "0:3"\n'
                    'epsilon = ["8/255", "12/255"]\nmethod = "fgsm,apart"\n[sweep.fixed]\nepochs = 10\n'
                    'eval_epsilon = "8/255"\n')
    spec = read_toml(toml)
    from_file = plan_sweep(spec["grid"], preset=spec["preset"], fixed=spec["fixed"], name=spec["name"])
    from_words = plan_sweep(parse_grid(["seed=0:3", "epsilon=8/255,12/255", "method=fgsm,apart"]), preset="quick",
                            fixed={"epochs": 10, "eval_epsilon": 8 / 255}, name="eps-study")
    assert [(c.name, c.config) for c in from_file.cells] == [(c.name, c.config) for c in from_words.cells]
    assert len(from_file.cells) == 12 and from_file.name == "eps-study"
    (tmp_path / "bad.toml").write_text("[sweep]\npreset = 'quick'\n")
    with pytest.raises(RobustdropError, match="neither \\[sweep.grid\\] values nor"):
        read_toml(tmp_path / "bad.toml")
    # A bare cell name with a dot is a nested table in TOML: one line naming the cell, not "unknown key '5-s0'".
    (tmp_path / "dotted.toml").write_text('[sweep]\n[sweep.cells]\nfgsm-a2.5-s0 = {alpha = "2.5/255"}\n')
    with pytest.raises(RobustdropError, match=r"cell fgsm-a2\.5-s0: a dot in a bare TOML key .*quote"):
        read_toml(tmp_path / "dotted.toml")
    (tmp_path / "quoted.toml").write_text('[sweep]\n[sweep.cells]\n"fgsm-a2.5-s0" = {alpha = "2.5/255"}\n')
    assert list(read_toml(tmp_path / "quoted.toml")["cells"]) == ["fgsm-a2.5-s0"]


def test_toml_text_reads_back_as_the_same_sweep(tmp_path):
    """toml_text writes what read_toml reads: grid, fixed values and named cells plan the same cells."""
    spec = {"name": "s", "preset": "quick", "grid": {"seed": "0:2"}, "fixed": {"method": "fgsm", "threads": 1},
            "cells": {"a-1": {"alpha": "2.5/255", "epsilon": "8/255"}}}
    path = tmp_path / "s.toml"
    path.write_text(toml_text(spec, comments=["made by a test"]))
    assert path.read_text().startswith("# made by a test\n[sweep]\nname = \"s\"\n")
    back = read_toml(path)
    plans = [plan_sweep(parse_grid(["seed=0:2"]), preset="quick", fixed={"method": "fgsm", "threads": 1}, name="s",
                        cells={"a-1": {"alpha": "2.5/255", "epsilon": "8/255"}}),
             plan_sweep(back["grid"], preset=back["preset"], fixed=back["fixed"], name=back["name"], cells=back["cells"])]
    assert [(c.name, c.config) for c in plans[0].cells] == [(c.name, c.config) for c in plans[1].cells]
    assert len(plans[1].cells) == 3


# --------------------------------------------------------------------------------------------
# The record: reruns, --extend, fixed values
# --------------------------------------------------------------------------------------------
def _plan(seeds: str, **fixed):
    return plan_sweep(parse_grid([f"seed={seeds}", "epsilon=8/255,12/255"]), preset="quick", name="s",
                      fixed={"epochs": 2, **fixed})


def test_a_changed_grid_is_refused_unless_extend_which_only_adds(tmp_path):
    record = open_sweep(_plan("0:2"), tmp_path, command=["robustdrop", "sweep"])
    doc = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert doc["grid"] == {"seed": [0, 1], "epsilon": [8 / 255, 12 / 255]} and doc["command"] == ["robustdrop", "sweep"]
    assert doc["robustdrop"] == robustdrop.__version__
    cell = doc["cells"]["epsilon=8_255-seed=1"]
    assert cell["status"] == "pending" and cell["config"]["seed"] == 1 and cell["config"]["epochs"] == 2
    assert set(record.cells) == {c.name for c in _plan("0:2").cells}

    open_sweep(_plan("0:2"), tmp_path)  # the same grid again: fine
    with pytest.raises(RobustdropError, match="--extend"):
        open_sweep(_plan("0:3"), tmp_path)
    grown = open_sweep(_plan("0:3"), tmp_path, extend=True)
    assert len(grown.cells) == 6 and SweepRecord.open(tmp_path / "s").grid["seed"] == [0, 1, 2]
    with pytest.raises(RobustdropError, match="only adds cells"):
        open_sweep(_plan("1:3"), tmp_path, extend=True)
    with pytest.raises(RobustdropError, match="fixed values differ.*epochs.*also with --extend"):
        open_sweep(_plan("0:3", epochs=3), tmp_path, extend=True)
    with pytest.raises(RobustdropError, match="keys"):
        open_sweep(plan_sweep(parse_grid(["seed=0:3"]), preset="quick", name="s", fixed={"epochs": 2}), tmp_path,
                   extend=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("mine")
    with pytest.raises(RobustdropError, match="not a sweep directory"):
        open_sweep(plan_sweep(parse_grid(["seed=0:2"]), name="other"), tmp_path)
    assert (tmp_path / "other" / "x.txt").read_text() == "mine"
    # adopt: a folder of runs (and other entries) becomes the sweep directory; its files stay
    adopted = open_sweep(plan_sweep(parse_grid(["seed=0:2"]), name="other"), tmp_path, adopt=True)
    assert set(adopted.cells) == {"seed=0", "seed=1"} and (tmp_path / "other" / "x.txt").read_text() == "mine"
    (tmp_path / "third" / "seed=0").mkdir(parents=True)  # named like a cell, but not a run: refused
    with pytest.raises(RobustdropError, match="not a sweep directory"):
        open_sweep(plan_sweep(parse_grid(["seed=0:2"]), name="third"), tmp_path, adopt=True)


# --------------------------------------------------------------------------------------------
# Real cells
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A 16x16 image tree (384 train / 96 test, 4 classes) and a private, pre-filled dataset cache."""
    root = tmp_path_factory.mktemp("tiny-images")
    data = make_synthetic(n_train=384, n_test=96, num_classes=4, size=16, seed=0)
    write_image_folder(data, root / "data")
    back = load_dataset(f"folder:{root / 'data'}", cache_dir=str(root / "cache"))  # read back exactly (by class)
    order = torch.argsort(data.train_y, stable=True)
    assert torch.equal(back.train_x, data.train_x[order]) and torch.equal(back.train_y, data.train_y[order])
    return {"dataset": f"folder:{root / 'data'}", "cache": str(root / "cache")}


@pytest.fixture
def tiny_env(tiny_folder, monkeypatch):
    monkeypatch.setenv("ROBUSTDROP_CACHE", tiny_folder["cache"])  # the cells' processes inherit it
    return tiny_folder


def tiny_fixed(dataset: str, epochs: int = 2) -> dict:
    return dict(dataset=dataset, model="cnn1", width=4, epochs=epochs, batch_size=64, val_size=32, probe_size=32,
                eval_pgd_steps=2, eval_batch_size=128, diagnostics=["none"], threads=1, optimizer="adam", lr=0.003)


def comparable(path: Path) -> pd.DataFrame:
    frame = RunStore.open(path).metrics()
    return frame[~frame.metric.str.startswith("time_")].reset_index(drop=True)


def test_data_size_errors_are_found_before_the_sweep_starts(tiny_env, tmp_path, capsys):
    """A cell asking for more test images than the data has is refused before anything is written
    (not one failed cell after the others ran), with the cell named, as one line (exit 2)."""
    fixed = tiny_fixed(tiny_env["dataset"])
    fixed.pop("probe_size")
    with pytest.raises(RobustdropError, match=r"cell probe_size=500: --probe-size 500 is larger than the test set .*"
                                              r"\(96 examples\)"):
        robustdrop.sweep({"probe_size": [32, 500]}, name="sizes", runs_dir=tmp_path, progress=False, **fixed)
    assert not (tmp_path / "sizes").exists()
    code = main(["sweep", "--grid", "probe_size=32,500", "--name", "sizes", "--runs-dir", str(tmp_path),
                 "--no-progress", *_flags(fixed)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "cell probe_size=500" in err
    assert not (tmp_path / "sizes").exists()


def test_a_cell_running_under_another_driver_is_found_by_its_run_lock(tmp_path):
    """Whoever holds a cell's run lock (here this process, as another driver's cell would, on any
    host) makes a second driver refuse before it changes anything."""
    from robustdrop.store import RunLock
    from robustdrop.sweeps.runner import run_sweep

    plan = plan_sweep({"seed": [0, 1]}, fixed=tiny_fixed("cifar10-jpeg"), name="busy")
    record = open_sweep(plan, tmp_path)
    (record.path / "seed=1").mkdir()
    before = (record.path / "sweep.json").read_text()
    with RunLock(record.path / "seed=1"):
        with pytest.raises(RobustdropError, match=rf"cell seed=1 is running: another `robustdrop sweep` drives .*"
                                                  rf"pid {os.getpid()}, host {socket.gethostname()}"):
            run_sweep(plan, runs_dir=tmp_path, progress=False)
    assert (record.path / "sweep.json").read_text() == before


@pytest.mark.slow
def test_a_failing_cell_is_recorded_and_the_others_finish(tiny_env, tmp_path, capsys):
    fixed = tiny_fixed(tiny_env["dataset"])
    datasets = [fixed.pop("dataset"), f"folder:{tmp_path / 'missing'}"]  # the second fails when it starts
    table = robustdrop.sweep({"seed": "0:2", "dataset": datasets}, name="f", runs_dir=tmp_path, jobs=2,
                             progress=False, **fixed)
    out = capsys.readouterr().out
    record = SweepRecord.open(tmp_path / "f")
    bad = [c for c in record.cells if "missing" in c]
    good = [c for c in record.cells if c not in bad]
    assert len(bad) == 2 and len(good) == 2
    for c in bad:
        assert record.status(c) == "failed" and "missing" in record.cells[c]["error"]
        assert f"FAILED {c}" in out
    for c in good:
        assert record.status(c) == "finished" and (tmp_path / "f" / c / "metrics.parquet").is_file()
        assert f"done   {c}: probe PGD best" in out
    assert sorted(table.attrs["failed"]) == sorted(bad)
    # The tidy table: every started cell's rows, its varied values as cfg_ columns.
    assert set(table["cell"]) == set(good) and {"cfg_seed", "cfg_dataset", "epsilon", "metric"} <= set(table.columns)
    assert set(table["cfg_seed"]) == {0, 1}
    pd.testing.assert_frame_equal(table, robustdrop.load_sweep(tmp_path / "f"))
    # A rerun skips the finished cells and tries the failed ones again; the exit status says so.
    before = {c: (tmp_path / "f" / c / "metrics.csv").stat().st_mtime_ns for c in good}
    code = main(["sweep", "--grid", "seed=0:2", f"dataset={','.join(datasets)}", "--name", "f",
                 "--runs-dir", str(tmp_path), "--no-progress"] + _flags(fixed))
    assert code == 1
    assert "2 finished, 0 to resume, 2 to start" in capsys.readouterr().out
    assert {c: (tmp_path / "f" / c / "metrics.csv").stat().st_mtime_ns for c in good} == before
    assert all(SweepRecord.open(tmp_path / "f").cells[c]["attempts"] == 2 for c in bad)


def _flags(fixed: dict) -> list[str]:
    out: list[str] = []
    for k, v in fixed.items():
        out += [f"--{k.replace('_', '-')}", *(map(str, v) if isinstance(v, list) else [str(v)])]
    return out


def _sweep_cmd(runs_dir: Path, name: str, fixed: dict) -> list[str]:
    return [sys.executable, "-m", "robustdrop.cli", "sweep", "--grid", "seed=0:2", "--name", name, "--runs-dir",
            str(runs_dir), "--jobs", "1", "--no-progress", *_flags(fixed)]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


@pytest.mark.slow
def test_sigkill_of_a_cell_then_rerun_equals_an_uninterrupted_sweep(tiny_env, tmp_path):
    fixed = tiny_fixed(tiny_env["dataset"], epochs=6)
    straight = subprocess.run(_sweep_cmd(tmp_path, "straight", fixed), env=_env(), capture_output=True, text=True,
                              timeout=300)
    assert straight.returncode == 0, straight.stdout + straight.stderr

    driver = subprocess.Popen(_sweep_cmd(tmp_path, "killed", fixed), env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    first = "seed=0"
    last_pt = tmp_path / "killed" / first / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 240
    pid = None
    while time.monotonic() < deadline and pid is None:  # proof it is mid-cell: epoch 1 checkpointed, not finished
        if last_pt.is_file():
            entry = json.loads((tmp_path / "killed" / "sweep.json").read_text())["cells"][first]
            epochs_done = RunStore.open(tmp_path / "killed" / first).metrics().epoch.max()
            if entry["status"] == "running" and epochs_done < fixed["epochs"]:
                pid = entry["pid"]
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.02)
    out, _ = driver.communicate(timeout=240)
    assert pid is not None, "never saw the cell mid-run: " + out
    assert driver.returncode == 1, out
    record = SweepRecord.open(tmp_path / "killed")
    assert record.status(first) == "failed" and "SIGKILL" in record.cells[first]["error"]
    assert record.status("seed=1") == "finished"  # the other cell went on

    rerun = subprocess.run(_sweep_cmd(tmp_path, "killed", fixed), env=_env(), capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "1 finished, 1 to resume, 0 to start" in rerun.stdout
    assert "resuming" in (tmp_path / "killed" / "logs" / f"{first}.log").read_text()
    for cell in ("seed=0", "seed=1"):
        pd.testing.assert_frame_equal(comparable(tmp_path / "straight" / cell), comparable(tmp_path / "killed" / cell))


def test_a_cell_stopped_by_sigterm_exits_143_and_is_recorded_as_stopped(tiny_env, tmp_path, capsys):
    """SIGTERM to a training cell: the engine checkpoints, the process exits 143, sweep.json says
    ``stopped`` (not ``failed``) and the sweep's summary says rerunning continues it."""
    import threading

    from robustdrop.sweeps.runner import run_sweep

    fixed = tiny_fixed(tiny_env["dataset"], epochs=40)  # far longer than it takes to see epoch 1
    plan = plan_sweep({"seed": [0]}, fixed=fixed, name="term")
    run = tmp_path / "term" / "seed=0"
    signalled: list[int] = []

    def stop_mid_run() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not signalled:
            if (run / "checkpoints" / "last.pt").is_file():
                pid = json.loads((tmp_path / "term" / "sweep.json").read_text())["cells"]["seed=0"]["pid"]
                os.kill(pid, signal.SIGTERM)
                signalled.append(pid)
            time.sleep(0.02)

    watcher = threading.Thread(target=stop_mid_run)
    watcher.start()
    result = run_sweep(plan, runs_dir=tmp_path, jobs=1, progress=False)
    watcher.join()
    assert signalled, "never saw the cell's first checkpoint"
    assert result.stopped == ["seed=0"] and result.failed == []
    entry = SweepRecord.open(tmp_path / "term").cells["seed=0"]
    assert entry["status"] == "stopped" and entry["returncode"] == 143 and "SIGTERM" in entry["error"]
    cell_result = json.loads((tmp_path / "term" / "logs" / "seed=0.result.json").read_text())
    assert cell_result["stopped"] is True and cell_result["ok"] is False
    assert "STOPPED seed=0" in capsys.readouterr().out
    assert RunStore.open(run).metrics().epoch.max() < 40  # stopped mid-run, with a checkpoint to continue from


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
def test_sigterm_to_the_driver_stops_its_cells_and_the_same_command_continues(tiny_env, tmp_path):
    """``kill <driver>`` (a scheduler, ``timeout``) during a sweep: the running cell gets SIGTERM
    too (no orphan), is recorded as stopped, the driver exits 143; the same command finishes it."""
    # 150 epochs: seconds even on an idle machine, where 5 tiny epochs ended before the driver's
    # 0.2 s poll could pass the SIGTERM on
    fixed = tiny_fixed(tiny_env["dataset"], epochs=150)
    cmd = [sys.executable, "-m", "robustdrop.cli", "sweep", "--grid", "seed=0", "--name", "t", "--runs-dir",
           str(tmp_path), "--jobs", "1", "--no-progress", *_flags(fixed)]
    record_file, run = tmp_path / "t" / "sweep.json", tmp_path / "t" / "seed=0"
    driver = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    pid = None
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and pid is None and driver.poll() is None:
            if run.is_dir():  # the cell's process is in the engine (before or in training)
                pid = json.loads(record_file.read_text())["cells"]["seed=0"]["pid"]
                driver.send_signal(signal.SIGTERM)
            time.sleep(0.02)
        out, _ = driver.communicate(timeout=60)
        assert pid is not None, "never saw the cell start: " + out
        assert driver.returncode == 143, out
        assert "STOPPED seed=0" in out and "robustdrop: stopped by SIGTERM" in out
        assert not _alive(pid)  # the driver waited for its cell: no orphan left training
        entry = SweepRecord.open(tmp_path / "t").cells["seed=0"]
        assert entry["status"] == "stopped" and entry["returncode"] in (143, -signal.SIGTERM), entry

        rerun = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120)
        assert rerun.returncode == 0, rerun.stdout + rerun.stderr
        assert SweepRecord.open(tmp_path / "t").status("seed=0") == "finished"
        assert RunStore.open(run).metrics().epoch.max() == fixed["epochs"]
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait(timeout=30)
        if pid is not None and _alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_a_cell_process_stopped_outside_training_exits_143_and_reports_stopped(tmp_path):
    """The worker's exit code (what a Ray task or a shell sees) for a SIGTERM outside the
    trainer's handler, and a cell killed by SIGTERM's default action (during interpreter start)."""
    from robustdrop.sweeps.worker import CellProcess, finish_cell, result_path

    plan = plan_sweep({"seed": [0]}, fixed=tiny_fixed("cifar10-jpeg"), name="early")
    record = open_sweep(plan, tmp_path)
    (record.path / "logs").mkdir()

    def run(code: str) -> dict:
        result_path(record.path, "seed=0").unlink(missing_ok=True)  # as start_cell does
        log = open(record.log_path("seed=0"), "a")  # noqa: SIM115 - closed by finish_cell
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT, env=_env())
        return finish_cell(CellProcess(record.path, "seed=0", proc, log, time.perf_counter()))

    in_worker = run("import os, signal, sys; from robustdrop.sweeps import worker; "
                    "worker._run = lambda d, c: os.kill(os.getpid(), signal.SIGTERM); "
                    f"sys.exit(worker.main([{str(record.path)!r}, 'seed=0']))")
    assert in_worker["returncode"] == 143 and in_worker["stopped"] is True and not in_worker["ok"]
    assert in_worker["error"] == "stopped by SIGTERM; rerun the sweep to continue it"
    at_start = run("import os, signal; os.kill(os.getpid(), signal.SIGTERM)")
    assert at_start["returncode"] == -signal.SIGTERM and at_start["stopped"] is True
    killed = run("import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    assert "stopped" not in killed and "SIGKILL" in killed["error"]  # not resumable by design: a failure


# --------------------------------------------------------------------------------------------
# Reading a sweep (synthetic run directories: the numbers are known)
# --------------------------------------------------------------------------------------------
def _fake_sweep(tmp_path: Path) -> Path:
    from helpers_runs import write_synthetic_run

    plan = plan_sweep(parse_grid(["seed=0:3", "epsilon=8/255,12/255"]), preset="quick", name="read")
    record = open_sweep(plan, tmp_path)
    onsets = {("8_255", 0): None, ("8_255", 1): 9, ("8_255", 2): None,
              ("12_255", 0): 5, ("12_255", 1): 7, ("12_255", 2): 4}
    for cell in plan.cells:
        eps = "8_255" if "8_255" in cell.name else "12_255"
        write_synthetic_run(record.path, cell.name, epochs=10, onset=onsets[eps, cell.values["seed"]],
                            train_seconds=3.0 + cell.values["seed"], eval_seconds=1.0, seed=cell.values["seed"])
        record.set_status(cell.name, "finished")
    return record.path


def test_compare_aggregates_a_sweep_over_seeds(tmp_path, capsys):
    from helpers_runs import collapse_pgd_acc

    path = _fake_sweep(tmp_path)
    df = compare_sweep(path).set_index("epsilon")
    big = df.loc[12 / 255]
    assert (big["runs"], big["collapsed"], big["detector_runs"]) == (3, 3, 3)
    assert (big["onset_median"], big["onset_min"], big["onset_max"]) == (5, 4, 7)
    small = df.loc[8 / 255]
    assert small["collapse_rate"] == pytest.approx(1 / 3) and small["onset_median"] == 9
    # best probe PGD: the peak before each onset (no onset: the last epoch); final: the last epoch.
    best = pd.Series([collapse_pgd_acc(o - 1, o) for o in (5, 7, 4)])
    assert big["best_pgd_mean"] == pytest.approx(best.mean())
    assert big["best_pgd_se"] == pytest.approx(best.std(ddof=1) / 3 ** 0.5)
    assert std_error([0.2, None, 0.4]) == pytest.approx(0.1) and pd.isna(std_error([0.2, None]))
    assert big["final_pgd_mean"] == 0 and small["final_pgd_mean"] == pytest.approx((0.40 + 0.40 + 0) / 3)
    assert big["s_per_epoch"] == pytest.approx(4 + 1)  # mean of (3, 4, 5) train + 1 eval
    text = format_sweep_table(compare_sweep(path), "markdown")
    assert "| 12/255 | 3 | 3/3 | 5 (4–7) |" in text and "PGD-20" in text and "n=1000" in text
    assert main(["compare", str(path), "--format", "csv"]) == 0
    csv = capsys.readouterr().out
    assert csv.splitlines()[0].startswith("epsilon,runs,collapsed")
    # Run directories: the varied values are read from their configs (here only the seed differs).
    assert main(["compare", "--by-group", *map(str, sorted(path.glob("epsilon=*")))]) == 0
    assert capsys.readouterr().out.splitlines()[2].split()[:2] == ["6", "4/6"]
    paths = plot_onset(path, tmp_path / "fig")
    assert [p.suffix for p in paths] == [".png", ".pdf"] and all(p.stat().st_size > 1000 for p in paths)


def test_the_tidy_table_carries_the_varied_values(tmp_path):
    path = _fake_sweep(tmp_path)
    df = sweep_metrics(path)
    assert list(df.columns[:3]) == ["cell", "cfg_epsilon", "cfg_seed"]
    assert len(df) == sum(len(RunStore.open(p).metrics()) for p in path.glob("epsilon=*"))
    one = df[df.cell == "epsilon=12_255-seed=1"]
    assert set(one.cfg_seed) == {1} and set(one.cfg_epsilon) == {12 / 255}


@pytest.mark.slow
def test_the_demonstration_analysis_in_smoke_mode(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "analyses"))
    monkeypatch.setenv("ROBUSTDROP_CACHE", str(tmp_path / "cache"))
    import sweep_demo

    assert sweep_demo.main(["--smoke", "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "out")]) == 0
    out = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"sweep_demo.png", "sweep_demo.pdf", "sweep_demo.md", "sweep_demo.csv", "sweep_demo.tex"} <= out
    md = (tmp_path / "out" / "sweep_demo.md").read_text()
    assert "robustdrop sweep --preset quick --grid seed=0:2 epsilon=8/255,12/255" in md and "| 12/255 | 2 |" in md
    assert md.count("| finished |") == 4
    csv = pd.read_csv(tmp_path / "out" / "sweep_demo.csv")
    assert csv["runs"].tolist() == [2, 2]


# --------------------------------------------------------------------------------------------
# Ray
# --------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ray_backend_on_a_local_head_and_worker(tiny_env, tmp_path):
    """A study (a referee, a longer run that needs it, a grid) on a real Ray head and worker
    (loopback): a passed deadline starts nothing; a deadline that falls while cells run stops them
    (SIGTERM: recorded as stopped, exit 143, the cells not yet started stay pending); the same
    command continues them to the end, the dependent cell after its referee."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'robustdrop[cluster]')")
    assert ray
    port = _free_port()
    temp = Path(f"/tmp/rd-ray-{os.getpid()}")  # short: Ray's socket paths must stay under 107 characters
    # HOME of its own: a ~/.ray/auth_token left by another Ray session on this machine would make the
    # driver present a token this test's head does not expect (InvalidAuthToken)
    (tmp_path / "home").mkdir()
    env = {**_env(), "RAY_USAGE_STATS_ENABLED": "0", "HOME": str(tmp_path / "home")}
    ray_cli = str(Path(sys.executable).with_name("ray"))
    common = ["--block", "--node-ip-address", "127.0.0.1", "--disable-usage-stats"]
    started: list[subprocess.Popen] = []
    try:
        started.append(subprocess.Popen(
            [ray_cli, "start", "--head", "--port", str(port), "--num-cpus", "1", "--include-dashboard", "false",
             "--temp-dir", str(temp), *common], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        started.append(subprocess.Popen([ray_cli, "start", "--address", f"127.0.0.1:{port}", "--num-cpus", "1", *common],
                                        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        study = tmp_path / "study.toml"  # a referee, a run that needs it (long enough to be stopped), a grid
        study.write_text('[sweep]\n[sweep.grid]\nseed = "0:2"\n[sweep.cells.referee]\nmethod = "pgd"\n'
                         '[sweep.cells.fgsm-ref]\nreference = "@referee"\ndiagnostics = "strength-ref:n=32"\n'
                         f'epochs = {LONG_EPOCHS}\n')
        cmd = [sys.executable, "-m", "robustdrop.cli", "sweep", "--file", str(study), "--name", "r",
               "--runs-dir", str(tmp_path), "--backend", "ray", "--address", f"127.0.0.1:{port}",
               "--cpus-per-cell", "1", "--no-progress", *_flags(tiny_fixed(tiny_env["dataset"]))]
        for _ in range(60):  # wait for both nodes
            probe = subprocess.run([ray_cli, "status", "--address", f"127.0.0.1:{port}"], env=env,
                                   capture_output=True, text=True, timeout=60)
            if probe.stdout.count("node_") >= 2:
                break
            time.sleep(1)
        begin = time.perf_counter()
        late = subprocess.run([*cmd, "--max-minutes", "0.000001"], env=env, capture_output=True, text=True,
                              timeout=400)  # the deadline has passed when the tasks run: none starts
        overhead = time.perf_counter() - begin  # the driver's own start (Python, Ray, the shared-folder check)
        assert late.returncode == 0 and "4 not started" in late.stdout, late.stdout + late.stderr
        assert all(SweepRecord.open(tmp_path / "r").status(c) == "pending" for c in ("referee", "seed=0"))

        # A deadline 5 s after the cells can start. The chain referee -> fgsm-ref cannot be over by
        # then on any machine (fgsm-ref's LONG_EPOCHS alone take over 10 s on an idle 2-core one), so
        # some cell is running (or starting: stopped before training, also recorded as stopped, and
        # started again by the next call).
        minutes = (overhead + 5) / 60
        stopped = subprocess.run([*cmd, "--max-minutes", f"{minutes:.4f}"], env=env, capture_output=True, text=True,
                                 timeout=400)
        assert stopped.returncode == 143, stopped.stdout + stopped.stderr
        record = SweepRecord.open(tmp_path / "r")
        halted = [c for c in record.cells if record.status(c) == "stopped"]
        assert halted and not [c for c in record.cells if record.status(c) in ("failed", "running")], record.cells
        assert "STOPPED" in stopped.stdout and "rerun the same command to continue" in stopped.stdout
        checkpointed = [c for c in halted if (tmp_path / "r" / c / "checkpoints" / "last.pt").is_file()]

        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)  # the same command
        assert done.returncode == 0, done.stdout + done.stderr
        record = SweepRecord.open(tmp_path / "r")
        assert list(record.cells) == ["referee", "fgsm-ref", "seed=0", "seed=1"]
        assert all(record.status(c) == "finished" for c in record.cells)
        for cell in record.cells:
            metrics = RunStore.open(tmp_path / "r" / cell).metrics()
            assert metrics.epoch.max() == (LONG_EPOCHS if cell == "fgsm-ref" else 2) and (metrics.metric == "acc").any()
            assert metrics.groupby(["epoch", "split", "metric", "attack", "source"]).size().max() == 1  # no epoch twice
        for cell in checkpointed:  # stopped mid-run: continued from its checkpoint
            assert "resume" in (tmp_path / "r" / "logs" / f"{cell}.log").read_text()
        ended = (tmp_path / "r" / "logs" / "referee.result.json").stat().st_mtime_ns  # after its referee ended:
        assert (tmp_path / "r" / "fgsm-ref" / "config.json").stat().st_mtime_ns >= ended
        assert (RunStore.open(tmp_path / "r" / "fgsm-ref").metrics().source == "strength-ref").any()
    finally:
        for proc in reversed(started):  # `ray start --block` stops its node's processes when terminated
            proc.terminate()
        for proc in started:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(temp, ignore_errors=True)  # the nodes' session folders and logs


# The Ray study's dependent cell: long enough to be running 8 s after its driver could start cells
# (a cell's process alone takes 2 s or more to start; 60 tiny epochs another 6 s or more).
LONG_EPOCHS = 150


def test_a_sweep_dir_that_a_ray_node_cannot_see_is_a_one_line_error(tmp_path):
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'robustdrop[cluster]')")
    from robustdrop.sweeps.ray_backend import check_shared_filesystem

    class Elsewhere:  # a cluster whose one node writes the token on its own disk, not here
        def nodes(self):
            return [{"Alive": True, "NodeID": "ab" * 28, "NodeManagerAddress": "10.0.0.7"}]

        def remote(self, *args, **kw):  # ray.remote(...)(f) and f.options(...).remote(folder, token)
            return self

        __call__ = options = remote

        def get(self, ref, timeout=None):
            return "node7"

    with pytest.raises(RobustdropError, match="not shared with Ray node 10.0.0.7 .*shares") as info:
        check_shared_filesystem(Elsewhere(), tmp_path)
    assert "\n" not in str(info.value) and not (tmp_path / ".ray-check").exists()
