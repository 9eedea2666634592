"""The collapse-prediction study (analyses/collapse_prediction.py, analyses/lib/prediction.py) on
run directories with known series: outcomes by result not method, lead times, hits, false alarms,
the threshold trade-off, calibration, matched-strength values, and the files it writes; plus the
study definition (--plan) and the --smoke path."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import pandas as pd
import pytest
from test_early_warning import FLAT, LEADING

from robustdrop.store import RunStore, metric_row

ANALYSES = Path(__file__).resolve().parents[1] / "analyses"
EPS = 10 / 255


@pytest.fixture(scope="module")
def study():
    sys.path.insert(0, str(ANALYSES))
    try:
        yield importlib.import_module("collapse_prediction"), importlib.import_module("lib.prediction")
    finally:
        sys.path.remove(str(ANALYSES))


def write_run(root: Path, name: str, *, method="fgsm", seed=0, epsilon=EPS, alpha=None, pgd=None, fgsm=None,
              align=None, cos=None, apart=None, wong=None, seconds=None) -> Path:
    """A run directory with probe accuracies, the strength rows, a final test evaluation, (for
    ``apart``: (α, mean |δ|) at the last epoch) APART's own rows, (``wong``) the wong check's
    accuracies, and (``seconds``: {(source, split): s}) each diagnostic's ``time_s`` per epoch."""
    store = RunStore.create(root, name)
    store.write_json(RunStore.CONFIG, {"method": method, "seed": seed, "epsilon": epsilon, "alpha": alpha,
                                       "pgd_steps": 3})
    rows = []
    for e, p in enumerate(pgd, start=1):
        rows += [metric_row(e, e, "probe", "acc", p, attack="pgd", source="eval", n=1000),
                 metric_row(e, e, "probe", "acc", fgsm[e - 1] if fgsm else p + .05, attack="fgsm", source="eval",
                            n=1000),
                 metric_row(e, e, "train", "time_train_s", 10.0, source="train")]
        for metric, series in (("grad_alignment", align), ("cos_fgsm_pgd", cos)):
            if series is not None:
                rows.append(metric_row(e, e, "probe", metric, series[e - 1], attack="x", source="strength"))
        rows.append(metric_row(e, e, "train", "delta_abs_mean", 0.9 * (alpha or epsilon), attack="train-perturbation",
                               source="strength"))
        if wong is not None:
            rows.append(metric_row(e, e, "train", "acc", wong[e - 1], attack="pgd", source="wong", n=128))
        rows += [metric_row(e, e, split, "time_s", t, source=source) for (source, split), t in (seconds or {}).items()]
        if apart is not None:
            rows += [metric_row(e, e, "train", "alpha", apart[0] * e / len(pgd), source=method),
                     metric_row(e, e, "train", "delta_abs_mean", apart[1] * e / len(pgd), source=method)]
    last = len(pgd)
    rows += [metric_row(last, last, "test", "acc", pgd[-1] - .01, attack="pgd", source="eval", n=10000),
             metric_row(last, last, "test", "acc", 0.3, attack="none", source="eval", n=10000)]
    store.log_metrics(rows)
    store.flush()
    return store.path


LATE = dict(LEADING, align=[.97, .85, .86, .84, .85, .84, .85, .84, .30, .15, .10, .10],  # falls with the drop
            cos=[.90, .80, .79, .80, .78, .79, .80, .79, .25, .10, .06, .05])
