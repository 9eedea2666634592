"""The GPU plan (analyses/gpu_plan.py): its estimate and budget, its scheduling, the deferred referee
measurement, and — on the CPU, at a tiny scale, through the same entry point the GPU runs — the
plan end to end, stopped between commands and continued, against an uninterrupted run."""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
ANALYSES = REPO / "analyses"
TIMING = re.compile(r"^time(_.*)?_s$")


@pytest.fixture(scope="module")
def lib():
    sys.path.insert(0, str(ANALYSES))
    try:
        names = ["lib.setting", "lib.catalog", "lib.training", "lib.estimate", "lib.plan", "lib.deferred", "gpu_plan"]
        yield {n.split(".")[-1]: importlib.import_module(n) for n in names}
    finally:
        sys.path.remove(str(ANALYSES))


def paper_setting(lib, tmp_path, **kw):
    return dataclasses.replace(lib["setting"].Setting(scale="paper", runs_dir=tmp_path / "runs", out=tmp_path / "paper",
                                                      dataset="cifar10-jpeg", eval_n=0, jobs=3), **kw)


# --------------------------------------------------------------------------------------------
# Estimate, budget, scheduling (no training)
# --------------------------------------------------------------------------------------------
def test_dry_run_prints_every_part_and_a_total_within_the_default_budget(lib, tmp_path, capsys):
    assert lib["gpu_plan"].main(["--dry-run", "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "p")]) == 0
    out = capsys.readouterr().out
    total = float(re.search(r"total\s+([\d.]+)", out).group(1))
    assert 0 < total <= 40
    for name in lib["plan"].PART_NAMES:
        line = next(line for line in out.splitlines() if re.match(rf"\s*\d+\s+{re.escape(name)}\s", line))
        assert re.search(r"\d+\.\d\s+[\d.]+m$", line) or "left out" in line, line
    assert "machine start" in out and "assumed" in out
    assert not (tmp_path / "runs").exists() and not (tmp_path / "p").exists()  # a dry run creates nothing


def test_a_smaller_budget_keeps_the_most_valuable_parts(lib, tmp_path):
    plan, estimate = lib["plan"], lib["estimate"]
    setting = paper_setting(lib, tmp_path)
    a = estimate.Assumptions()
    parts, tasks = plan.build(setting, a)
    kept = {}
    for budget in (10, 30, 40, 200):
        sel = plan.choose(parts, tasks, set(), {}, jobs=3, a=a, budget_min=budget, fresh=True, max_minutes=9,
                          reserve_min=0.75, graceful=False, ref="pgd10")
        kept[budget] = [p.name for p in sel.parts]
        assert sel.costs.total <= budget or not kept[budget]
    assert set(kept[10]) <= set(kept[30]) <= set(kept[40]) <= set(kept[200])
    assert kept[30][:4] == ["referee", "fgsm", "apart", "figure2"]  # Figure 2 and both curves in a 30-minute session
    assert kept[200] == list(plan.PART_NAMES)
    # the referee is the long pole: PGD-10 costs about 4.5 FGSM trainings per epoch
    assert 4.0 < tasks["train:pgd10"].work / estimate.run_work(
        lib["catalog"].config_for(setting, lib["catalog"].catalog(setting)["fgsm"]), (50000, 10000), a).train < 6


def test_simulation_shares_the_gpu_and_runs_the_benchmark_alone(lib):
    plan, estimate = lib["plan"], lib["estimate"]
    a = estimate.Assumptions(one_process_tflops=1.0, share_gain=(1.0, 1.5))
    w = 60e12  # one minute alone
    t1, t2 = (plan.Task(f"train:{n}", "train", n, (), w, 10) for n in ("x", "y"))
    bench = plan.Task("bench", "bench", None, (), w)
    late = plan.Task("train:z", "train", "z", (), w, 10)
    two = plan.simulate([t1, t2], set(), {}, 2, a)
    assert two.makespan == pytest.approx(2 * w / 1.5e12)  # side by side: 1.5x one process's rate
    assert plan.simulate([t1, t2], set(), {}, 1, a).makespan == pytest.approx(120)
    tl = plan.simulate([t1, bench, late], set(), {}, 2, a)
    assert tl.start["bench"] == pytest.approx(60) and tl.end["bench"] == pytest.approx(120)  # waits for the GPU
    assert tl.start["train:z"] == pytest.approx(120)  # held back behind the waiting benchmark
    half = plan.simulate([t1], set(), {"train:x": w / 2}, 1, a)
    assert half.makespan == pytest.approx(30)  # a resumed training has only its rest to do


def test_a_restored_run_is_trained_again_when_its_checkpoints_are_needed(lib):
    plan = lib["plan"]
    done = {"train:pgd10", "eval:pgd10", "train:fgsm", "measure:fgsm"}
    # measuring APART needs the referee's checkpoint: a restored (metrics-only) referee trains again
    eff = plan.effective_done(done, ["train:pgd10", "train:fgsm", "measure:fgsm", "measure:apart"], ["pgd10", "fgsm"],
                              "pgd10")
    assert "train:pgd10" not in eff and "eval:pgd10" not in eff
    assert {"train:fgsm", "measure:fgsm"} <= eff
    # nothing pending needs them: both stay done
    assert plan.effective_done(done, ["train:pgd10", "train:fgsm", "measure:fgsm"], ["pgd10", "fgsm"], "pgd10") == done


# --------------------------------------------------------------------------------------------
# The deferred referee measurement gives the in-training numbers
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_deferred_referee_measurement_equals_the_in_training_one(lib, tmp_path, one_thread):
    setting_mod, catalog, training, deferred = lib["setting"], lib["catalog"], lib["training"], lib["deferred"]
    inline = setting_mod.Setting(scale="paper", smoke=True, runs_dir=tmp_path / "inline", out=tmp_path / "o1",
                                 deferred_reference=False)  # forced: the referee attached during training
    ref = catalog.ref_name(inline)
    training.train_run(inline, ref)
    training.train_run(inline, "fgsm")  # strength-ref during training
    later = dataclasses.replace(inline, runs_dir=tmp_path / "later", deferred_reference=True)
    later.runs_dir.mkdir()
    (later.runs_dir / ref).symlink_to(inline.runs_dir / ref)
    training.train_run(later, "fgsm")  # no referee; weights of every epoch kept
    assert sorted(deferred.weights_files(later.runs_dir / "fgsm")) == [1, 2]
    assert not deferred.is_measured(later.runs_dir / "fgsm")
    deferred.measure_run(later, "fgsm")
    deferred.measure_run(later, "fgsm")  # again: reused, never duplicated

    def ref_rows(path: Path) -> pd.DataFrame:
        df = pd.read_csv(path / "metrics.csv")
        df = df[(df["source"] == "strength-ref") & ~df["metric"].str.match(TIMING)]
        return df.sort_values(["epoch", "metric", "attack"]).reset_index(drop=True)

    a, b = ref_rows(inline.runs_dir / "fgsm"), ref_rows(later.runs_dir / "fgsm")
    assert len(a) > 0 and set(a["attack"]) >= {"fgsm", "noise-sign", "pgd"}
    pd.testing.assert_frame_equal(a, b)
    assert deferred.is_measured(later.runs_dir / "fgsm")
    # training itself is the same with or without the referee
    train = [pd.read_csv(p / "fgsm" / "metrics.csv").query("source == 'train' and metric == 'loss'")["value"].tolist()
             for p in (inline.runs_dir, later.runs_dir)]
    assert train[0] == train[1]


# --------------------------------------------------------------------------------------------
# The plan end to end on the CPU: stopped after the first command, continued, identical
# --------------------------------------------------------------------------------------------
def plan(root: Path, *extra: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, str(ANALYSES / "gpu_plan.py"), "--smoke", "--runs-dir", str(root / "runs"),
            "--out", str(root / "paper"), "--bundle", str(root / "bundle"), "--device", "cpu", *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)


def comparable(run: Path) -> pd.DataFrame:
    df = pd.read_csv(run / "metrics.csv")
    df = df[~df["metric"].str.match(TIMING)]
    return df.sort_values(["source", "split", "metric", "attack", "epoch", "step"], kind="stable").reset_index(drop=True)


@pytest.mark.slow
def test_plan_on_the_cpu_stops_between_commands_and_continues_exactly(tmp_path):
    parts = ["--only", "referee", "fgsm", "apart", "figure2", "table"]
    first = plan(tmp_path / "a", *parts, "--stop-after-epochs", "1")
    assert first.returncode == 0, first.stdout + first.stderr
    record = json.loads((tmp_path / "a" / "paper" / "gpu_plan.json").read_text())
    assert record["invocations"][0]["reason"] == "stopped after the injected deadline"
    assert not {"train:pgd2", "train:fgsm", "train:apart"} <= set(record["tasks_done"])
    with tarfile.open(tmp_path / "a" / "bundle" / "paper.tar.gz") as tar:  # results came back after command 1
        assert "paper/runs/fgsm/metrics.csv" in tar.getnames() and "paper/gpu_plan.json" in tar.getnames()

    second = plan(tmp_path / "a", *parts)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "all chosen parts done" in second.stdout
    record = json.loads((tmp_path / "a" / "paper" / "gpu_plan.json").read_text())
    assert {"train:pgd2", "train:fgsm", "train:apart", "measure:fgsm", "measure:apart", "eval:fgsm"} <= set(
        record["tasks_done"])
    resumed = [n for n in ("pgd2", "fgsm", "apart")
               if '"kind": "resume"' in (tmp_path / "a" / "runs" / n / "events.jsonl").read_text()]
    assert resumed, "no training was resumed from a checkpoint: the first command did not stop one"

    whole = plan(tmp_path / "b", *parts[:-1])  # the same trainings and measurements, without the table
    assert whole.returncode == 0, whole.stdout + whole.stderr
    for name in ("pgd2", "fgsm", "apart"):
        pd.testing.assert_frame_equal(comparable(tmp_path / "a" / "runs" / name),
                                      comparable(tmp_path / "b" / "runs" / name), check_exact=True)
        # and the metrics-only copy that comes back is the same table
        assert (tmp_path / "a" / "paper" / "runs" / name / "metrics.csv").read_bytes() == (
            tmp_path / "a" / "runs" / name / "metrics.csv").read_bytes()

    out = tmp_path / "a" / "paper"
    for stem in ("fig2_strength.png", "fig2_strength.md", "curves.png", "table_methods.md", "README.md"):
        assert (out / stem).is_file() and (out / stem).stat().st_size > 0, stem
    readme = (out / "README.md").read_text()
    assert "44.36 % (epoch 20)" in readme and "not measured yet" in readme  # bench and bf16 were not asked for
    assert {p.name for p in (tmp_path / "a" / "bundle").iterdir()} == {"paper.tar.gz", "gpu_plan.json", "gpu_plan.log"}
    assert not list(out.rglob("*.pt"))  # no checkpoints in what comes back


def test_a_fresh_machine_restarts_from_the_results_that_came_back(lib, tmp_path):
    plan, catalog = lib["plan"], lib["catalog"]
    setting = paper_setting(lib, tmp_path)
    results = setting.out
    parts, tasks = plan.build(setting, lib["estimate"].Assumptions())
    done = ["train:pgd10", "eval:pgd10", "train:fgsm", "measure:fgsm", "train:apart"]
    for name, events in (("pgd10", []), ("fgsm", [{"kind": "reference_measured", "epoch": 30, "step": 1}]),
                         ("apart", []), ("fgsm+", [])):
        run = results / "runs" / name
        run.mkdir(parents=True)
        cfg = catalog.config_for(setting, catalog.catalog(setting)[name])
        (run / "config.json").write_text(json.dumps(cfg.to_dict()))
        (run / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    (results / "gpu_plan.json").write_text(json.dumps({"tasks_done": done}))
    assert sorted(plan.restore(setting, results)) == ["apart", "fgsm", "pgd10"]  # fgsm+ had not finished
    assert not (setting.runs_dir / "fgsm+").exists()
    for key in done:
        assert plan.is_done(setting, tasks[key]), key
    assert not (setting.runs_dir / "pgd10" / "checkpoints").exists()  # metrics only
    restored = plan.restored_runs(setting, ["pgd10", "fgsm", "apart", "fgsm+"])
    a = lib["estimate"].Assumptions()
    kw = dict(jobs=3, a=a, fresh=True, max_minutes=9, reserve_min=0.75, graceful=False, restored=restored,
              ref="pgd10", budget_min=1000)
    # Figure 2 for FGSM alone is done; measuring APART too needs the referee's checkpoint: trained again
    sel = plan.choose(parts, tasks, set(done), {}, only=["referee", "fgsm", "apart"], **kw)
    assert {"train:pgd10", "train:fgsm", "train:apart"} <= sel.done
    sel = plan.choose(parts, tasks, set(done), {}, only=["referee", "fgsm", "apart", "figure2"], **kw)
    assert "train:pgd10" not in sel.done and "train:fgsm" in sel.done and "measure:fgsm" in sel.done
    assert sel.timeline.start["train:pgd10"] == 0


def test_a_child_trains_the_referee_length_its_parent_chose(lib, tmp_path):
    """The referee's length the plan chose (--ref-epochs, or shortened to fit) reaches the child
    processes that train it, so they train the run the plan waits for."""
    gp = lib["gpu_plan"]
    args = gp.parser().parse_args(["--smoke", "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "p")])
    parent = gp.plan_setting(args)
    parent.ref_epochs = 3  # as decide() sets it
    argv = gp.child_command(parent, args)(["train:pgd2"])
    child = gp.plan_setting(gp.parser().parse_args(argv[2:]))
    assert child.ref_epochs == 3 and argv[-2:] == ["--child", "train:pgd2"]
    cat = lib["catalog"]
    assert cat.config_for(child, cat.catalog(child)["pgd2"]) == cat.config_for(parent, cat.catalog(parent)["pgd2"])
    assert cat.config_for(child, cat.catalog(child)["pgd2"]).epochs == 3
    assert not parent.autoattack  # the table's AutoAttack column is outside the plan's budget


@pytest.mark.slow
def test_plan_bf16_and_bench_parts_run_on_the_cpu_in_fp32(tmp_path):
    """Item 4's part and the CUDA benchmarks through the GPU's code path: on a CPU bf16 autocast is
    off, so the fp32 half is measured and the bf16 half says why it is missing; on a CPU the
    amp=True/False training pair is the same computation, so its curves must agree exactly."""
    done = plan(tmp_path, "--only", "referee", "fgsm", "bf16", "bench", "--jobs", "2")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "all chosen parts done" in done.stdout
    out = tmp_path / "paper"
    prec = json.loads((out / "bf16_vs_fp32.json").read_text())
    assert len(prec["evaluation"]) == 2
    for row in prec["evaluation"]:
        assert row["n"] > 0 and row["bf16"].startswith("not measured: no CUDA")
        for attack in ("clean", "fgsm", "pgd"):
            assert 0.0 <= row["attacks"][attack]["fp32_acc"] <= 1.0 and row["attacks"][attack]["bf16_acc"] is None
        assert row["attacks"]["pgd"]["fp32_acc"] <= row["attacks"]["clean"]["fp32_acc"]
    bf16, fp32 = prec["training"]["prec-bf16"], prec["training"]["prec-fp32"]
    assert bf16["amp"] and not fp32["amp"] and bf16["epochs"] == fp32["epochs"] == 2
    assert bf16["curves"] == fp32["curves"]
    bench = json.loads((out / "benchmarks.json").read_text())
    assert bench["bench_train"]["ratio"] > 0 and bench["bench_apart"]["apart_over_pgd10"] > 0
    for stem in ("bf16_vs_fp32.md", "benchmarks.md", "README.md"):
        assert (out / stem).is_file() and (out / stem).stat().st_size > 0, stem


def test_forward_flops_counts_two_per_multiply_add_of_convolutions_and_linear_layers():
    """The unit of the plan's estimate (lib.estimate): checked by hand on a small model, and the
    PreActResNet18 value docs/gpu-plan.md quotes."""
    from torch import nn

    from robustdrop.models import create_model, forward_flops

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2),
                          nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    model.train()
    expected = 2 * (4 * 8 * 8 * 3 * 9) + 2 * (8 * 4 * 4 * 2 * 9) + 2 * (10 * 128)
    assert forward_flops(model, (3, 8, 8)) == expected
    assert model.training and model[3].training  # the count leaves the model's mode as it was
    assert forward_flops(create_model("preactresnet18"), (3, 32, 32)) / 1e9 == pytest.approx(1.111, abs=5e-4)
