"""robustdrop.plots on synthetic run directories (tests/helpers_runs.py)."""

from __future__ import annotations

import argparse
import ast
import io
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from robustdrop.errors import RobustdropError
from robustdrop.plots import (
    FORMATS,
    apart_figure,
    collapse_figure,
    compare,
    curves_figure,
    format_table,
    landscape_figure,
    perturbations_figure,
    plot_collapse,
    plot_perturbations,
    robustbench_json,
)
from robustdrop.plots._common import paper_table
from robustdrop.plots.cli import add_plot_parsers
from robustdrop.plots.landscape import contour_epochs
from robustdrop.plots.runs import (
    eval_curve,
    examples_per_epoch,
    passes_per_step,
    run_seconds,
    seconds_per_epoch,
    train_seconds_per_epoch,
)
from robustdrop.store import metric_row

try:
    from tests.helpers_runs import (
        EPS,
        apart_run,
        collapse_pgd_acc,
        collapsing_fgsm_run,
        stable_pgd_acc,
        stable_pgd_run,
        write_synthetic_run,
    )
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    from helpers_runs import (
        EPS,
        apart_run,
        collapse_pgd_acc,
        collapsing_fgsm_run,
        stable_pgd_acc,
        stable_pgd_run,
        write_synthetic_run,
    )

PGD_LABEL = "PGD-20 (ε=8/255, step 2/255, 1 restart), n=1000 probe"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    return {
        "fgsm": collapsing_fgsm_run(root, epochs=12, onset=8),
        "pgd": stable_pgd_run(root, epochs=12),
        "apart": apart_run(root, epochs=6),
        "bare": write_synthetic_run(root, "bare", epochs=4, strength=False),
        "noref": write_synthetic_run(root, "noref", epochs=12, onset=8, referee=False),
    }


def _labels(ax) -> list[str]:
    return [line.get_label() for line in ax.get_lines()]


def _onset_lines(ax) -> list:
    return [line for line in ax.get_lines() if line.get_gid() == "collapse_onset"]


def _assert_image_files(paths: list[Path]) -> None:
    assert [p.suffix for p in paths] == [".png", ".pdf"]
    for p in paths:
        assert p.is_file() and p.stat().st_size > 1000
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert paths[1].read_bytes()[:5] == b"%PDF-"


# --------------------------------------------------------------------------------------------
# collapse (Fig. 2)
# --------------------------------------------------------------------------------------------
def test_collapse_figure_has_curves_onset_and_paper_overlay(runs):
    fig = collapse_figure([runs["fgsm"]], paper=True, reference_free=True)
    main, loss, gap, align = fig.axes[:4]
    labels = _labels(main)
    robust = next(line for line in main.get_lines() if line.get_label() == f"robust acc, {PGD_LABEL}")
    assert list(robust.get_xdata()) == list(range(13))
    assert np.allclose(robust.get_ydata(), [collapse_pgd_acc(e, 8) for e in range(13)])
    assert any(lbl.startswith("reference model on FGSM (ε=8/255) δ") for lbl in labels)
    assert "reference model on random-sign noise (ε=8/255)" in labels  # logged once: a constant line
    assert "reference model on uniform noise (ε=8/255)" in labels
    assert sum("digitized from the paper's Fig. 2" in lbl for lbl in labels) == 4
    onset = _onset_lines(main)
    assert len(onset) == 1 and onset[0].get_xdata()[0] == 8 and onset[0].get_label() == "collapse onset (epoch 8)"
    assert main.get_ylabel() == "accuracy" and align.get_xlabel() == "epoch"
    assert "not logged" not in main.get_title()
    assert {"FGSM", "random-sign noise"} <= set(_labels(loss))
    diff = next(line for line in gap.get_lines() if line.get_label() == "FGSM − random-sign noise")
    expected = [(0.05 if e >= 8 else 1.0 + 0.02 * e) - 0.04 for e in range(13)]  # loss increase FGSM − noise
    assert np.allclose(diff.get_ydata(), expected) and abs(max(diff.get_ydata())) < 2  # no ±1000 swings
    assert any(lbl.startswith("grad alignment") for lbl in _labels(align))
    for ax in (loss, gap, align):
        assert len(_onset_lines(ax)) == 1
    assert fig.legends  # the main panel's legend sits under the figure