WOBBLY = dict(FLAT, align=[.97, .85, .86, .83, .85, .60, .82, .85, .83, .84, .82, .83])  # one deep dip: an alarm


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A sweep directory (runs one level down) and a loose run next to it: three collapsing FGSM
    runs (two warned 2 epochs ahead, one at the drop), an RS-FGSM run that collapses too (a control
    by method, collapsing by outcome), PGD-3 and APART controls (one false alarm: APART), a
    matched-strength FGSM run, and two calibration-seed runs (a collapsing FGSM run, a PGD run with
    one dip of its gradient alignment)."""
    root = tmp_path_factory.mktemp("study")
    sweep = root / "cp-main"
    write_run(sweep, "fgsm-s0", seed=0, **LEADING)
    write_run(sweep, "fgsm-s1", seed=1, **LEADING)
    write_run(sweep, "fgsm-s2", seed=2, epsilon=12 / 255, **LATE)
    write_run(sweep, "rs-fgsm-s0", method="rs-fgsm", **LEADING)
    write_run(sweep, "pgd-s0", method="pgd", alpha=2.5 * EPS / 3, **FLAT)
    write_run(sweep, "apart-s0", method="apart", apart=(2.2 / 255, 2.6 / 255), **WOBBLY)
    write_run(sweep, "apart-s1", method="apart", seed=1, apart=(2.4 / 255, 2.8 / 255), **FLAT)
    write_run(sweep, "fgsm-s100", seed=100, **LEADING)
    write_run(sweep, "pgd-s101", method="pgd", seed=101, **WOBBLY)
    (sweep / "sweep.json").write_text("{}")
    write_run(root, "fgsm-matched-s0", alpha=2.6 / 255, **FLAT)
    return root


def test_outcomes_leads_hits_and_false_alarms(study, sweep):
    _, lib = study
    dirs = lib.find_run_dirs([sweep])
    assert len(dirs) == 10 and all((d / "config.json").is_file() for d in dirs)
    runs = [lib.summarize(d) for d in dirs]
    evaluation, calibration = study[0].split_calibration(runs)
    assert [r.seed for r in calibration] == [100, 101] and len(evaluation) == 8
    by = {r.path.name: r for r in evaluation}
    assert by["rs-fgsm-s0"].outcome == "collapsing" and by["pgd-s0"].outcome == "non-collapsing"
    assert by["fgsm-s0"].drop == 9 and by["fgsm-s0"].lead("early") == 2 and by["fgsm-s2"].lead("early") == 0
    assert by["fgsm-matched-s0"].label == "FGSM α=2.6/255" and by["pgd-s0"].label == "PGD-3"

    table = lib.signal_table(evaluation).set_index("signal")
    early = table.loc["early"]
    assert (early["collapsing_runs"], early["hits"], early["late"], early["missed"]) == (4, 4, 0, 0)
    assert early["lead_median"] == 2 and early["lead_min"] == 0 and early["lead_max"] == 2
    assert (early["control_runs"], early["false_alarms"], early["false_alarm_methods"]) == (4, 1, "APART")
    confirm = table.loc["confirm"]
    assert confirm["hits"] == 4 and confirm["lead_median"] == 0 and confirm["false_alarms"] == 0
    assert table.loc["ref_weak", "collapsing_runs"] == 0  # no referee in these runs: not evaluated
    assert table.loc["misaligned", "lead_median"] == 1  # 0.45 < 0.5 at epoch 8, one epoch ahead

    per_eps = lib.by_epsilon(evaluation).set_index(["epsilon", "signal"])
    assert per_eps.loc[(EPS, "early"), "hits"] == 3 and per_eps.loc[(EPS, "early"), "lead_median"] == 2
    assert per_eps.loc[(12 / 255, "early"), "lead_median"] == 0 and per_eps.loc[(12 / 255, "early"), "control_runs"] == 0
    trade = lib.tradeoff(evaluation)
    align = trade[trade["signal"] == "align_fall"].set_index("value")
    assert list(align.index) == list(lib.FALLS)
    assert align.loc[0.05, "false_alarm_rate"] >= align.loc[0.2, "false_alarm_rate"] >= align.loc[0.4, "false_alarm_rate"]
    assert align.loc[0.2, "false_alarm_rate"] == pytest.approx(0.25) and align.loc[0.3, "false_alarm_rate"] == 0
    # the dip (0.86 → 0.60) is a false alarm up to fall = 0.25; of 0.3 and 0.4 (both lead 1) the larger
    assert lib.calibrate(calibration) == {"fall": 0.4}
    assert lib.calibrate(calibration[:1]) == {}  # no control there: nothing can be judged
    strength = lib.strength_table(evaluation).set_index(["epsilon", "method"])
    assert strength.loc[(EPS, "FGSM"), "collapsed"] == 2 and strength.loc[(EPS, "APART"), "runs"] == 2
    assert strength.loc[(EPS, "FGSM α=2.6/255"), "delta_over_eps"] == pytest.approx(0.9 * 2.6 / 10)


def test_matched_values_and_stage_2s_sweep_file(study, sweep, tmp_path, capsys):
    """--matched-from computes stage 2 from the APART runs and writes it as a sweep file: FGSM at
    APART's mean final α and mean |δ| on stage 1's seeds, the study's fixed values."""
    from robustdrop.sweeps import read_toml

    script, lib = study
    runs = [lib.summarize(d) for d in lib.find_run_dirs([sweep])]
    values = lib.matched_values(runs).iloc[0]
    assert values["runs"] == 2 and values["alpha_mean"] * 255 == pytest.approx(2.3)
    assert values["delta_mean"] * 255 == pytest.approx(2.7)
    argv = ["--matched-from", str(sweep / "cp-main"), "--runs-dir", str(tmp_path)]
    assert script.main(argv) == 0
    out = capsys.readouterr().out
    assert "final α = 2.3/255" in out and "mean |δ| = 2.7/255" in out
    path = tmp_path / "collapse-prediction" / "cp-matched.toml"
    assert f"robustdrop sweep --file {path} --runs-dir {path.parent} --jobs 2" in out
    plan = script.study_plan(path)
    assert plan.name == "cp-matched" and len(plan.cells) == 2 * len(script.SEEDS)
    got = {(c.config.method, round(c.config.alpha * 255, 3), c.config.epsilon, c.config.seed, c.config.threads,
            c.config.eval_batch_size) for c in plan.cells}
    assert got == {("fgsm", a, EPS, s, 1, 128) for a in (2.3, 2.7) for s in script.SEEDS}
    assert read_toml(path)["preset"] == "quick"
    assert script.main(argv) == 0  # the same runs: the same file
    write_run(sweep / "cp-main", "apart-s2", method="apart", seed=2, apart=(3.0 / 255, 3.0 / 255), **FLAT)
    try:  # other APART runs: the written file (whose sweep may have run) is not replaced
        assert script.main(argv) == 2
        assert "exists with other cells" in capsys.readouterr().err
    finally:
        import shutil

        shutil.rmtree(sweep / "cp-main" / "apart-s2")


