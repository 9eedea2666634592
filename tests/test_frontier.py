"""The step-size frontier (analyses/frontier.py, analyses/lib/frontier.py): which α is the best
fixed step, the paired comparison's numbers, and the --smoke path (outputs, reuse, cache)."""

from __future__ import annotations

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
