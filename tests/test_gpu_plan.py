"""The GPU plan (analyses/gpu_plan.py): its sweep's cells in order of value, the parts --only
selects, the dry run's estimate, and — on the CPU, at a tiny scale, through the same entry point the
GPU runs — the plan end to end, stopped at its deadline and continued, against an uninterrupted run."""

from __future__ import annotations

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
def gpu_plan():
    sys.path.insert(0, str(ANALYSES))
    try:
        yield importlib.import_module("gpu_plan")
    finally:
        sys.path.remove(str(ANALYSES))


def plan_setting(gpu_plan, tmp_path, *argv):
    args = gpu_plan.parser().parse_args(["--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "p"), *argv])
    return gpu_plan.plan_setting(args), gpu_plan.chosen_parts(args)


# --------------------------------------------------------------------------------------------
# The cells (no training)
# --------------------------------------------------------------------------------------------
def test_the_cells_are_the_catalog_runs_in_order_of_value_with_the_referee_replays(gpu_plan, tmp_path):
    from lib.catalog import catalog, config_for

    setting, parts = plan_setting(gpu_plan, tmp_path, "--ref-epochs", "10")
    assert parts == list(gpu_plan.PARTS)
    cells = gpu_plan.sweep_cells(setting, parts)
    assert list(cells) == ["pgd10", "fgsm", "apart", "fgsm-referee", "apart-referee", "fgsm+", "fgsm+-referee",
                           "prec-bf16", "prec-fp32", "apart-authors"]
    assert cells["fgsm-referee"] == {"kind": "replay", "run": "@fgsm", "reference": "@pgd10"}
    assert cells["pgd10"]["epochs"] == 10 and cells["pgd10"]["pgd_steps"] == 10  # --ref-epochs reaches the referee
    assert cells["fgsm"] == config_for(setting, catalog(setting)["fgsm"]).to_dict()
    assert cells["fgsm"]["save_weights_every"] == 1 and cells["fgsm"]["reference"] is None  # replayed, not waited for
    assert not setting.autoattack  # the table's AutoAttack column is outside the plan's time


def test_only_keeps_the_parts_asked_for_and_what_they_read(gpu_plan, tmp_path):
    setting, parts = plan_setting(gpu_plan, tmp_path, "--only", "fgsm", "figure2")
    assert parts == ["referee", "fgsm", "figure2"]
    assert list(gpu_plan.sweep_cells(setting, parts)) == ["pgd10", "fgsm", "fgsm-referee"]  # APART's replay
    # needs APART, which was not asked for; a smaller --only later keeps the cells the sweep recorded
    assert list(gpu_plan.sweep_cells(setting, ["referee"], recorded=["fgsm", "fgsm-referee"])) == [
        "pgd10", "fgsm", "fgsm-referee"]
    setting, parts = plan_setting(gpu_plan, tmp_path, "--skip", "bench", "bf16", "apart-authors")
    assert "prec-bf16" not in gpu_plan.sweep_cells(setting, parts) and "bench" not in parts


def test_a_command_gets_its_minutes_within_what_is_left_of_the_budget(gpu_plan):
    args = gpu_plan.parser().parse_args(["--budget-minutes", "15", "--max-minutes", "9"])
    assert gpu_plan.command_minutes(args, {"invocations": []}) == 9
    assert gpu_plan.command_minutes(args, {"invocations": [{"wall_s": 540}]}) == pytest.approx(6)
    assert gpu_plan.command_minutes(args, {"invocations": [{"wall_s": 540}, {"wall_s": 400}]}) == 0
    args = gpu_plan.parser().parse_args(["--budget-minutes", "0", "--max-minutes", "0"])
    assert gpu_plan.command_minutes(args, {"invocations": [{"wall_s": 5400}]}) == float("inf")


def test_negative_minutes_are_refused_in_one_line_before_anything_is_written(gpu_plan, tmp_path, capsys):
    assert gpu_plan.main(["--smoke", "--runs-dir", str(tmp_path / "runs"), "--max-minutes", "-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--max-minutes and --budget-minutes must be >= 0" in err
    assert not (tmp_path / "runs").exists()


def test_the_referee_keeps_its_recorded_length_and_a_changed_one_is_refused_in_one_line(gpu_plan, tmp_path, capsys):
    from robustdrop.sweeps.runner import open_sweep

    argv = ["--smoke", "--device", "cpu", "--only", "referee", "--runs-dir", str(tmp_path / "runs"),
            "--out", str(tmp_path / "p")]
    setting, parts = plan_setting(gpu_plan, tmp_path, *argv, "--ref-epochs", "4")
    open_sweep(gpu_plan.make_plan(setting, parts, setting.runs_dir / "plan"), setting.runs_dir)  # as a command leaves it
    assert gpu_plan.main([*argv, "--ref-epochs", "5", "--max-minutes", "0.05"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pgd2's config differs" in err and "epochs" in err, err
    assert not (tmp_path / "p").exists()  # refused before anything was written
    assert gpu_plan.recorded_ref_epochs(setting) == 4  # what a command without --ref-epochs continues


def test_dry_run_prints_the_cells_and_the_engines_estimate_and_creates_nothing(tmp_path):
    out = plan(tmp_path, "--dry-run", "--only", "fgsm", "figure2")
    assert out.returncode == 0, out.stdout + out.stderr
    for cell in ("pgd2", "fgsm", "fgsm-referee"):
        assert re.search(rf"^\s+{re.escape(cell)} \(", out.stdout, re.M), out.stdout
    assert re.search(r"pgd2 \(train\) start: about [\d.]+ min", out.stdout), out.stdout
    assert "fgsm-referee (replay after fgsm, pgd2)" in out.stdout
    assert re.search(r"about [\d.]+ min of training", out.stdout)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "paper").exists()  # a dry run creates nothing


# --------------------------------------------------------------------------------------------
# The plan end to end on the CPU: stopped at its deadline, continued, identical
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
def test_plan_on_the_cpu_stops_at_its_deadline_and_continues_exactly(tmp_path):
    """The documented first command's parts (referee, FGSM, Figure 2) and the table. An
    uninterrupted plan first; then the same plan whose first command's deadline falls at 60 % of the
    referee's wall time there (so mid-training on a busy or an idle machine alike) stops it
    (SIGTERM, checkpoint); the same command continues it; the metrics equal the uninterrupted run's."""
    parts = ["--ref-epochs", "6", "--only", "fgsm", "figure2"]
    whole = plan(tmp_path / "b", *parts, "--max-minutes", "0")
    assert whole.returncode == 0, whole.stdout + whole.stderr
    wall = json.loads((tmp_path / "b" / "runs" / "plan" / "sweep.json").read_text())["cells"]["pgd2"]["wall_s"]

    first = plan(tmp_path / "a", *parts, "table", "--max-minutes", f"{0.6 * wall / 60:.4f}")
    assert first.returncode == 0, first.stdout + first.stderr
    record = json.loads((tmp_path / "a" / "paper" / "gpu_plan.json").read_text())
    assert record["cells"]["pgd2"] == "stopped", (record["cells"], wall)
    assert record["status"].startswith("to do: ") and "run the same command again" in first.stdout
    with tarfile.open(tmp_path / "a" / "bundle" / "paper.tar.gz") as tar:  # results came back after command 1
        assert "paper/gpu_plan.json" in tar.getnames()

    second = plan(tmp_path / "a", *parts, "table", "--max-minutes", "0")
    assert second.returncode == 0, second.stdout + second.stderr
    assert "all chosen parts done" in second.stdout
    record = json.loads((tmp_path / "a" / "paper" / "gpu_plan.json").read_text())
    assert set(record["cells"].values()) == {"finished"} and record["steps"] == {"table": "done"}
    assert len(record["invocations"]) == 2
    live = tmp_path / "a" / "runs" / "plan"
    assert '"kind": "resume"' in (live / "pgd2" / "events.jsonl").read_text()  # continued from its checkpoint
    for name in ("pgd2", "fgsm"):
        pd.testing.assert_frame_equal(comparable(live / name), comparable(tmp_path / "b" / "runs" / "plan" / name),
                                      check_exact=True)
        # and the metrics-only copy that comes back is the same table
        assert (tmp_path / "a" / "paper" / "runs" / name / "metrics.csv").read_bytes() == (
            live / name / "metrics.csv").read_bytes()
    assert (live / "fgsm" / "metrics.csv").read_text().count("strength-ref") > 0  # Figure 2's replayed rows

    out = tmp_path / "a" / "paper"
    for stem in ("fig2_strength.png", "fig2_strength.md", "curves.png", "table_methods.md"):
        assert (out / stem).is_file() and (out / stem).stat().st_size > 0, stem
    assert {p.name for p in (tmp_path / "a" / "bundle").iterdir()} == {"paper.tar.gz", "gpu_plan.json", "gpu_plan.log"}
    assert not list(out.rglob("*.pt"))  # no checkpoints in what comes back


@pytest.mark.slow
def test_plan_bf16_and_bench_parts_run_on_the_cpu_in_fp32(tmp_path):
    """Item 4's part and the CUDA benchmarks through the GPU's code path: on a CPU bf16 autocast is
    off, so the fp32 half is measured and the bf16 half says why it is missing; on a CPU the
    amp=True/False training pair is the same computation, so its curves must agree exactly."""
    done = plan(tmp_path, "--only", "bf16", "bench", "--jobs", "2", "--max-minutes", "0")
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
    for stem in ("bf16_vs_fp32.md", "benchmarks.json"):
        assert (out / stem).is_file() and (out / stem).stat().st_size > 0, stem


def test_forward_flops_counts_two_per_multiply_add_of_convolutions_and_linear_layers():
    """robustdrop.models.forward_flops (the FLOP rate of the plan's benchmarks): checked by hand on
    a small model, and the PreActResNet18 value docs/gpu-plan.md quotes."""
    from torch import nn

    from robustdrop.models import create_model, forward_flops

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2),
                          nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    model.train()
    expected = 2 * (4 * 8 * 8 * 3 * 9) + 2 * (8 * 4 * 4 * 2 * 9) + 2 * (10 * 128)
    assert forward_flops(model, (3, 8, 8)) == expected
    assert model.training and model[3].training  # the count leaves the model's mode as it was
    assert forward_flops(create_model("preactresnet18"), (3, 32, 32)) / 1e9 == pytest.approx(1.111, abs=5e-4)