def test_the_analysis_writes_its_figure_tables_and_numbers(study, sweep, tmp_path, capsys):
    script, _ = study
    assert script.main(["--runs", str(sweep), "--out", str(tmp_path)]) == 0
    for stem in ("collapse_prediction.png", "collapse_prediction.pdf", "collapse_prediction.md",
                 "table_collapse_prediction.csv", "table_collapse_prediction.md", "table_matched_strength.csv"):
        assert (tmp_path / stem).stat().st_size > 0, stem
    text = (tmp_path / "collapse_prediction.md").read_text()
    # (the last column, the signal's diagnostic's seconds per epoch, is empty: these runs log no time_s)
    assert "| `early`: early rule (any of the above) | 4/4 | 0 | 0 / 0 | +2.0 [+1.5, +2.0] | +0 … +2 | 1/4 | APART |  |" \
        in text
    assert "## Calibrated thresholds" in text and "`fall` = 0.4" in text
    assert "## The early rule calibrated" in text
    raw = pd.read_csv(tmp_path / "table_collapse_prediction.csv")
    assert list(raw["signal"]) == ["weak_fgsm", "ref_weak", "misaligned", "align_fall", "cos_fall", "ref_fall",
                                   "wong_fall", "early", "confirm"]
    assert "early: hit 4/4, median lead 2.0 epochs, false alarms 1/4" in capsys.readouterr().out


def test_plan_prints_a_sweep_file_per_part(study, capsys):
    """--plan: every part of the study is a `robustdrop sweep --file` command (stage 2's file is
    written by --matched-from), and every collapse_prediction*.toml under studies/ is one of them."""
    script, _ = study
    assert script.main(["--plan"]) == 0
    out = capsys.readouterr().out
    assert "stage 1 75" in out and "stage 2 30" in out and "optional calibration 45" in out
    files = sorted((ANALYSES / "studies").glob("collapse_prediction*.toml"))
    assert len(files) == 4
    for f in files:
        assert f"robustdrop sweep --file analyses/studies/{f.name} --runs-dir" in out
    assert "--grid" not in out and "--backend ray" in out
    assert "collapse_prediction.py --matched-from runs/analyses/quick/collapse-prediction/cp-main" in out
    assert "robustdrop sweep --file runs/analyses/quick/collapse-prediction/cp-matched.toml" in out


