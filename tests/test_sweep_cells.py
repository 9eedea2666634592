"""Sweeps as studies: named cells, dependencies ("@cell", after), evaluate and replay cells, the
schedule, the deadline (--max-minutes: stopped cells, the same command continues them) and GPU sharing.

Real cells use test_sweep's tiny image-folder dataset (cnn1, one thread: seconds per cell)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import pytest
import test_sweep
from test_sweep import comparable, tiny_fixed

import robustdrop
from robustdrop.cli import main
from robustdrop.errors import RobustdropError
from robustdrop.store import RunStore, SweepRecord
from robustdrop.sweeps import plan_sweep, read_toml, runner
from robustdrop.sweeps.schedule import Schedule
from robustdrop.sweeps.worker import cell_env

tiny_folder, tiny_env = test_sweep.tiny_folder, test_sweep.tiny_env  # the fixtures, shared

STUDY = """
[sweep]
name = "study"
preset = "quick"
[sweep.fixed]
epochs = 3
[sweep.grid]
seed = "0:2"
[sweep.cells.referee]
method = "pgd"
pgd_steps = 2
diagnostics = "none"
reference = "none"
[sweep.cells.fgsm-ref]
reference = "@referee"
diagnostics = "strength-ref"
[sweep.cells.fgsm-ref-eval]
kind = "evaluate"
run = "@fgsm-ref"
checkpoint = "best_model"
attacks = ["pgd"]
n = 100
"""


# --------------------------------------------------------------------------------------------
# The plan (nothing runs)
# --------------------------------------------------------------------------------------------
def test_named_cells_come_first_in_file_order_with_their_dependencies(tmp_path):
    (tmp_path / "s.toml").write_text(STUDY)
    spec = read_toml(tmp_path / "s.toml")
    plan = plan_sweep(spec["grid"], preset=spec["preset"], fixed=spec["fixed"], name=spec["name"], cells=spec["cells"])
    assert [c.name for c in plan.cells] == ["referee", "fgsm-ref", "fgsm-ref-eval", "seed=0", "seed=1"]
    ref, fgsm, ev = plan.cells[:3]
    assert ref.config.method == "pgd" and ref.config.epochs == 3 and ref.after == []
    assert fgsm.config.reference == "@referee" and fgsm.after == ["referee"] and fgsm.config.method == "fgsm"
    assert ev.kind == "evaluate" and ev.config is None and ev.after == ["fgsm-ref"]
    assert ev.action == {"run": "@fgsm-ref", "checkpoint": "best_model", "attacks": ["pgd"], "n": 100}
    assert plan.cells[3].config.seed == 0 and plan.cells[3].after == []
    # Only named cells: no grid needed.
    only = plan_sweep({}, preset="quick", cells={"a": {"seed": 1}, "b": {"seed": 2, "after": "a"}})
    assert only.name == "quick-cells" and [c.after for c in only.cells] == [[], ["a"]]


@pytest.mark.parametrize(("cells", "message"), [
    ({"a": {"after": ["nosuch"]}}, "needs cell 'nosuch', which the sweep does not have"),
    ({"a": {"reference": "@b", "diagnostics": "strength-ref"}, "b": {"after": ["a"]}}, "cycle: a -> b -> a"),
    ({"a": {"kind": "score"}}, "kind 'score' is not one of train, evaluate, replay"),
    ({"a": {"kind": "replay"}}, "replay cell a: give run = "),
    ({"a": {"kind": "replay", "run": "x"}}, "cell a: nothing to replay: give reference="),
    ({"a": {"kind": "replay", "run": "x", "diagnostics": ["collapse"]}}, "collapse diagnostic cannot be replayed"),
    ({"a": {"kind": "replay", "run": "x", "diagnostics": ["nosuch"]}}, "cell a: unknown diagnostic"),
    ({"a": {"kind": "replay", "run": "x", "diagnostics": "wong:n=0"}}, "cell a: option wong:n must be at least"),
    ({"a": {"kind": "replay", "run": "x", "diagnostics": ["strength-ref"]}}, "needs a reference model"),
    ({"a": {"kind": "replay", "run": "x", "reference": 3}}, "reference must be a string"),
    ({"a": {"kind": "replay", "run": "x", "reference": "r", "attacks": ["pgd"]}}, "unknown: attacks"),
    ({"a": {"kind": "evaluate"}}, "give run = "),
    ({"a": {"kind": "evaluate", "run": "x", "attacks": ["nosuch"]}}, "cell a: attacks"),
    ({"a": {"kind": "evaluate", "run": "x", "speed": 2}}, "unknown: speed"),
    ({"a/b": {}}, "cell name 'a/b' is not a safe folder name"),
    ({"a": {"epochs": 0}}, "cell a: --epochs must be at least 1"),
])
def test_bad_cells_are_one_line_errors_before_anything_runs(cells, message):
    with pytest.raises(RobustdropError, match=message.replace("(", r"\(").replace(")", r"\)")):
        plan_sweep({}, preset="quick", cells=cells)


def test_the_schedule_keeps_order_waits_for_dependencies_and_blocks_after_a_failure():
    s = Schedule(["a", "b", "c", "d"], {"b": ["a"], "c": ["b"], "d": []})
    assert s.next_ready() == "a" and s.next_ready() == "d" and s.next_ready() is None  # b waits for a
    s.done("a", "finished")
    assert s.next_ready() == "b"
    s.done("b", "failed")
    assert s.blocked() == [("c", "b")] and not s.pending
    # A stopped cell's dependents wait (for the next run of the sweep); after the deadline nothing starts.
    s = Schedule(["a", "b"], {"b": ["a"]}, deadline=time.time() + 3600)
    assert s.next_ready() == "a"
    s.done("a", "stopped")
    assert s.blocked() == [] and s.next_ready() is None and s.stuck()
    assert Schedule(["a"], {}, deadline=time.time() - 1).next_ready() is None
    assert Schedule(["b"], {"b": ["a"]}, finished=["a"]).next_ready() == "b"  # finished in an earlier run


def test_local_cells_share_the_gpus_they_see(monkeypatch):
    """--jobs N puts N cells on the same GPU: a cell's process sees what the driver sees."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    env = cell_env(2)
    assert env["CUDA_VISIBLE_DEVICES"] == "0" and env["OMP_NUM_THREADS"] == "2"