def test_collapse_accuracy_axis_fits_the_data(runs):
    fig = collapse_figure([runs["fgsm"]], reference_free=False)
    assert len(fig.axes) == 1  # with a referee, the reference-free panels are on request
    top = max(max(line.get_ydata()) for line in fig.axes[0].get_lines() if line.get_gid() != "collapse_onset")
    low, high = fig.axes[0].get_ylim()
    assert top < high <= top + 0.1 and low < 0


def test_collapse_without_referee_draws_the_reference_free_panels(runs):
    fig = collapse_figure(runs["noref"])
    main, loss, gap, align = fig.axes
    titles = [ax.get_title() for ax in fig.axes]
    assert not any("not logged" in t for t in titles)
    assert "--reference auto" in titles[0]  # says how to get the paper's curves
    labels = _labels(main)
    assert any(lbl.startswith("robust acc") for lbl in labels)
    assert not any("reference model" in lbl for lbl in labels)
    assert {"FGSM", "random-sign noise"} <= set(_labels(loss))
    assert "FGSM − random-sign noise" in _labels(gap)
    assert {"grad alignment cos(∇L(x), ∇L(x+η))", "cos(δ_FGSM, δ_PGD)"} <= set(_labels(align))
    assert main.get_ylim()[1] < 1.0  # fitted to the data


def test_plot_collapse_several_runs_writes_png_and_pdf(runs, tmp_path):
    paths = plot_collapse([runs["fgsm"], runs["pgd"]], tmp_path / "figs")
    _assert_image_files(paths)
    assert paths[0] == tmp_path / "figs" / "collapse.png"


def test_collapse_several_runs_marks_only_the_collapsing_one(runs):
    fig = collapse_figure([runs["fgsm"], runs["pgd"]])
    main = fig.axes[0]
    assert len(_onset_lines(main)) == 1
    labels = _labels(main)
    assert any(lbl.startswith("fgsm: robust acc") for lbl in labels)
    assert any(lbl.startswith("pgd10 (pgd): robust acc") for lbl in labels)


def test_collapse_draws_only_what_was_logged(runs):
    fig = collapse_figure(runs["bare"], reference_free=True)  # no strength measures at all
    assert len(fig.axes) == 1 and "not logged" not in fig.axes[0].get_title()
    assert any(lbl.startswith("robust acc") for lbl in _labels(fig.axes[0]))
    assert not _onset_lines(fig.axes[0])
    fig = collapse_figure([runs["fgsm"], runs["noref"]])  # one run lacks the referee: said in the title
    assert "not logged: noref: referee" in fig.axes[0].get_title()
    assert len(fig.axes) == 4


# --------------------------------------------------------------------------------------------
# perturbations (Fig. 1)
# --------------------------------------------------------------------------------------------
def test_perturbations_grid(runs):
    fig = perturbations_figure(runs["fgsm"], [6, 12])
    image_axes = [ax for ax in fig.axes if ax.images]
    assert len(image_axes) == 3 * 4  # images row + two epochs, four probe images
    titles = [ax.get_title() for ax in image_axes[:4]]
    assert titles == ["Truck", "Bird", "Airplane", "Ship"]
    row_labels = [ax.get_ylabel() for ax in image_axes[::4]]
    assert row_labels[0] == "original image"
    assert row_labels[1].startswith("epoch 6\n(before onset)") and row_labels[2].startswith("epoch 12\n(after onset)")
    # δ = ±ε maps to exactly 0 or 1 per channel
    shown = np.asarray(image_axes[4].images[0].get_array())
    assert np.all(np.isclose(shown, 0.0, atol=1e-3) | np.isclose(shown, 1.0, atol=1e-3))
    colorbar = next(ax for ax in fig.axes if not ax.images and ax.get_ylabel().startswith("δ per channel"))
    assert np.allclose(sorted(colorbar.get_yticks()), [-EPS, 0.0, EPS])