def test_the_study_files_make_the_studys_cells(study):
    """The PGD-3 controls step 2.5ε/3 at each (ε, seed) of the grid beside them; the calibration
    files are stage 1's on seeds 100..102; the main file plans exactly the cells (names, configs,
    grid) of the sweep made by the grid command it replaced, so that sweep is continued, not refused."""
    from robustdrop.sweeps import parse_grid, plan_sweep

    script = study[0]
    main, pgd = (script.study_plan(f) for f in script.PARTS["stage 1"])
    words = "seed=0:5 epsilon=8/255,10/255,12/255 method=fgsm,rs-fgsm,apart,fgsm+ threads=1 eval_batch_size=128"
    committed = plan_sweep(parse_grid(words.split()), preset="quick", name="cp-main")
    assert [(c.name, c.config) for c in main.cells] == [(c.name, c.config) for c in committed.cells]
    assert (main.name, main.grid, main.fixed) == (committed.name, committed.grid, committed.fixed)

    def pgd_cells(plan):
        return {(c.config.epsilon, c.config.seed) for c in plan.cells if c.config.method == "pgd"
                and c.config.pgd_steps == 3 and c.config.alpha == pytest.approx(2.5 * c.config.epsilon / 3, rel=1e-3)
                and (c.config.threads, c.config.eval_batch_size) == (1, 128)}

    assert len(pgd.cells) == 15 and pgd_cells(pgd) == {(c.config.epsilon, c.config.seed) for c in main.cells}
    cal, cal_pgd = (script.study_plan(f) for f in script.PARTS["calibration"])
    assert script.CALIBRATION_SEEDS == (100, 103) and {c.config.seed for c in cal.cells} == {100, 101, 102}
    assert [c.config.method for c in cal.cells] == [c.config.method for c in main.cells if c.config.seed < 3]
    assert len(cal_pgd.cells) == 9 and pgd_cells(cal_pgd) == {(c.config.epsilon, c.config.seed) for c in cal.cells}
    few = script.study_plan(script.PARTS["stage 1"][1], only={"seed": [0], "epsilon": [10 / 255]},
                            fixed={"epochs": 2})
    assert [(c.name, c.config.epochs) for c in few.cells] == [("eps10-s0", 2)]


WONG_FALLS = [.10, .20, .30, .35, .40, .40, .42, .15, .05, .02, .01, .0]  # −0.27 at epoch 8, the drop at 9
WONG_STEADY = [.10, .20, .30, .35, .40, .40, .42, .41, .43, .42, .44, .43]
COSTS = {("strength", "probe"): 2.0, ("wong", "train"): 0.5}


def test_wong_fall_beside_the_strength_signals(study, tmp_path):
    """Issue 21: Wong et al.'s early stop (``wong_fall``) in the table on the same runs as
    ``cos_fall`` and ``align_fall`` — hits, lead, false alarms and the seconds per epoch of its
    diagnostic beside the strength diagnostic's — from rows the runs logged or from rows measured
    afterwards and passed in (``--wong TABLE``); runs without them do not count for it."""
    script, lib = study
    runs = [write_run(tmp_path, "fgsm-s0", wong=WONG_FALLS, seconds=COSTS, **LEADING),
            write_run(tmp_path, "pgd-s0", method="pgd", wong=WONG_STEADY, seconds=COSTS, **FLAT),
            write_run(tmp_path, "apart-s0", method="apart", wong=[*WONG_STEADY[:5], .1, *WONG_STEADY[6:]],
                      seconds=COSTS, **FLAT),
            write_run(tmp_path, "fgsm-s1", seed=1, seconds={("strength", "probe"): 2.0}, **LEADING)]
    table = lib.signal_table([lib.summarize(r) for r in runs]).set_index("signal")
    wong = table.loc["wong_fall"]
    assert (wong["collapsing_runs"], wong["hits"], wong["lead_median"]) == (1, 1, 1)
    assert (wong["control_runs"], wong["false_alarms"], wong["false_alarm_methods"]) == (2, 1, "APART")
    assert table.loc["cos_fall", "collapsing_runs"] == 2 and table.loc["cos_fall", "lead_median"] == 2
    assert (wong["cost_s_per_epoch"], table.loc["cos_fall", "cost_s_per_epoch"]) == (0.5, 2.0)
    assert table.loc["early", "cost_s_per_epoch"] == 2.5  # the median run: both diagnostics
    # the same rows measured after training (lib.wong_replay's table) and passed in
    bare = write_run(tmp_path / "bare", "fgsm-s0", seconds=COSTS, **LEADING)
    extra = RunStore.open(runs[0]).metrics().query("source == 'wong'")
    assert lib.summarize(bare).first["wong_fall"] is None
    assert lib.summarize(bare, extra=extra).first["wong_fall"] == 8
    shown = script.display_signals(table.reset_index()).set_index("signal")
    assert shown.loc[f"`wong_fall`: {lib.ROW_TEXT['wong_fall']}", "s/epoch of its diagnostic"] == "0.5"


def test_missing_runs_is_a_clear_error(study, tmp_path, capsys):
    assert study[0].main(["--runs", str(tmp_path)]) == 2
    assert "no run directories" in capsys.readouterr().err