def test_gpu_fractions_reach_each_ray_task(tiny_env, tmp_path, monkeypatch, capsys):
    """--gpus-per-cell 0.25 (four cells on one GPU) and --cpus-per-cell become each Ray task's
    resource request, with the deadline; a stand-in for Ray records them (no GPU, no cluster)."""
    from robustdrop.sweeps import ray_backend

    asked, submitted = [], []

    class Task:
        def options(self, **request):
            asked.append(request)
            return self

        def remote(self, *args):
            submitted.append(args)
            return args

    class StandInRay:
        def init(self, **kwargs):
            pass

        def remote(self, fn):
            assert fn is ray_backend.run_cell_blocking
            return Task()

        def wait(self, refs, num_returns, timeout=None):
            return refs[:num_returns], refs[num_returns:]

        def get(self, ref):
            return {"ok": False, "not_started": True, "wall_s": 0.0}  # as a task after the deadline

        def shutdown(self):
            pass

    monkeypatch.setattr(ray_backend, "_import_ray", StandInRay)
    monkeypatch.setattr(ray_backend, "check_shared_filesystem", lambda ray, path: None)
    code = main(["sweep", "--grid", "seed=0:2", "--name", "g", "--runs-dir", str(tmp_path), "--backend", "ray",
                 "--gpus-per-cell", "0.25", "--cpus-per-cell", "2", "--max-minutes", "30", "--no-progress",
                 *test_sweep._flags(tiny_fixed(tiny_env["dataset"]))])
    assert code == 0 and "2 not started" in capsys.readouterr().out
    assert asked == [{"num_cpus": 2.0, "num_gpus": 0.25, "max_retries": 0}]
    assert [a[1] for a in submitted] == ["seed=0", "seed=1"]
    assert all(time.time() < a[3] <= time.time() + 1800 for a in submitted)  # the deadline travels with each task