def test_perturbations_default_epochs_are_before_onset_and_last(runs, tmp_path):
    paths = plot_perturbations(runs["fgsm"], tmp_path)
    _assert_image_files(paths)
    fig = perturbations_figure(runs["fgsm"])
    labels = [ax.get_ylabel() for ax in fig.axes if ax.images][::4]
    assert labels[1].startswith("epoch 7") and labels[2].startswith("epoch 12")


def test_perturbations_missing_epoch_lists_available(runs):
    with pytest.raises(RobustdropError, match=r"epoch\(s\) 20.*available epochs: 6, 7, 12"):
        perturbations_figure(runs["fgsm"], [7, 20])
    with pytest.raises(RobustdropError, match="no snapshots"):
        perturbations_figure(runs["pgd"], [1])


# --------------------------------------------------------------------------------------------
# landscape
# --------------------------------------------------------------------------------------------
def test_landscape_profiles_and_contours_around_onset(runs):
    fig = landscape_figure(runs["fgsm"])
    profile_axes = [ax for ax in fig.axes if ax.get_title().startswith("along")]
    assert len(profile_axes) == 2
    for ax in profile_axes:
        assert len(ax.get_lines()) == 6  # epochs 2, 4, ..., 12
        assert "epoch 8 (collapse onset)" in _labels(ax)
    contour_titles = [ax.get_title() for ax in fig.axes if ax.get_xlabel() == "u: FGSM direction"]
    assert contour_titles == ["epoch 6 (before onset)", "epoch 8 (at onset)", "epoch 12 (after onset)"]


def test_landscape_epoch_choice_and_errors(runs):
    assert contour_epochs([1, 2, 3, 4, 5], None) == [(1, "first"), (3, "middle"), (5, "last")]
    assert contour_epochs([2, 4, 6], 5) == [(4, "before onset"), (6, "first after onset")]
    fig = landscape_figure(runs["fgsm"], [2, 4])
    assert len(fig.axes[0].get_lines()) == 2
    with pytest.raises(RobustdropError, match=r"available epochs: 2, 4, 6, 8, 10, 12"):
        landscape_figure(runs["fgsm"], [3])
    with pytest.raises(RobustdropError, match="no loss landscapes"):
        landscape_figure(runs["pgd"])


# --------------------------------------------------------------------------------------------
# curves, APART
# --------------------------------------------------------------------------------------------
def test_curves_panels_and_paper_overlay(runs):
    fig = curves_figure([runs["fgsm"], runs["pgd"]], paper=True)
    clean, fgsm, pgd = fig.axes[:3]
    assert [ax.get_title().split("\n")[0] for ax in (clean, fgsm, pgd)] == [
        "Clean accuracy", "FGSM accuracy", "PGD accuracy"]
    assert "PGD-20 (ε=8/255, step 2/255, 1 restart)" in pgd.get_title()
    assert "fgsm (probe, n=1000)" in _labels(pgd) and "pgd10 (pgd) (probe, n=1000)" in _labels(pgd)
    assert sum("digitized from the paper's PGD-10 vs APART figure" in lbl for lbl in _labels(pgd)) == 2
    assert not any("digitized" in lbl for lbl in _labels(clean))
    assert len(_onset_lines(pgd)) == 1
    pgd_line = next(line for line in pgd.get_lines() if line.get_label().startswith("pgd10"))
    assert np.allclose(pgd_line.get_ydata(), [stable_pgd_acc(e) for e in range(13)])