@pytest.mark.slow
def test_smoke_runs_the_study_files_as_sweeps_and_reuses_them(study, tmp_path, capsys):
    """--smoke: a few tiny cells of each study file (seed 0 and calibration seed 100 at one ε),
    stage 2's file computed from the APART run, all run by sweeps; a rerun trains nothing."""
    script, _ = study
    argv = ["--smoke", "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--jobs", "2"]
    cache = os.environ.get("ROBUSTDROP_CACHE")
    assert script.main(argv) == 0
    root = tmp_path / "runs" / "collapse-prediction"
    cells = {p.parent.name: sorted(c.name for c in p.parent.iterdir() if (c / "config.json").is_file())
             for p in root.glob("*/sweep.json")}
    assert cells.keys() == {"cp-main", "cp-pgd3", "cp-cal-main", "cp-matched"}
    assert len(cells["cp-main"]) == 2 and cells["cp-pgd3"] == ["eps8-s0"] and len(cells["cp-cal-main"]) == 1
    assert len(cells["cp-matched"]) == 1 and cells["cp-matched"][0].endswith("-seed=0")  # at APART's mean |δ|
    assert (root / "cp-matched.toml").is_file() and (tmp_path / "out" / "collapse_prediction.png").is_file()
    assert os.environ.get("ROBUSTDROP_CACHE") == cache  # the cells' cache was set for them only
    assert cache is not None or any((tmp_path / "runs" / "cache").iterdir())
    capsys.readouterr()
    assert script.main(argv) == 0
    out = capsys.readouterr().out
    assert out.count(" finished, 0 to resume, 0 to start)") == 4, out


def test_early_rule_chosen_on_calibration_seeds_and_evaluated_on_the_others(study, sweep):
    script, lib = study
    rule_lib = importlib.import_module("lib.early_rule")
    runs = [lib.summarize(d) for d in lib.find_run_dirs([sweep])]
    evaluation, calibration = script.split_calibration(runs)
    # no wong rows in these runs: wong_fall is left out of the pool
    assert rule_lib.pool(calibration) == ("align_fall", "cos_fall", "misaligned")
    chosen, cal, tried = rule_lib.choose(calibration)
    # align_fall false-alarms on the calibration PGD run's dip (0.86 → 0.60) up to fall 0.25; cos_fall
    # warns 3 epochs ahead at fall 0.05 and 0.1 (the larger wins) and alone (simplest)
    assert chosen == rule_lib.EarlyRule(("cos_fall",), 1, 0.1) and tried > 20
    assert (cal["hits"], cal["false_alarms"], cal["lead_median"]) == (1, 0, 3)
    ours = rule_lib.score(evaluation, lambda r: rule_lib.warning_epoch(r, chosen))
    default = rule_lib.apriori_score(evaluation)
    assert (ours["hits"], ours["collapsing"], ours["false_alarms"], ours["controls"]) == (4, 4, 0, 4)
    assert (default["hits"], default["false_alarms"]) == (4, 1)  # the APART run's dip
    assert rule_lib.wins(ours, default) and not rule_lib.wins(default, ours) and not rule_lib.wins(ours, ours)
    assert rule_lib.choose(calibration[:1])[0] is None  # no control among them: nothing can be chosen
    two_of = rule_lib.EarlyRule(("align_fall", "cos_fall"), 2, 0.2)
    by = {r.path.name: r for r in evaluation}
    assert rule_lib.warning_epoch(by["fgsm-s0"], two_of) == max(by["fgsm-s0"].first["align_fall"],
                                                                by["fgsm-s0"].first["cos_fall"])


def test_the_study_compares_with_the_a_priori_rule_not_the_package_default(study, tmp_path):
    """The package default is the calibrated rule (align_fall alone, fall 0.15); the study's tables
    and the calibration's comparison stay with the a-priori rule (any early signal, fall 0.2)."""
    _, lib = study
    rule_lib = importlib.import_module("lib.early_rule")
    from robustdrop.diagnostics import CollapseRule, detect_collapse, first_epochs

    assert lib.APRIORI == CollapseRule(signals="all", fall=0.2) and lib.APRIORI != CollapseRule()
    # a collapse that only cos(δ_FGSM, δ_PGD) announces (the alignment stays flat): the a-priori rule
    # warns at 7, two epochs before the drop; the package default (align_fall alone) never does
    path = write_run(tmp_path, "fgsm-s0", **dict(LEADING, align=FLAT["align"]))
    run = lib.summarize(path)
    assert run.first["cos_fall"] == 7 and run.first["align_fall"] is None and run.first["early"] == 7
    assert first_epochs(detect_collapse(RunStore.open(path).metrics()))["early"] is None
    scored = rule_lib.apriori_score([lib.summarize(path, rule=CollapseRule())])  # summarized with the default
    assert (scored["hits"], scored["missed"], scored["lead_median"]) == (1, 0, 2)