def test_sigterm_to_a_ray_driver_stops_the_tasks_cells_and_exits_143(tiny_env, tmp_path, monkeypatch, capsys):
    """ray.init makes SIGTERM sys.exit() (the tasks' cells would run on, recorded as running): the
    driver keeps its own handler, writes the stop file its tasks poll (a running task's deadline
    cannot change), records the stopped cells, exits 143 and removes the file; a stand-in for Ray
    whose tasks end once they see that file."""
    import os
    import signal
    import sys

    from robustdrop.sweeps import ray_backend
    from robustdrop.sweeps.worker import stop_path

    stop_file = stop_path(tmp_path / "s")
    waits = []

    class Task:
        def options(self, **request):
            return self

        def remote(self, sweep_dir, cell, threads, deadline):
            return cell

    class StandInRay:
        def init(self, **kwargs):
            signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))  # as ray.init does

        def remote(self, fn):
            return Task()

        def wait(self, refs, num_returns, timeout=None):
            waits.append(timeout)
            assert len(waits) < 50, "the driver never wrote the stop file"
            if len(waits) == 1:
                os.kill(os.getpid(), signal.SIGTERM)  # while both cells run
            return (refs[:num_returns], refs[num_returns:]) if stop_file.exists() else ([], refs)

        def get(self, ref):
            return {"ok": False, "stopped": True, "error": "stopped by SIGTERM; rerun the sweep to continue it",
                    "returncode": 143, "wall_s": 1.0}

        def shutdown(self):
            pass

    monkeypatch.setattr(ray_backend, "_import_ray", StandInRay)
    monkeypatch.setattr(ray_backend, "check_shared_filesystem", lambda ray, path: None)
    before = signal.getsignal(signal.SIGTERM)
    code = main(["sweep", "--grid", "seed=0:2", "--name", "s", "--runs-dir", str(tmp_path), "--backend", "ray",
                 "--no-progress", *test_sweep._flags(tiny_fixed(tiny_env["dataset"]))])
    captured = capsys.readouterr()
    assert code == 143 and "robustdrop: stopped by SIGTERM: 2 running cell(s)" in captured.err, captured
    record = SweepRecord.open(tmp_path / "s")
    assert [record.status(c) for c in ("seed=0", "seed=1")] == ["stopped", "stopped"]
    assert not stop_file.exists() and signal.getsignal(signal.SIGTERM) == before
    assert waits[0] is not None  # the driver polls: a signal is acted on while tasks run


def test_a_ray_task_stops_its_cell_when_the_stop_file_appears(tmp_path, monkeypatch):
    """A task not yet started when the driver wrote the stop file does not start its cell; a
    running one SIGTERMs it (here a stand-in process) and reports it stopped."""
    import subprocess
    import sys
    import threading

    from robustdrop.sweeps import worker

    plan = plan_sweep({"seed": [0]}, fixed=tiny_fixed("cifar10-jpeg"), name="k")
    record = runner.open_sweep(plan, tmp_path)
    (record.path / "logs").mkdir()

    def start(sweep_dir, cell, threads):
        log = open(record.log_path(cell), "a")  # noqa: SIM115 - closed by finish_cell
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], stdout=log)
        return worker.CellProcess(record.path, cell, proc, log, time.perf_counter())

    monkeypatch.setattr(worker, "start_cell", start)
    later = threading.Timer(0.5, worker.stop_path(record.path).touch)
    later.start()
    begin = time.monotonic()
    result = worker.run_cell_blocking(str(record.path), "seed=0", 1, poll_s=0.05)
    later.join()
    assert result["stopped"] and result["returncode"] == -15 and time.monotonic() - begin < 20
    assert worker.run_cell_blocking(str(record.path), "seed=0", 1)["not_started"]


def test_a_past_deadline_starts_nothing(tmp_path, capsys):
    code = main(["sweep", "--preset", "quick", "--grid", "seed=0:2", "--name", "late", "--runs-dir", str(tmp_path),
                 "--max-minutes", "0.000001", "--no-progress"])
    assert code == 0
    assert "0/2 cells finished, 0 failed, 0 stopped, 2 not started" in capsys.readouterr().out
    record = SweepRecord.open(tmp_path / "late")
    assert all(record.status(c) == "pending" and record.cells[c]["attempts"] == 0 for c in record.cells)
    with pytest.raises(RobustdropError, match="--max-minutes must be positive"):
        robustdrop.sweep({"seed": "0:2"}, preset="quick", runs_dir=tmp_path, name="x", max_minutes=0)


