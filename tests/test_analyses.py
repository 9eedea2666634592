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
from robustdrop.plots.runs import eval_curve, open_run

ANALYSES = Path(__file__).resolve().parents[1] / "analyses"


@pytest.fixture(scope="module")
def scripts():
    sys.path.insert(0, str(ANALYSES))
    try:
        names = ["lib.setting", "lib.catalog", "lib.training", "lib.evaluation", "fig1_perturbations",
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
# Smoke runs: run_all once (2 jobs: the parallel path), then every script again on its runs
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
    code = scripts["run_all"].main(["--smoke", "--runs-dir", str(runs), "--out", str(out), "--jobs", "2"])
    return {"runs": runs, "out": out, "scripts": scripts, "code": code}


def test_run_all_smoke_trains_evaluates_and_writes_everything(smoke):
    assert smoke["code"] == 0
    out = smoke["out"]
    record = json.loads((out / "run_all.json").read_text())
    assert record["failed"] == [] and record["scale"] == "quick smoke" and record["jobs"] == 2
    lib = smoke["scripts"]
    setting = lib["lib.setting"].Setting(smoke=True, runs_dir=smoke["runs"])
    # every run of the catalog that run_all uses (the GPU plan's own runs are the plan's)
    for name in lib["run_all"].training_order(setting) + lib["lib.catalog"].cost_run_names():
        assert (smoke["runs"] / name / "checkpoints" / "best_model.pt").is_file(), name
        # the worker's output went to the run's log, line by line
        assert (smoke["runs"] / "logs" / f"{name}.log").read_text().count("epoch ") >= 2, name
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
    assert "reusing finished run" in printed and "] training " not in printed
    for stem in STEMS[name]:
        path = tmp_path / stem
        assert path.is_file() and path.stat().st_size > 0, stem


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
    cached = json.loads((path / smoke["scripts"]["lib.evaluation"].EVAL_CACHE).read_text())
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


def test_reuse_rule(scripts, tmp_path, capsys):
    setting_mod, catalog_mod, training = scripts["lib.setting"], scripts["lib.catalog"], scripts["lib.training"]
    setting = setting_mod.Setting(smoke=True, runs_dir=tmp_path / "runs", out=tmp_path / "out", eval_n=32)
    spec = catalog_mod.catalog(setting)["long-apart"]
    path = catalog_mod.run_dir(setting, "long-apart")
    assert training.run_state(path, catalog_mod.config_for(setting, spec))[0] == "missing"
    training.train_run(setting, "long-apart")
    assert training.run_state(path, catalog_mod.config_for(setting, spec))[0] == "finished"
    # threads do not count; any other field does
    config = catalog_mod.make_run_config
    assert training.run_state(path, config(setting, **{**spec.overrides, "threads": 2}))[0] == "finished"
    state, why = training.run_state(path, config(setting, **{**spec.overrides, "lr": 0.001}))
    assert state == "different" and "lr" in why
    capsys.readouterr()
    training.train_run(setting, "long-apart")
    assert "reusing finished run" in capsys.readouterr().out


def test_reuse_rule_run_made_before_a_config_field_existed(scripts, tmp_path):
    """A newer robustdrop adds config fields; a run made before is still reused where the script
    wants their defaults, and trained anew where it wants another value."""
    setting_mod, catalog_mod, training = scripts["lib.setting"], scripts["lib.catalog"], scripts["lib.training"]
    setting = setting_mod.Setting(smoke=True, runs_dir=tmp_path / "runs", out=tmp_path / "out", eval_n=32)
    spec = catalog_mod.catalog(setting)["cost-fgsm"]
    path = catalog_mod.run_dir(setting, "cost-fgsm")
    training.train_run(setting, "cost-fgsm")
    config_file = path / "config.json"
    config = json.loads(config_file.read_text())
    for field in ("depth", "nfgsm_noise", "gradalign_lambda", "final_eval", "tensorboard", "eval_epsilon"):
        del config[field]  # as if made before these fields existed
    config_file.write_text(json.dumps(config))
    wanted = catalog_mod.config_for(setting, spec)
    assert training.run_state(path, wanted)[0] == "finished"
    state, why = training.run_state(path, catalog_mod.make_run_config(setting, **{**spec.overrides,
                                                                                   "gradalign_lambda": 0.5}))
    assert state == "different" and "gradalign_lambda" in why
    config_file.write_text(json.dumps({**config, "from_the_future": 1}))
    state, why = training.run_state(path, wanted)
    assert state == "different" and "from_the_future" in why


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


def test_reuse_rule_checks_the_shipped_referee_by_its_sha256(scripts, tmp_path):
    """A Figure 2 run made with another builtin:quick (same config string, other weights) is not reused."""
    from robustdrop.diagnostics import verify_builtin
    from robustdrop.store import RunStore

    setting_mod, catalog_mod, training = scripts["lib.setting"], scripts["lib.catalog"], scripts["lib.training"]
    setting = setting_mod.Setting(runs_dir=tmp_path, out=tmp_path / "out")  # quick scale: builtin:quick
    cfg = catalog_mod.config_for(setting, catalog_mod.catalog(setting)["fgsm"])
    assert cfg.reference == "builtin:quick"
    store = RunStore.create(tmp_path, "fgsm")
    store.write_json(RunStore.CONFIG, cfg.to_dict())
    store.log_event("reference", epoch=0, step=0, sha256="0" * 64)
    store.flush()
    state, why = training.run_state(store.path, cfg)
    assert state == "different" and "another builtin:quick" in why
    store.truncate_logs(0, 0)
    store.log_event("reference", epoch=0, step=0, sha256=verify_builtin("quick")[1]["sha256"])
    store.flush()
    assert training.run_state(store.path, cfg) == ("different", "no readable checkpoints/last.pt")  # the referee matches


def test_referee_rule_attaches_a_shipped_referee_and_measures_a_catalog_one_after_training(scripts, tmp_path):
    """The one rule: quick scale attaches builtin:quick during training; paper scale and --smoke
    train Figure 2's runs without their PGD referee (nothing waits for it) and measure them after."""
    setting_mod, catalog_mod = scripts["lib.setting"], scripts["lib.catalog"]
    from lib.tasks import train_tasks

    figure2 = scripts["fig2_strength"].RUNS
    quick = setting_mod.Setting(runs_dir=tmp_path)
    assert not catalog_mod.reference_deferred(quick)
    assert [t.key for t in train_tasks(quick, figure2)] == [f"train:{n}" for n in figure2]
    for scale, smoke, ref in (("paper", False, "pgd10"), ("paper", True, "pgd2"), ("quick", True, "pgd3")):
        setting = setting_mod.Setting(scale=scale, smoke=smoke, runs_dir=tmp_path)
        assert catalog_mod.reference_deferred(setting) and catalog_mod.reference_run(setting) == ref
        assert catalog_mod.config_for(setting, catalog_mod.catalog(setting)["fgsm"]).reference is None
        tasks = {t.key: t.deps for t in train_tasks(setting, figure2)}
        assert all(tasks[f"train:{n}"] == () for n in [ref, *figure2])
        assert all(tasks[f"measure:{n}"] == (f"train:{ref}", f"train:{n}") for n in figure2)
        # forced the other way (the equivalence test of tests/test_gpu_plan.py): attached, waits
        forced = setting_mod.Setting(scale=scale, smoke=smoke, runs_dir=tmp_path, deferred_reference=False)
        assert catalog_mod.config_for(forced, catalog_mod.catalog(forced)["fgsm"]).reference == str(tmp_path / ref)
        assert {t.key: t.deps for t in train_tasks(forced, figure2)}["train:fgsm"] == (f"train:{ref}",)


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