def test_apart_panels(runs):
    fig = apart_figure(runs["apart"])
    step_ax, layer_ax, lr_ax, delta_ax = fig.axes[:4]
    alpha = next(line for line in step_ax.get_lines() if line.get_label().startswith("α (input"))
    x = np.asarray(alpha.get_xdata())
    assert len(x) == 18 and x[-1] == pytest.approx(6.0) and x[0] == pytest.approx(1 / 3)
    assert step_ax.get_yscale() == "log"
    assert _labels(layer_ax) == ["α_b1", "α_b2", "α_b3", "α_b4"]
    assert "lr of ψ (lr_psi)" in _labels(lr_ax)
    assert {"mean |δ| / ε", "fraction of |δ| = ε"} <= set(_labels(delta_ax))
    with pytest.raises(RobustdropError, match="no APART metrics"):
        apart_figure(runs["fgsm"])


# --------------------------------------------------------------------------------------------
# compare, tables, RobustBench
# --------------------------------------------------------------------------------------------
def test_compare_best_final_onset_and_cost(runs):
    df = compare([runs["fgsm"], runs["pgd"], runs["apart"]]).set_index("run")
    f, p = df.loc["fgsm"], df.loc["pgd10"]
    # FGSM: best by probe PGD (no val split) just before the onset; final on the test split
    assert f["selected_by"] == "probe PGD-20" and f["best_epoch"] == 7 and f["best_eval"] == "probe, n=1000"
    assert f["best_pgd"] == pytest.approx(collapse_pgd_acc(7, 8))
    assert f["final_epoch"] == 12 and f["final_eval"] == "test, n=10000" and f["final_pgd"] == 0.0
    assert f["onset_epoch"] == 8 and f["epochs"] == 12
    # PGD-10: best chosen on val (peaks at 6) although probe keeps rising
    assert p["selected_by"] == "val PGD-20" and p["best_epoch"] == 6
    assert p["best_pgd"] == pytest.approx(stable_pgd_acc(6))
    assert p["final_pgd"] == pytest.approx(stable_pgd_acc(12) - 0.005)
    assert pd.isna(p["onset_epoch"])
    assert p["pgd_attack"] == "PGD-20 (ε=8/255, step 2/255, 1 restart)" and p["fgsm_attack"] == "FGSM (ε=8/255)"
    assert f["s_per_epoch"] == pytest.approx(12.0) and p["s_per_epoch"] == pytest.approx(42.0)
    assert f["passes_per_step"] == 4 and p["passes_per_step"] == 22
    assert f["cost_vs_pgd10"] == pytest.approx(0.25) and p["cost_vs_pgd10"] == pytest.approx(1.0)
    assert df.loc["apart", "cost_vs_pgd10"] == pytest.approx(0.3)
    assert df.attrs["pgd10_run"] == "pgd10"
    assert (df["method"].tolist(), df["model"].iloc[0], df["dataset"].iloc[0]) == (
        ["fgsm", "pgd", "apart"], "preactresnet18", "cifar10")


def test_per_run_numbers_median_train_time_mean_epoch_time_mean_passes():
    rows = []
    for epoch, (train, evals, fwd) in enumerate([(30.0, 0.0, 2), (10.0, 6.0, 2), (11.0, 0.0, 4), (12.0, 6.0, 2)], 1):
        rows += [metric_row(epoch, 10 * epoch, "train", "time_train_s", train),
                 metric_row(epoch, 10 * epoch, "train", "time_eval_s", evals),
                 metric_row(epoch, 10 * epoch, "train", "time_diag_s", 1.0),
                 metric_row(epoch, 10 * epoch, "train", "passes_forward", fwd, source="cost"),
                 metric_row(epoch, 10 * epoch, "train", "passes_backward", 2, source="cost"),
                 metric_row(epoch, 10 * epoch, "train", "acc", 0.5, attack="fgsm", n=640)]
    df = pd.DataFrame(rows)
    # training time: the median ignores the warm-up epoch; skip_first drops it outright
    assert train_seconds_per_epoch(df) == pytest.approx(11.5)
    assert train_seconds_per_epoch(df, skip_first=True) == pytest.approx(11.0)
    # epoch time: the mean, so evaluations every other epoch count
    assert seconds_per_epoch(df) == pytest.approx((30 + 16 + 11 + 18) / 4)
    assert run_seconds(df) == pytest.approx(63 + 12 + 4)
    assert passes_per_step(df) == (pytest.approx(2.5), pytest.approx(2.0))
    assert examples_per_epoch(df) == 640
    empty = df[df["metric"] == "acc"]
    assert math.isnan(train_seconds_per_epoch(empty)) and math.isnan(seconds_per_epoch(empty))
    assert all(math.isnan(x) for x in passes_per_step(empty)) and eval_curve(empty).empty