# --------------------------------------------------------------------------------------------
# Real cells
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_study_with_a_referee_a_dependent_run_an_evaluation_and_a_replay(tiny_env, tmp_path, capsys):
    """A referee; a run measured against it during training, and its evaluation; a run trained
    beside the referee keeping every epoch's weights, measured against it afterwards by a replay
    cell: the replayed rows land in that run's metrics and equal the attached measurement's."""
    fixed = tiny_fixed(tiny_env["dataset"], epochs=2)
    cells = {
        "referee": {"method": "pgd", "pgd_steps": 2},
        "fgsm-ref": {"reference": "@referee", "diagnostics": ["strength-ref:n=32"], "keep_best": "val/acc/pgd"},
        "fgsm-ref-eval": {"kind": "evaluate", "run": "@fgsm-ref", "checkpoint": "best_model", "attacks": ["pgd"],
                          "n": 32},
        "fgsm": {"save_weights_every": 1},
        "fgsm-referee": {"kind": "replay", "run": "@fgsm", "reference": "@referee", "diagnostics": ["strength-ref:n=32"]},
    }

    def ref_rows(cell: str) -> pd.DataFrame:
        m = comparable(tmp_path / "s" / cell)
        return m[m.source == "strength-ref"].sort_values(["epoch", "metric", "attack"]).reset_index(drop=True)

    robustdrop.sweep({}, cells=cells, name="s", runs_dir=tmp_path, jobs=3, progress=False, **fixed)
    record = SweepRecord.open(tmp_path / "s")
    assert [record.status(c) for c in cells] == ["finished"] * 5
    # The dependent run started after its referee finished, and measured against it.
    ended = (tmp_path / "s" / "logs" / "referee.result.json").stat().st_mtime_ns  # after its referee ended:
    assert (tmp_path / "s" / "fgsm-ref" / "config.json").stat().st_mtime_ns >= ended
    run = RunStore.open(tmp_path / "s" / "fgsm-ref")
    assert Path(run.read_json("config.json")["reference"]) == (tmp_path / "s" / "referee").resolve()
    m = run.metrics()
    assert (m.source == "strength-ref").any()
    rows = pd.read_csv(tmp_path / "s" / "fgsm-ref-eval" / "evaluation.csv")
    best = json.loads(json.dumps(run.load_checkpoint("best_model")["epoch"]))
    assert set(rows.attack) == {"none", "pgd"} and set(rows.n) == {32} and set(rows.epoch) == {best}
    # The replay's rows are fgsm's (the cell has no folder), the ones the attached referee logged.
    assert not (tmp_path / "s" / "fgsm-referee").exists()
    pd.testing.assert_frame_equal(ref_rows("fgsm"), ref_rows("fgsm-ref"))
    assert "done   fgsm-referee (replay" in capsys.readouterr().out
    # The same command again: everything reused (the one rule), nothing rerun.
    before = {c: (tmp_path / "s" / c / "metrics.csv").stat().st_mtime_ns for c in ("fgsm-ref", "fgsm")}
    robustdrop.sweep({}, cells=cells, name="s", runs_dir=tmp_path, jobs=3, progress=False, **fixed)
    assert "5 finished, 0 to resume, 0 to start" in capsys.readouterr().out
    assert {c: (tmp_path / "s" / c / "metrics.csv").stat().st_mtime_ns for c in before} == before
    # The referee is lost: it trains again, and so do the run measured against it, its evaluation
    # and the replay (which replaces its rows); fgsm itself is kept.
    (tmp_path / "s" / "referee" / "checkpoints" / "last.pt").unlink()
    robustdrop.sweep({}, cells=cells, name="s", runs_dir=tmp_path, jobs=3, progress=False, **fixed)
    out = capsys.readouterr().out
    assert "1 finished, 0 to resume, 4 to start" in out and "fgsm-ref: again, after cell referee" in out
    assert "fgsm-ref: retrain (cell referee, which it needs, runs again)" in (
        tmp_path / "s" / "logs" / "fgsm-ref.log").read_text()
    assert "replacing the earlier replay of strength-ref[n=32]" in (
        tmp_path / "s" / "logs" / "fgsm-referee.log").read_text()
    record = SweepRecord.open(tmp_path / "s")
    assert all(record.status(c) == "finished" and "rerun" not in record.cells[c] for c in cells)
    assert len(RunStore.open(tmp_path / "s" / "fgsm").events("replayed")) == 1
    pd.testing.assert_frame_equal(ref_rows("fgsm"), ref_rows("fgsm-ref"))


