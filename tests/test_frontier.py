"""The step-size frontier (analyses/frontier.py, analyses/lib/frontier.py): which α is the best
fixed step, the paired comparison's numbers, the --smoke path (outputs, reuse, cache) and the rows
recorded by an earlier analysis (--previous)."""

from __future__ import annotations

import dataclasses
import importlib
import math
import sys
from pathlib import Path

import pandas as pd
import pytest
from scipy import stats

ANALYSES = Path(__file__).resolve().parents[1] / "analyses"


@pytest.fixture(scope="module")
def frontier():
    sys.path.insert(0, str(ANALYSES))
    try:
        yield importlib.import_module("frontier"), importlib.import_module("lib.frontier")
    finally:
        sys.path.remove(str(ANALYSES))


EPS = 10 / 255


def runs(**per_label) -> pd.DataFrame:
    """A runs frame: ``label=(method, alpha, [(final_pgd, collapsed), ...per seed])``."""
    rows = []
    for label, (method, alpha, seeds) in per_label.items():
        for seed, (pgd, collapsed) in enumerate(seeds):
            rows.append(dict(path=f"{label}-{seed}", method=method, label=label.replace("_", " "), epsilon=EPS,
                             alpha=alpha, seed=seed, collapsed=collapsed, onset=math.nan, final_test_pgd=pgd,
                             final_test_clean=0.3, best_test_pgd=pgd + 0.01, best_test_clean=0.3, aa=math.nan,
                             test_n=10000, best_test_n=10000, aa_n=0, train_s_per_epoch=20.0, best_val_epoch=30))
    return pd.DataFrame(rows)


def test_best_alpha_is_the_most_robust_step_that_never_collapsed(frontier):
    _, lib = frontier
    df = runs(**{
        "FGSM_α=5/255": ("fgsm", 5 / 255, [(0.20, False), (0.21, False), (0.19, False)]),
        "FGSM_α=7.5/255": ("fgsm", 7.5 / 255, [(0.25, False), (0.01, True), (0.24, False)]),  # best mean, collapsed once
        "FGSM_α=6.25/255": ("fgsm", 6.25 / 255, [(0.22, False)]),  # one seed only
        "APART": ("apart", math.nan, [(0.23, False), (0.22, False), (0.24, False)]),
    })
    groups = lib.group_table(df)
    row = groups[groups["label"] == "FGSM α=7.5/255"].iloc[0]
    assert row["collapsed"] == 1 and row["runs"] == 3 and row["alpha_over_eps"] == pytest.approx(0.75)
    assert lib.best_alpha(groups, EPS)["label"] == "FGSM α=5/255"
    assert lib.best_alpha(groups, 8 / 255) is None
    answer = lib.answer_rows(df, groups)
    final = answer[answer["column"] == "final_test_pgd"].iloc[0]
    assert (final["a"], final["b"], final["pairs"]) == ("APART", "FGSM α=5/255", 3)
    d = pd.Series([0.03, 0.01, 0.05])
    assert final["diff"] == pytest.approx(d.mean()) and final["diff_se"] == pytest.approx(d.std() / math.sqrt(3))
    assert final["p_t"] == pytest.approx(stats.ttest_rel([0.23, 0.22, 0.24], [0.20, 0.21, 0.19]).pvalue)
    assert final["p_wilcoxon"] == pytest.approx(0.25)  # 3 positive pairs: the exact two-sided p is 2/8
    assert final["wins_a"] == 3
    assert set(answer["column"]) == {"final_test_pgd", "best_test_pgd"}  # no AutoAttack measured: no row


def test_paired_uses_only_the_common_seeds(frontier):
    _, lib = frontier
    df = runs(**{"A": ("apart", math.nan, [(0.3, False), (0.3, False), (0.3, False)]),
                 "B": ("fgsm", 0.01, [(0.1, False), (0.2, False)])})
    row = lib.paired(df, EPS, "A", "B")
    assert row["pairs"] == 2 and row["seeds"] == "0,1" and row["diff"] == pytest.approx(0.15)


