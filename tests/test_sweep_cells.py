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
from robustdrop.api import track
from robustdrop.cli import main
from robustdrop.engine import make_config
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
def test_a_study_with_a_referee_a_dependent_run_and_an_evaluation(tiny_env, tmp_path, capsys):
    fixed = tiny_fixed(tiny_env["dataset"], epochs=2)
    cells = {
        "referee": {"method": "pgd", "pgd_steps": 2},
        "fgsm-ref": {"reference": "@referee", "diagnostics": ["strength-ref:n=32"], "keep_best": "val/acc/pgd"},
        "fgsm-ref-eval": {"kind": "evaluate", "run": "@fgsm-ref", "checkpoint": "best_model", "attacks": ["pgd"],
                          "n": 32},
    }
    robustdrop.sweep({}, cells=cells, name="s", runs_dir=tmp_path, jobs=3, progress=False, **fixed)
    record = SweepRecord.open(tmp_path / "s")
    assert [record.status(c) for c in cells] == ["finished"] * 3
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
    # The same command again: everything reused (the one rule), nothing rerun.
    before = (tmp_path / "s" / "fgsm-ref" / "metrics.csv").stat().st_mtime_ns
    capsys.readouterr()
    robustdrop.sweep({}, cells=cells, name="s", runs_dir=tmp_path, jobs=3, progress=False, **fixed)
    assert "3 finished, 0 to resume, 0 to start" in capsys.readouterr().out
    assert (tmp_path / "s" / "fgsm-ref" / "metrics.csv").stat().st_mtime_ns == before
    # The referee is lost: it trains again, and so do the run measured against it and its evaluation.
    (tmp_path / "s" / "referee" / "checkpoints" / "last.pt").unlink()
    robustdrop.sweep({}, cells=cells, name="s", runs_dir=tmp_path, jobs=3, progress=False, **fixed)
    out = capsys.readouterr().out
    assert "0 finished, 0 to resume, 3 to start" in out and "fgsm-ref: again, after cell referee" in out
    assert "fgsm-ref: retrain (cell referee, which it needs, runs again)" in (
        tmp_path / "s" / "logs" / "fgsm-ref.log").read_text()
    record = SweepRecord.open(tmp_path / "s")
    assert all(record.status(c) == "finished" and "rerun" not in record.cells[c] for c in cells)


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
def test_a_replay_cell_puts_the_attached_diagnostics_rows_into_the_training_cells_metrics(tiny_env, tmp_path, capsys):
    """A referee, a run that trained beside it keeping every epoch's weights, and the referee
    measurement replayed over them afterwards: the run's metrics get the rows a run with the
    referee attached logs; the same sweep again reuses everything."""
    fixed = tiny_fixed(tiny_env["dataset"], epochs=2)
    ref_diag = ["strength-ref:n=32"]
    cells = {
        "referee": {"method": "pgd", "pgd_steps": 2},
        "fgsm": {"save_weights_every": 1},
        "fgsm-referee": {"kind": "replay", "run": "@fgsm", "reference": "@referee", "diagnostics": ref_diag},
    }
    robustdrop.sweep({}, cells=cells, name="s", runs_dir=tmp_path, jobs=2, progress=False, **fixed)
    record = SweepRecord.open(tmp_path / "s")
    assert [record.status(c) for c in cells] == ["finished"] * 3
    assert not (tmp_path / "s" / "fgsm-referee").exists()  # its rows are the run's
    assert "done   fgsm-referee (replay" in capsys.readouterr().out
    # The yardstick: the same training with the referee attached.
    track(make_config(**{**fixed, "reference": str(tmp_path / "s" / "referee"), "diagnostics": ref_diag}),
          runs_dir=tmp_path, name="attached", progress=False)

    def ref_rows(path: Path) -> pd.DataFrame:
        m = comparable(path)
        return m[m.source == "strength-ref"].sort_values(["epoch", "metric", "attack"]).reset_index(drop=True)

    assert len(ref_rows(tmp_path / "attached")) > 0
    pd.testing.assert_frame_equal(ref_rows(tmp_path / "s" / "fgsm"), ref_rows(tmp_path / "attached"))
    before = (tmp_path / "s" / "fgsm" / "metrics.parquet").stat().st_mtime_ns
    robustdrop.sweep({}, cells=cells, name="s", runs_dir=tmp_path, jobs=2, progress=False, **fixed)
    assert "3 finished, 0 to resume, 0 to start" in capsys.readouterr().out
    assert (tmp_path / "s" / "fgsm" / "metrics.parquet").stat().st_mtime_ns == before


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