def test_compare_without_pgd10_has_no_cost_ratio(runs):
    df = compare([runs["fgsm"]])
    assert df["cost_vs_pgd10"].isna().all() and df.attrs["pgd10_run"] is None


@pytest.mark.parametrize("fmt", FORMATS)
def test_format_table_renders(runs, fmt):
    text = format_table(compare([runs["fgsm"], runs["pgd"]]), fmt)
    assert "fgsm" in text and "pgd10" in text
    if fmt == "csv":
        back = pd.read_csv(io.StringIO(text))
        assert back.loc[0, "best_epoch"] == 7 and back.loc[0, "best_pgd"] == pytest.approx(0.31)
    elif fmt == "markdown":
        lines = text.splitlines()
        assert lines[0].startswith("| run |") and lines[1].startswith("|---|")
        assert "| 31.00 |" in lines[2] and "| 0.25× |" in lines[2]
    elif fmt == "latex":
        assert "\\begin{tabular}" in text and "\\end{tabular}" in text and "best PGD \\%" in text
        assert "$\\varepsilon$=8/255" in text and "%" not in text.replace("\\%", "").split("\n", 1)[1]
    else:
        assert "best PGD %" in text and "onset ep." in text and "PGD = PGD-20" in text


def test_format_table_unknown_format(runs):
    with pytest.raises(RobustdropError, match="unknown table format"):
        format_table(compare([runs["pgd"]]), "html")