@pytest.mark.slow
def test_smoke_writes_the_outputs_and_reuses_runs_and_evaluations(frontier, tmp_path, capsys):
    script, _ = frontier
    argv = ["--smoke", "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "out")]
    assert script.main(argv) == 0
    first = capsys.readouterr().out
    for stem in ("frontier.md", "frontier.csv", "frontier.png", "frontier.pdf", "frontier_runs.csv",
                 "frontier_eval.json"):
        assert (tmp_path / "out" / stem).stat().st_size > 0, stem
    groups = pd.read_csv(tmp_path / "out" / "frontier.csv")
    assert sorted(groups["label"]) == ["APART", "FGSM α=10/255", "FGSM α=5/255"]
    assert (groups["runs"] == 2).all() and (groups["test_n"] == 128).all()
    text = (tmp_path / "out" / "frontier.md").read_text()
    assert "SMOKE TEST" in text and "APART − FGSM" in text and "10/255 N-FGSM" in text  # N-FGSM: missing
    assert script.main(argv) == 0
    again = capsys.readouterr().out
    assert again.count("reusing finished run") == 6
    evaluated = first.count("best-by-validation epoch")
    assert "best-by-validation epoch" not in again  # cached
    assert evaluated == (pd.read_csv(tmp_path / "out" / "frontier_runs.csv")["best_val_epoch"] < 2).sum()


def recorded_run(lib, path: str, **over):
    """A FrontierRun as an earlier analysis wrote it (awkward floats, NaN, bools)."""
    values = dict(path=path, method="fgsm", label="FGSM α=5/255", epsilon=EPS, alpha=5 / 255, seed=0, epochs=30,
                  collapsed=True, drop=17.0, onset=math.nan, best_probe_pgd=0.1 + 0.2, final_probe_pgd=1 / 3,
                  final_test_pgd=0.1784, final_test_clean=0.371, test_n=10000, best_val_epoch=30, best_val_pgd=0.208,
                  best_test_pgd=0.1784, best_test_clean=0.371, best_test_n=10000, train_s_per_epoch=58.281863362999275,
                  aa=0.134, aa_clean=0.363, aa_n=1000)
    return lib.FrontierRun(**{**values, **over})


def test_recorded_rows_read_back_exactly_and_a_run_read_now_wins(frontier, tmp_path):
    _, lib = frontier
    rows = [recorded_run(lib, "/gone/a"), recorded_run(lib, "/gone/b", method="apart", label="APART", alpha=math.nan,
                                                            collapsed=False, drop=math.nan, aa=math.nan, aa_n=0)]
    csv = tmp_path / "frontier_runs.csv"
    csv.write_text(lib.runs_frame(rows).to_csv(index=False))
    back = lib.read_recorded(csv)
    assert len(back) == len(rows)
    for got, want in zip(back, [dataclasses.replace(r, source=f"recorded: {csv}") for r in rows]):
        for f in dataclasses.fields(lib.FrontierRun):
            a, b = getattr(got, f.name), getattr(want, f.name)
            assert type(a) is type(b) and (a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b))), f.name
    measured = recorded_run(lib, "/gone/b", final_test_pgd=0.5, source="measured")
    merged = lib.with_recorded([measured], back)
    assert [(r.path, r.source) for r in merged] == [("/gone/a", f"recorded: {csv}"), ("/gone/b", "measured")]
    with pytest.raises(lib.RobustdropError, match="two runs of ε = 10/255 FGSM α=5/255 seed 0: /elsewhere/a .measured. and /gone/a"):
        lib.check_one_per_seed(lib.with_recorded([recorded_run(lib, "/elsewhere/a", source="measured")], back))


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    ("", "not a CSV table"),
    ("path,method\nx,fgsm\n", "no column label, epsilon"),
    ("SEED", "line 2: seed = 'abc' is not an integer"),
    ("TWICE", "is in both --previous"),
])
def test_a_bad_previous_file_is_one_line_and_nothing_is_trained_or_written(frontier, tmp_path, capsys, content, message):
    script, lib = frontier
    good = tmp_path / "good.csv"
    good.write_text(lib.runs_frame([recorded_run(lib, "/gone/a")]).to_csv(index=False))
    bad = tmp_path / "bad.csv"
    if content == "SEED":
        bad.write_text(good.read_text().replace("/gone/a,fgsm,FGSM α=5/255,0.0392156862745098,0.0196078431372549,0,",
                                                "/gone/a,fgsm,FGSM α=5/255,0.0392156862745098,0.0196078431372549,abc,"))
    elif content is not None:
        bad.write_text(content)
    previous = [str(good), str(good)] if content == "TWICE" else [str(bad)]
    argv = ["--smoke", "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--previous", *previous]
    assert script.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("frontier: error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def smoke_analysis(frontier, tmp_path_factory):
    """The --smoke runs (6 tiny trainings) and their analysis, shared by the --previous tests."""
    script, _ = frontier
    root = tmp_path_factory.mktemp("frontier-previous")
    assert script.main(["--smoke", "--runs-dir", str(root / "runs"), "--out", str(root / "out")]) == 0
    return root


def answer_part(md: str) -> str:
    return md[md.index("## The answer"):md.index("AutoAttack:")]


@pytest.mark.slow
def test_recorded_rows_give_the_same_tables_as_the_runs_they_record(frontier, smoke_analysis, tmp_path, capsys):
    script, _ = frontier
    first = smoke_analysis / "out"
    (tmp_path / "no-runs").mkdir()
    argv = ["--smoke", "--runs-dir", str(smoke_analysis / "runs"), "--runs", str(tmp_path / "no-runs"),
            "--previous", str(first / "frontier_runs.csv"), "--out", str(tmp_path / "out")]
    assert script.main(argv) == 0
    assert "best-by-validation epoch" not in capsys.readouterr().out  # nothing evaluated for a recorded row
    assert (tmp_path / "out" / "frontier.csv").read_text() == (first / "frontier.csv").read_text()
    md = (tmp_path / "out" / "frontier.md").read_text()
    assert answer_part(md) == answer_part((first / "frontier.md").read_text()) and "APART − FGSM" in answer_part(md)
    assert f"0 finished runs read from {tmp_path / 'no-runs'}" in md and f"6 rows taken from `{first / 'frontier_runs.csv'}`" in md
    before, after = pd.read_csv(first / "frontier_runs.csv"), pd.read_csv(tmp_path / "out" / "frontier_runs.csv")
    assert (before["source"] == "measured").all() and (after["source"] == f"recorded: {first / 'frontier_runs.csv'}").all()
    pd.testing.assert_frame_equal(before.drop(columns="source"), after.drop(columns="source"))


@pytest.mark.slow
def test_a_run_read_now_replaces_its_recorded_row_and_recorded_rows_are_not_attacked(frontier, smoke_analysis, tmp_path,
                                                                                    monkeypatch):
    script, lib = frontier
    rows = pd.read_csv(smoke_analysis / "out" / "frontier_runs.csv")
    apart0 = rows["path"].str.endswith("apart-s0")
    measured_pgd = float(rows.loc[apart0, "final_test_pgd"].iloc[0])
    rows.loc[apart0, "final_test_pgd"] = 0.999  # a stale record of a run that is read now
    gone = [recorded_run(lib, str(tmp_path / "gone" / f"nfgsm-s{s}"), method="n-fgsm", label="N-FGSM", alpha=math.nan,
                         seed=s, collapsed=False, aa=0.42, aa_clean=0.5, aa_n=8) for s in (0, 1)]
    previous = tmp_path / "previous.csv"
    previous.write_text(pd.concat([rows, lib.runs_frame(gone)]).to_csv(index=False))
    attacked = []

    def fake_autoattack(run, cache, data, *, n, device="cpu", measure=True):  # the path only: AutoAttack takes minutes
        attacked.append(run.path)
        run.aa, run.aa_clean, run.aa_n = 0.1, 0.2, n

    monkeypatch.setattr(script, "evaluate_autoattack", fake_autoattack)
    argv = ["--smoke", "--runs-dir", str(smoke_analysis / "runs"), "--previous", str(previous), "--aa-n", "8",
            "--out", str(tmp_path / "out")]
    assert script.main(argv) == 0
    out = pd.read_csv(tmp_path / "out" / "frontier_runs.csv").set_index("path")
    assert len(out) == 8 and (out["source"] == "measured").sum() == 6
    assert out.loc[rows.loc[apart0, "path"].iloc[0], "final_test_pgd"] == measured_pgd
    assert len(attacked) == 4 and not any("gone" in p for p in attacked)  # best α and APART, seeds 0-1
    nfgsm = out[out["label"] == "N-FGSM"]
    assert (nfgsm["aa"] == 0.42).all() and (nfgsm["source"] == f"recorded: {previous}").all()
    md = (tmp_path / "out" / "frontier.md").read_text()
    assert f"2 rows taken from `{previous}`" in md and "6 of its 8 rows replaced by the runs read now" in md
    assert "N-FGSM − FGSM" in md and "10/255 N-FGSM" not in md.split("Missing cells")[1].split("\n")[0]