def test_a_replay_cell_waits_for_its_run_and_referee_and_the_dry_run_lists_it(tiny_env, tmp_path, capsys):
    cells = {"referee": {"method": "pgd"}, "fgsm": {"save_weights_every": 1},
             "fgsm-referee": {"kind": "replay", "run": "@fgsm", "reference": "@referee",
                              "diagnostics": "strength-ref:n=32"}}
    plan = plan_sweep({}, fixed=tiny_fixed(tiny_env["dataset"], epochs=1), cells=cells, name="r")
    replay = plan.cell("fgsm-referee")
    assert replay.kind == "replay" and replay.config is None and replay.after == ["fgsm", "referee"]
    assert replay.action == {"run": "@fgsm", "reference": "@referee", "diagnostics": ["strength-ref:n=32"]}
    runner.dry_run_sweep(plan, runs_dir=tmp_path)
    assert "fgsm-referee (replay after fgsm, referee) start\n" in capsys.readouterr().out
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_the_deadline_stops_a_running_cell_and_the_same_command_continues_it(tiny_env, tmp_path, monkeypatch):
    """At the deadline the running cell gets SIGTERM, checkpoints and exits 143: recorded as stopped,
    the next cell not started; the same sweep again resumes it, and every cell's metrics equal an
    uninterrupted sweep's."""
    fixed = {**tiny_fixed(tiny_env["dataset"], epochs=6), "probe_size": 96, "eval_pgd_steps": 10}
    robustdrop.sweep({"seed": "0:2"}, name="straight", runs_dir=tmp_path, jobs=1, progress=False, **fixed)
    first_ckpt = tmp_path / "stopped" / "seed=0" / "checkpoints" / "last.pt"

    class DeadlineAfterFirstEpoch(Schedule):  # the deadline falls once the first cell is surely mid-run
        def past_deadline(self) -> bool:
            return first_ckpt.is_file()

    monkeypatch.setattr(runner, "Schedule", DeadlineAfterFirstEpoch)
    result = runner.run_sweep(plan_sweep({"seed": [0, 1]}, fixed=fixed, name="stopped"), runs_dir=tmp_path, jobs=1,
                              progress=False)
    monkeypatch.undo()
    record = SweepRecord.open(tmp_path / "stopped")
    assert result.stopped == ["seed=0"] and result.failed == []
    assert record.status("seed=0") == "stopped" and record.status("seed=1") == "pending"
    assert "SIGTERM" in record.cells["seed=0"]["error"]
    state = json.loads((tmp_path / "stopped" / "logs" / "seed=0.result.json").read_text())
    assert state["stopped"] and not state["ok"]
    assert RunStore.open(tmp_path / "stopped" / "seed=0").metrics().epoch.max() < fixed["epochs"]

    table = robustdrop.sweep({"seed": "0:2"}, name="stopped", runs_dir=tmp_path, jobs=1, progress=False, **fixed)
    record = SweepRecord.open(tmp_path / "stopped")
    assert all(record.status(c) == "finished" for c in record.cells) and not table.attrs["failed"]
    assert "resume" in (tmp_path / "stopped" / "logs" / "seed=0.log").read_text()
    for cell in ("seed=0", "seed=1"):
        pd.testing.assert_frame_equal(comparable(tmp_path / "straight" / cell), comparable(tmp_path / "stopped" / cell))


