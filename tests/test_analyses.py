"""The analysis scripts (analyses/*.py) in their --smoke mode, the run reuse rule, and the CW loss."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

from robustdrop.attacks import PGD, cw_margin_loss
from robustdrop.evaluation import EVAL_CACHE
from robustdrop.plots.runs import eval_curve, open_run
from robustdrop.store import SweepRecord

ANALYSES = Path(__file__).resolve().parents[1] / "analyses"


@pytest.fixture(scope="module")
def scripts():
    sys.path.insert(0, str(ANALYSES))
    try:
        names = ["lib.setting", "lib.catalog", "fig1_perturbations",
                 "fig2_strength", "fig_long_run", "table_methods", "table_ablation", "table_cost", "run_all",
                 "make_reference"]
        yield {n: importlib.import_module(n) for n in names}
    finally:
        sys.path.remove(str(ANALYSES))


# --------------------------------------------------------------------------------------------
# CW margin loss
# --------------------------------------------------------------------------------------------
class Linear(nn.Module):
    def __init__(self, dim: int = 12, classes: int = 5):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(torch.randn(dim, classes, generator=g))
        self.b = nn.Parameter(torch.randn(classes, generator=g))

    def forward(self, x):
        return x.flatten(1) @ self.w + self.b


def test_cw_margin_loss_on_a_linear_model():
    model = Linear()
    x = torch.rand(7, 3, 2, 2, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 3, 4, 0, 2])
    z = model(x)
    expected = torch.stack([max(z[i, j] for j in range(5) if j != y[i]) - z[i, y[i]] for i in range(len(y))])
    got = cw_margin_loss(z, y, reduction="none")
    assert torch.allclose(got, expected)
    assert torch.allclose(cw_margin_loss(z, y, reduction="sum"), expected.sum())
    assert torch.allclose(cw_margin_loss(z, y), expected.mean())
    # positive exactly on the misclassified examples
    assert torch.equal(got > 0, z.argmax(1) != y)
    with pytest.raises(ValueError):
        cw_margin_loss(z, y, reduction="max")


def test_cw_pgd_stays_in_the_eps_ball_and_raises_the_margin():
    model = Linear(dim=3 * 4 * 4, classes=4)
    x = torch.rand(16, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    y = torch.randint(0, 4, (16,), generator=torch.Generator().manual_seed(3))
    eps = 8 / 255
    attack = PGD(eps, steps=10, step_size=2 / 255, loss_fn=cw_margin_loss)
    delta = attack(model, x, y, torch.Generator().manual_seed(4))
    assert delta.abs().max() <= eps + 1e-7
    assert (x + delta).min() >= 0 and (x + delta).max() <= 1
    with torch.no_grad():
        assert (cw_margin_loss(model(x + delta), y, "none") >= cw_margin_loss(model(x), y, "none") - 1e-6).all()
        assert cw_margin_loss(model(x + delta), y) > cw_margin_loss(model(x), y)


# --------------------------------------------------------------------------------------------
# Smoke runs: run_all once (one sweep, 2 jobs: the parallel path), then every script again on its runs
# --------------------------------------------------------------------------------------------
STEMS = {
    "fig2_strength": ["fig2_strength.png", "fig2_strength.pdf", "fig2_strength_fgsm.png", "fig2_strength.md"],
    "fig1_perturbations": ["fig1_perturbations.png", "fig1_perturbations.pdf", "fig1_perturbations.md"],
    "fig_long_run": ["fig_long_run.png", "fig_long_run.pdf", "fig_long_run_apart.png", "fig_long_run.md"],
    "table_methods": ["table_methods.md", "table_methods.csv", "table_methods.tex"],
    "table_ablation": ["table_ablation.md", "table_ablation.csv", "table_ablation.tex"],
    "table_cost": ["table_cost.md", "table_cost.csv", "table_cost.tex"],
}


@pytest.fixture(scope="module")
def smoke(scripts, tmp_path_factory):
    root = tmp_path_factory.mktemp("analyses")
    runs, out = root / "runs", root / "figures"
    argv = ["--smoke", "--runs-dir", str(runs), "--out", str(out), "--jobs", "2"]
    # first with a deadline that passes while the sweep is planned (cheap): no cell finishes, nothing
    # is drawn, exit 143 (the package's tests stop running cells at a deadline and continue them)
    first = scripts["run_all"].main([*argv, "--max-minutes", "0.001"])
    unfinished = [c for c, e in SweepRecord.open(runs).cells.items() if e["status"] != "finished"]
    drawn = out.exists() and any(out.iterdir())
    code = scripts["run_all"].main(argv)  # the same command continues
    return {"runs": runs, "out": out, "scripts": scripts, "code": code, "deadline": (first, unfinished, drawn)}


def test_run_all_draws_nothing_past_its_deadline_and_the_same_command_continues(smoke):
    first, unfinished, drawn = smoke["deadline"]
    assert first == 143 and len(unfinished) == 14 and not drawn
    record = SweepRecord.open(smoke["runs"])
    assert all(record.status(c) == "finished" for c in unfinished)


def test_run_all_smoke_trains_evaluates_and_writes_everything(smoke):
    assert smoke["code"] == 0
    out = smoke["out"]
    record = json.loads((out / "run_all.json").read_text())
    assert record["failed"] == [] and record["scale"] == "quick smoke" and record["jobs"] == 2
    lib = smoke["scripts"]
    setting = lib["lib.setting"].Setting(smoke=True, runs_dir=smoke["runs"])
    # every run of the catalog that run_all uses (the GPU plan's own runs are the plan's): cells of
    # the sweep whose directory is the runs dir, each run's output in the sweep's log
    record = SweepRecord.open(smoke["runs"])
    order = lib["run_all"].training_order(setting)
    trainings = [n for n in order + lib["lib.catalog"].cost_run_names() if record.cells[n]["kind"] == "train"]
    assert all(record.status(n) == "finished" for n in [*order, *trainings])
    for name in trainings:
        assert (smoke["runs"] / name / "checkpoints" / "best_model.pt").is_file(), name
        assert (smoke["runs"] / "logs" / f"{name}.log").read_text().count("epoch ") >= 2, name
    # the referee first; Figure 2's replay cells after their run and the referee
    assert order[0] == "pgd3" and order.index("fgsm-referee") > order.index("fgsm")
    assert set(record.cells["fgsm-referee"]["after"]) == {"fgsm", "pgd3"}
    for stems in STEMS.values():
        for stem in stems:
            assert (out / stem).is_file() and (out / stem).stat().st_size > 0, stem
    # --smoke's referee is the tiny PGD run: Figure 2's runs were measured on it after training
    for name in lib["fig2_strength"].RUNS:
        df = pd.read_csv(smoke["runs"] / name / "metrics.csv")
        assert set(df[df["source"] == "strength-ref"]["epoch"]) == {1, 2}, name


@pytest.mark.parametrize("name", list(STEMS))
def test_script_smoke_reuses_the_runs_and_writes_its_outputs(smoke, name, tmp_path, capsys):
    capsys.readouterr()
    argv = ["--smoke", "--runs-dir", str(smoke["runs"]), "--out", str(tmp_path)]
    assert smoke["scripts"][name].main(argv) == 0
    printed = capsys.readouterr().out
    assert "0 to resume, 0 to start" in printed and "done " not in printed
    for stem in STEMS[name]:
        path = tmp_path / stem
        assert path.is_file() and path.stat().st_size > 0, stem
        if stem.endswith(".md"):  # every table and figure text names the commit and command that made it
            assert "Made by commit `" in path.read_text() and "`python analyses/" in path.read_text(), stem


def test_method_table_contents(smoke):
    raw = pd.read_csv(smoke["out"] / "table_methods.csv")
    assert list(raw["run"]) == ["fgsm", "rs-fgsm", "pgd3", "fgsm+", "apart", "n-fgsm", "gradalign"]
    assert list(raw["method"])[-2:] == ["n-fgsm", "gradalign"]
    for col in ("final_clean", "final_pgd", "final_cw", "best_clean", "best_pgd", "best_cw", "final_aa", "aa_clean",
                "aa_pgd"):
        assert raw[col].between(0, 1).all(), col
    # the adversary never helps: PGD / CW / AutoAttack accuracy at most the clean accuracy (AutoAttack: on its subset)
    assert (raw["final_pgd"] <= raw["final_clean"]).all() and (raw["final_cw"] <= raw["final_clean"]).all()
    assert (raw["final_aa"] <= raw["aa_clean"]).all()
    assert (raw["final_epoch"] == 2).all() and (raw["aa_n"] == 16).all()
    md = (smoke["out"] / "table_methods.md").read_text()
    assert "CW" in md and "final AutoAttack %" in md
    # the caption says what AutoAttack and on how many images
    assert "APGD-CE (100 iterations), APGD-T" in md and "Square (5000 queries" in md and "subset of 16 test images" in md
    assert "\\toprule" in (smoke["out"] / "table_methods.tex").read_text()
    ablation = pd.read_csv(smoke["out"] / "table_ablation.csv")
    assert list(ablation["run"]) == ["apart", "fgsm+", "apart-no-init", "apart-no-step"]


def test_best_checkpoint_is_the_best_validation_epoch(smoke):
    path = smoke["runs"] / "fgsm"
    val = eval_curve(open_run(path).metrics, split="val")
    state = torch.load(path / "checkpoints" / "best_model.pt", weights_only=True)
    assert state["epoch"] == int(val.idxmax())
    cached = json.loads((path / EVAL_CACHE).read_text())
    assert {k.split("|")[0] for k in cached} == {"final", "best", "autoattack"}


def test_cost_table_ratio(smoke):
    raw = pd.read_csv(smoke["out"] / "table_cost.csv")
    pgd10 = raw[raw["run"] == "cost-pgd10"].iloc[0]
    assert pgd10["passes_forward"] == 11 and pgd10["cost_vs_pgd10"] == pytest.approx(1.0)
    apart = raw[raw["run"] == "cost-apart"].iloc[0]
    assert apart["passes_vs_pgd10"] == pytest.approx(4 / 22)
    passes = raw.set_index("run")[["passes_forward", "passes_backward"]]
    assert tuple(passes.loc["cost-n-fgsm"]) == (2, 2) and tuple(passes.loc["cost-gradalign"]) == (3, 5)
    assert (raw["train_s_per_epoch"] > 0).all()
    assert "APART / PGD-10 measured cost" in (smoke["out"] / "table_cost.md").read_text()


def test_catalog_cells_reuse_runs_by_the_one_rule(scripts, tmp_path, capsys):
    """A catalog cell is reused when its run is finished with the cell's config (threads do not
    count), also a run made before the runs dir was a sweep (today's layout: adopted); another
    config value trains it anew."""
    setting_mod, catalog_mod = scripts["lib.setting"], scripts["lib.catalog"]
    from robustdrop.api import track
    from robustdrop.reuse import decide

    setting = setting_mod.Setting(smoke=True, runs_dir=tmp_path / "runs", out=tmp_path / "out", eval_n=32)
    spec = catalog_mod.catalog(setting)["cost-fgsm"]
    path = catalog_mod.run_dir(setting, "cost-fgsm")
    (tmp_path / "runs" / "frontier").mkdir(parents=True)  # another study's folder in the runs dir
    track(catalog_mod.config_for(setting, spec), runs_dir=setting.runs_dir, name="cost-fgsm", progress=False,
          data=catalog_mod.data_for(setting))  # made before, outside any sweep
    config = catalog_mod.make_run_config
    assert decide(path, config(setting, **{**catalog_mod.cell_values(setting, spec), "threads": 2})).action == "reuse"
    decision = decide(path, config(setting, **{**spec.overrides, "lr": 0.001}))
    assert decision.action == "retrain" and "lr" in decision.why
    capsys.readouterr()
    catalog_mod.ensure_cells(setting, ["cost-fgsm"])
    assert "1 cells (1 finished, 0 to resume, 0 to start)" in capsys.readouterr().out
    assert SweepRecord.open(setting.runs_dir).status("cost-fgsm") == "finished"


def test_autoattack_column_empty_with_a_note_without_torchattacks(smoke, tmp_path, monkeypatch):
    from robustdrop import evaluation
    from robustdrop.errors import RobustdropError

    def missing():
        raise RobustdropError("AutoAttack needs the optional package torchattacks; install it with `pip install x`")

    monkeypatch.setattr(evaluation, "import_torchattacks", missing)
    argv = ["--smoke", "--runs-dir", str(smoke["runs"]), "--out", str(tmp_path), "--aa-n", "8"]  # not cached
    assert smoke["scripts"]["table_methods"].main(argv) == 0
    raw = pd.read_csv(tmp_path / "table_methods.csv")
    assert raw["final_aa"].isna().all() and raw["final_pgd"].notna().all()
    assert "final AutoAttack: not measured: AutoAttack needs the optional package torchattacks" in (
        tmp_path / "table_methods.md").read_text()
    assert smoke["scripts"]["table_methods"].main([*argv, "--no-autoattack"]) == 0
    assert "final AutoAttack: not run (--no-autoattack)" in (tmp_path / "table_methods.md").read_text()


def test_referee_rule_attaches_a_shipped_referee_and_measures_a_catalog_one_after_training(scripts, tmp_path):
    """The one rule: quick scale attaches builtin:quick during training; paper scale and --smoke
    train Figure 2's runs without their PGD referee (nothing waits for it) and replay the referee
    over their per-epoch weights in a replay cell after both."""
    setting_mod, catalog_mod = scripts["lib.setting"], scripts["lib.catalog"]
    figure2 = scripts["fig2_strength"].RUNS
    quick = setting_mod.Setting(runs_dir=tmp_path)
    assert not catalog_mod.reference_deferred(quick)
    cells = catalog_mod.cells(quick)
    assert all(cells[n]["reference"] == "builtin:quick" for n in figure2)
    assert not any(v.get("kind") == "replay" for v in cells.values())
    for scale, smoke, ref in (("paper", False, "pgd10"), ("paper", True, "pgd2"), ("quick", True, "pgd3")):
        setting = setting_mod.Setting(scale=scale, smoke=smoke, runs_dir=tmp_path)
        assert catalog_mod.reference_deferred(setting) and catalog_mod.reference_run(setting) == ref
        cells = catalog_mod.cells(setting)
        for n in figure2:
            assert "reference" not in cells[n] and cells[n]["save_weights_every"] == 1
            assert cells[f"{n}-referee"] == {"kind": "replay", "run": f"@{n}", "reference": f"@{ref}"}
        assert catalog_mod.config_for(setting, catalog_mod.catalog(setting)["fgsm"]).reference is None
        # forced the other way (the equivalence test of tests/test_gpu_plan.py): attached, waits
        forced = setting_mod.Setting(scale=scale, smoke=smoke, runs_dir=tmp_path, deferred_reference=False)
        assert catalog_mod.cells(forced)["fgsm"]["reference"] == f"@{ref}"
        assert catalog_mod.config_for(forced, catalog_mod.catalog(forced)["fgsm"]).reference == str(tmp_path / ref)


def test_make_reference_phases_and_choice(scripts):
    mr = scripts["make_reference"]
    pgd = pd.Series([0.0, 0.1, 0.15, 0.2, 0.18, 0.1, 0.05, 0.0, 0.0, 0.0, 0.0], index=range(1, 12))
    robust, last, collapse, peak = mr.phases(pgd)
    assert (peak, collapse) == (4, 7)  # from epoch 7 on, PGD accuracy stays below a third of its peak
    assert robust == [2, 3, 4, 5, 6] and last == [7, 8, 9, 10, 11]
    table = pd.DataFrame([
        {"candidate": "a", "gap_before": 0.10, "gap_after": 0.03, "epoch_s": 0.1},  # never meets noise: out
        {"candidate": "b", "gap_before": 0.07, "gap_after": 0.01, "epoch_s": 0.5},
        {"candidate": "c", "gap_before": 0.06, "gap_after": 0.00, "epoch_s": 0.1},
    ])
    name, why = mr.choose(table)
    assert name == "b" and "7.0 points" in why


def test_a_script_stopped_by_sigterm_exits_143_with_one_line(scripts, capsys):
    """A SIGTERM that stopped a script's sweep (cells checkpointed, recorded ``stopped``) is the
    shell's 143 and one line saying the same command continues, not a traceback."""
    import signal

    from robustdrop.errors import RunInterrupted

    def stopped():
        raise RunInterrupted(signal.SIGTERM, "stopped by SIGTERM: 2 cell(s) checkpointed; rerun the same command to continue")

    run_script = scripts["lib.setting"].run_script
    assert run_script(stopped) == 143
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["stopped by SIGTERM: 2 cell(s) checkpointed; rerun the same command to continue"]
    assert run_script(lambda: 3) == 3 and run_script(lambda: None) == 0