def test_robustbench_json(runs):
    info = robustbench_json(runs["pgd"])
    for key in ("name", "authors", "additional_data", "number_forward_passes", "dataset", "venue",
                "architecture", "eps", "clean_acc", "reported", "autoattack_acc"):
        assert key in info
    assert info["autoattack_acc"] is None and info["reported"] is None and info["authors"] is None
    assert (info["dataset"], info["eps"], info["architecture"]) == ("cifar10", "8/255", "preactresnet18")
    assert info["robustdrop_pgd_acc"] == "38.50"
    assert info["robustdrop_pgd_attack"] == "PGD-20 (ε=8/255, step 2/255, 1 restart)"
    assert info["robustdrop_eval"] == "test, n=10000" and info["robustdrop_epoch"] == 12
    json.dumps(info)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="robustdrop")
    add_plot_parsers(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_cli_plot_and_compare(runs, tmp_path, capsys):
    args = _parse(["plot", "perturbations", str(runs["fgsm"]), "--epochs", "6,12", "--out", str(tmp_path / "p")])
    assert args.func(args) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(tmp_path / "p" / "perturbations.png"), str(tmp_path / "p" / "perturbations.pdf")]

    table = tmp_path / "cmp.md"
    args = _parse(["compare", str(runs["fgsm"]), str(runs["pgd"]), "--out", str(table), "--robustbench"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out.split()
    assert printed[0] == str(table) and table.read_text().startswith("| run |")
    assert printed[1:] == [str(runs["fgsm"] / "robustbench.json"), str(runs["pgd"] / "robustbench.json")]
    assert json.loads((runs["pgd"] / "robustbench.json").read_text())["robustdrop_pgd_acc"] == "38.50"

    args = _parse(["compare", str(runs["pgd"]), "--format", "csv"])
    assert args.func(args) == 0
    assert capsys.readouterr().out.startswith("run,method,")


def test_cli_default_out_is_the_runs_plots_folder(runs, capsys):
    args = _parse(["plot", "apart", str(runs["apart"])])
    assert args.func(args) == 0
    assert capsys.readouterr().out.split()[0] == str(runs["apart"] / "plots" / "apart.png")


def test_cli_bad_run_path_is_a_one_line_error(tmp_path):
    args = _parse(["plot", "collapse", str(tmp_path / "nope")])
    with pytest.raises(RobustdropError, match="does not exist") as err:
        args.func(args)
    assert "\n" not in str(err.value)
    (tmp_path / "empty").mkdir()
    args = _parse(["plot", "curves", str(tmp_path / "empty")])
    with pytest.raises(RobustdropError, match="not a robustdrop run directory"):
        args.func(args)
    args = _parse(["plot", "landscape", str(tmp_path / "empty"), "--epochs", "x"])
    with pytest.raises(RobustdropError):
        args.func(args)


# --------------------------------------------------------------------------------------------
# paper data and layering
# --------------------------------------------------------------------------------------------
def test_paper_data_files():
    fig2 = paper_table("fig2_fgsm_curve.csv")
    assert list(fig2["epoch"]) == list(range(1, 31))
    row20 = fig2.set_index("epoch").loc[20]
    assert (row20["orange_fgsm_pgd20"], row20["blue_ref_acc_fgsm"]) == (0.436, 0.626)
    assert (fig2["orange_fgsm_pgd20"][fig2["epoch"] >= 22] == 0).all()
    assert (fig2["red_ref_acc_random_noise"] == 0.794).all()
    e4 = paper_table("fig_pgd_curve_200.csv").set_index("epoch")
    assert (e4.loc[30, "pgd10"], e4.loc[30, "apart"], e4.loc[199, "pgd10"], e4.loc[199, "apart"]) == (
        0.47, 0.49, 0.315, 0.416)
    readme = Path(__file__).parents[1] / "robustdrop" / "plots" / "paper_data" / "README.md"
    assert "digitized" in readme.read_text() and "±0.01" in readme.read_text()


def test_plots_import_only_store_errors_and_formatting():
    allowed = {"robustdrop.store", "robustdrop.errors", "robustdrop.formatting"}
    pkg = Path(__file__).parents[1] / "robustdrop" / "plots"
    for source in pkg.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                if name.startswith("robustdrop") and not name.startswith("robustdrop.plots"):
                    assert name in allowed, f"{source.name} imports {name}"
                assert not name.startswith(("torch", "matplotlib.pyplot")), f"{source.name} imports {name}"


# --------------------------------------------------------------------------------------------
# end-of-run summary (robustdrop track prints it)
# --------------------------------------------------------------------------------------------
def test_run_summary_says_what_happened_and_what_to_run_next(runs):
    from robustdrop.plots.summary import run_summary

    text = run_summary(runs["fgsm"])
    pgd = [collapse_pgd_acc(e, 8) for e in range(13)]
    best = int(np.argmax(pgd))
    assert f"best probe PGD-20 (ε=8/255, step 2/255, 1 restart) accuracy: {100 * max(pgd):.1f}% at epoch {best}" in text
    assert "collapse onset: epoch 8" in text
    assert "final, epoch 12: probe (n=1000) clean" in text and "test (n=10000)" in text
    assert f"{100 * (0.75 - 0.012 * best):.1f}% vs 79.4% at epoch {best} (best)" in text  # referee, FGSM vs noise
    assert "79.0% vs 79.4% at epoch 12 (last)" in text
    assert text.splitlines()[-1] == f"next: robustdrop plot collapse {runs['fgsm']}"
    bare = run_summary(runs["bare"])
    assert "collapse onset: none detected" in bare and "referee" not in bare