def test_the_sweep_demo_study_file_makes_the_committed_sweep(monkeypatch):
    """analyses/studies/sweep_demo.toml, as sweep_demo.py runs it, plans the cells of the sweep made
    by the grid command it replaced (so that sweep is reused, not refused)."""
    monkeypatch.syspath_prepend(str(test_sweep.REPO / "analyses"))
    import sweep_demo
    from lib.setting import Setting

    from robustdrop.sweeps import parse_grid

    setting = Setting()
    plan = plan_sweep(sweep_demo.study()["grid"], preset="quick", fixed=sweep_demo.fixed_values(setting), name="d")
    committed = plan_sweep(parse_grid(["seed=0:5", "epsilon=8/255,10/255,12/255"]), preset="quick", name="d",
                           fixed={"threads": setting.threads, "device": setting.device, "method": "fgsm"})
    assert [(c.name, c.config) for c in plan.cells] == [(c.name, c.config) for c in committed.cells]
    assert (plan.grid, plan.fixed) == (committed.grid, committed.fixed) and len(plan.cells) == 15
    assert "--file analyses/studies/sweep_demo.toml" in " ".join(sweep_demo.command(setting))


def test_cells_that_need_a_cell_that_runs_again_run_again(tmp_path):
    """A referee trained anew (its config changed) makes the finished runs measured against it, and
    their evaluations, stale: they run again (the worker retrains them instead of reusing)."""
    (tmp_path / "s.toml").write_text(STUDY)
    spec = read_toml(tmp_path / "s.toml")
    plan = plan_sweep(spec["grid"], preset=spec["preset"], fixed=spec["fixed"], name=spec["name"], cells=spec["cells"])
    record = runner.open_sweep(plan, tmp_path)
    states = {"referee": "start", "fgsm-ref": "finished", "fgsm-ref-eval": "finished", "seed=0": "finished",
              "seed=1": "resume"}
    assert runner.mark_stale(record, plan, states) == ["fgsm-ref", "fgsm-ref-eval"]
    assert states == {"referee": "start", "fgsm-ref": "start", "fgsm-ref-eval": "start", "seed=0": "finished",
                      "seed=1": "resume"}
    assert "referee" in SweepRecord.open(tmp_path / "study").cells["fgsm-ref"]["rerun"]
    # A dependency that only resumes (stopped at a deadline) was never finished: nothing after it is stale.
    states = {"referee": "resume", "fgsm-ref": "start", "fgsm-ref-eval": "start", "seed=0": "finished",
              "seed=1": "finished"}
    assert runner.mark_stale(record, plan, dict(states)) == []
    # ... but a cell marked by an earlier run of the sweep (stopped before it ran again) stays marked.
    record.cells["fgsm-ref"]["rerun"] = "cell referee, which it needs, runs again"
    states["fgsm-ref"] = "finished"
    assert runner.mark_stale(record, plan, states) == ["fgsm-ref"] and states["fgsm-ref"] == "start"


def test_dry_run_lists_the_cells_in_order_with_estimates_and_writes_nothing(tiny_env, tmp_path, capsys):
    fixed = tiny_fixed(tiny_env["dataset"], epochs=2)
    study = tmp_path / "s.toml"
    study.write_text('[sweep]\nname = "d"\n[sweep.grid]\nseed = "0:2"\n[sweep.cells.referee]\nmethod = "pgd"\n'
                     '[sweep.cells.fgsm-ref]\nreference = "@referee"\ndiagnostics = "strength-ref"\n'
                     '[sweep.cells.ev]\nkind = "evaluate"\nrun = "@fgsm-ref"\n')
    flags = [f"--{k.replace('_', '-')}={v[0] if isinstance(v, list) else v}" for k, v in fixed.items()]
    assert main(["sweep", "--file", str(study), "--runs-dir", str(tmp_path / "runs"), "--dry-run", "--jobs", "2",
                 *flags]) == 0
    out = capsys.readouterr().out
    lines = [line.strip() for line in out.splitlines() if line.startswith("  ")]
    assert [line.split(" ")[0] for line in lines] == ["referee", "fgsm-ref", "ev", "seed=0", "seed=1"]
    assert "fgsm-ref (train after referee) start: about" in out and "ev (evaluate after fgsm-ref) start" in out
    assert "5 cells, 5 to run" in out and "with 2 at once" in out
    assert not (tmp_path / "runs").exists()
