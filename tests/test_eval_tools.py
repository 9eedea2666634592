"""The evaluation standard: our attacks against an external implementation (torchattacks), AutoAttack,
``robustdrop evaluate`` on saved checkpoints, ``--final-eval``, and TensorBoard output read back."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch
from helpers_runs import stable_pgd_run

from robustdrop.api import resume, track
from robustdrop.attacks import FGSM, PGD
from robustdrop.cli import main
from robustdrop.data import make_synthetic
from robustdrop.diagnostics.reference import build_reference, find_reference
from robustdrop.engine import Hook, make_config
from robustdrop.errors import RobustdropError
from robustdrop.evaluation import evaluate_checkpoint, write_report
from robustdrop.plots.tables import robustbench_json
from robustdrop.store import RunStore
from robustdrop.store.tensorboard import export_tensorboard, tensorboard_tag

EPS = 8 / 255


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data():
    """Learnable synthetic data with a test set large enough for 1-point accuracy comparisons."""
    return make_synthetic(n_train=512, n_test=500, num_classes=10, size=32, channels=3, seed=0)


def _config(**overrides):
    values = dict(model="cnn1", width=4, epochs=3, batch_size=64, val_size=0, probe_size=64, lr=0.003,
                  optimizer="adam", eval_pgd_steps=5, eval_batch_size=500, diagnostics=["none"], method="pgd",
                  pgd_steps=2, epsilon=EPS, test_every=0)
    values.update(overrides)
    return make_config(**values)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data):
    """A small PGD-trained cnn1: robust (not collapsed) on the synthetic data."""
    runs = tmp_path_factory.mktemp("runs")
    store = track(_config(threads=1), runs_dir=runs, name="tiny", data=data, progress=False)
    model = build_reference(find_reference(store.path), num_classes=10, image_shape=(3, 32, 32))
    return store.path, model


def _cheap_autoattack(monkeypatch):
    """The standard cascade with small budgets: the wrapper's plumbing in seconds (the standard values
    themselves are checked in ``test_autoattack_uses_the_standard_values``)."""
    from robustdrop.attacks import autoattack

    monkeypatch.setattr(autoattack, "STANDARD_ITERATIONS", 10)
    monkeypatch.setattr(autoattack, "STANDARD_SQUARE_QUERIES", 50)


# ---------------------------------------------------------------------------------------------
# External cross-check of our attacks
# ---------------------------------------------------------------------------------------------
def _accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def test_our_attacks_agree_with_torchattacks(trained, data):
    ta = pytest.importorskip("torchattacks", reason="the cross-check needs torchattacks (pip install 'robustdrop[eval]')")
    _, model = trained
    x, y = data.test_x.float() / 255, data.test_y
    clean = _accuracy(model, x, y)
    # FGSM: the same step, so the same images (up to float rounding) and the same accuracy.
    ours = x + FGSM(EPS)(model, x, y)
    theirs = ta.FGSM(model, eps=EPS)(x, y)
    assert (ours - theirs).abs().max().item() <= 1e-6
    assert _accuracy(model, ours, y) == _accuracy(model, theirs, y)
    # PGD-20, step 2/255, random start: within 1 point on the same 500 images.
    torch.manual_seed(0)
    pgd_ours = _accuracy(model, x + PGD(EPS, steps=20, step_size=2 / 255)(model, x, y), y)
    torch.manual_seed(1)
    pgd_theirs = _accuracy(model, ta.PGD(model, eps=EPS, alpha=2 / 255, steps=20, random_start=True)(x, y), y)
    assert 0.2 < pgd_ours < clean  # a robust model, not collapsed: the comparison means something
    print(f"clean {clean:.3f} pgd-20 ours {pgd_ours:.3f} torchattacks {pgd_theirs:.3f}")
    assert abs(pgd_ours - pgd_theirs) <= 0.01
    # Without random start both are deterministic: the same attack.
    det_ours = _accuracy(model, x + PGD(EPS, steps=20, step_size=2 / 255, random_start=False)(model, x, y), y)
    det_theirs = _accuracy(model, ta.PGD(model, eps=EPS, alpha=2 / 255, steps=20, random_start=False)(x, y), y)
    print(f"without random start: ours {det_ours:.3f} torchattacks {det_theirs:.3f}")
    assert abs(det_ours - det_theirs) <= 0.002


# ---------------------------------------------------------------------------------------------
# AutoAttack
# ---------------------------------------------------------------------------------------------
def test_autoattack_uses_the_standard_values():
    pytest.importorskip("torchattacks", reason="AutoAttack needs torchattacks (pip install 'robustdrop[eval]')")
    from robustdrop.attacks.autoattack import standard_components

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 100))
    apgd, apgdt, fab, square = standard_components(model, EPS, num_classes=100, seed=0)
    assert (apgd.steps, apgd.n_restarts, apgd.loss, apgd.eps) == (100, 1, "ce", EPS)
    assert (apgdt.steps, apgdt.n_restarts, apgdt.n_target_classes) == (100, 1, 9)
    assert (fab.steps, fab.n_restarts, fab.n_target_classes, fab.multi_targeted) == (100, 1, 9, True)
    assert (square.n_queries, square.n_restarts, square.p_init, square.rescale_schedule) == (5000, 1, 0.8, False)


def test_autoattack_is_at_least_as_strong_as_pgd(trained, data, monkeypatch):
    pytest.importorskip("torchattacks", reason="AutoAttack needs torchattacks (pip install 'robustdrop[eval]')")
    from robustdrop.attacks.autoattack import AutoAttack

    _cheap_autoattack(monkeypatch)
    _, model = trained
    x, y = data.test_x[:24].float() / 255, data.test_y[:24]
    rng = torch.get_rng_state()
    delta = AutoAttack(EPS, num_classes=10)(model, x, y)
    assert torch.equal(rng, torch.get_rng_state())  # torchattacks' seeding does not leak out
    assert delta.abs().max() <= EPS + 1e-7 and (x + delta).min() >= 0 and (x + delta).max() <= 1
    pgd = _accuracy(model, x + PGD(EPS, steps=20, step_size=2 / 255)(model, x, y), y)
    assert 0 < pgd and _accuracy(model, x + delta, y) <= pgd


@pytest.mark.slow
def test_standard_autoattack_runs_its_whole_cascade(trained, data):
    """The full standard cascade (no reduced budget) on 3 images PGD-20 does not break, so all four
    attacks run."""
    pytest.importorskip("torchattacks", reason="AutoAttack needs torchattacks (pip install 'robustdrop[eval]')")
    from robustdrop.attacks.autoattack import AutoAttack

    _, model = trained
    x, y = data.test_x[:64].float() / 255, data.test_y[:64]
    with torch.no_grad():
        robust = model(x + PGD(EPS, steps=20, step_size=2 / 255)(model, x, y)).argmax(1) == y
    x, y = x[robust][:3], y[robust][:3]
    assert len(y) == 3
    delta = AutoAttack(EPS, num_classes=10)(model, x, y)
    assert delta.abs().max() <= EPS + 1e-7 and ((x + delta) >= 0).all() and ((x + delta) <= 1).all()


def test_autoattack_without_torchattacks_says_how_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_torchattacks(name, *args, **kwargs):
        if name == "torchattacks":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torchattacks)
    with pytest.raises(RobustdropError, match=r"pip install 'robustdrop\[eval\]'"):
        make_config(final_eval=["autoattack"])


# ---------------------------------------------------------------------------------------------
# robustdrop evaluate
# ---------------------------------------------------------------------------------------------
def test_evaluate_appends_rows_to_the_run(trained, data, monkeypatch, tmp_path):
    pytest.importorskip("torchattacks", reason="AutoAttack needs torchattacks (pip install 'robustdrop[eval]')")
    _cheap_autoattack(monkeypatch)
    run, _ = trained
    copy = tmp_path / "run"
    import shutil

    shutil.copytree(run, copy)
    before = RunStore.open(copy).num_metric_rows
    report = evaluate_checkpoint(copy, attacks=["pgd", "autoattack"], n=64, pgd_steps=10, data=data, progress=False)
    write_report(report)
    m = RunStore.open(copy).metrics()
    new = m.iloc[before:]
    assert set(new.source) == {"evaluate"} and set(new.split) == {"test"} and (new.n == 64).all()
    assert (new.epoch == 3).all() and (new.step == 3 * 8).all()
    acc = new[new.metric == "acc"].set_index("attack")
    assert list(acc.index) == ["none", "pgd", "autoattack"]
    assert acc.loc["pgd", "steps"] == 10 and acc.loc["pgd", "step_size"] == pytest.approx(2 / 255)
    assert acc.loc["autoattack", "value"] <= acc.loc["pgd", "value"] <= acc.loc["none", "value"]
    assert (new[new.metric == "time_s"].value > 0).all()
    # The subset is the run's probe set (same seed, same size): the clean numbers agree.
    probe_clean = m[(m.source == "eval") & (m.split == "probe") & (m.attack == "none") & (m.metric == "acc")]
    assert acc.loc["none", "value"] == pytest.approx(probe_clean.value.iloc[-1])
    info = robustbench_json(copy)
    assert info["autoattack_acc"] == f"{100 * acc.loc['autoattack', 'value']:.2f}"
    assert "n=64" in info["robustdrop_autoattack_eval"] and "epoch 3" in info["robustdrop_autoattack_eval"]


def test_evaluate_cli_on_a_bare_checkpoint(trained, tmp_path, capsys, monkeypatch, data):
    run, _ = trained
    bare = tmp_path / "model.pt"
    bare.write_bytes((run / "checkpoints" / "last.pt").read_bytes())
    monkeypatch.setattr("robustdrop.evaluation.load_dataset", lambda *a, **k: data)
    assert main(["evaluate", str(bare), "--attack", "fgsm", "--n", "100", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "fgsm (ε=8/255)" in out and "clean" in out
    rows = pd.read_csv(tmp_path / "model.evaluate.csv")
    assert set(rows.attack) == {"none", "fgsm"} and (rows.n == 100).all() and (rows.source == "evaluate").all()
    # Again, into a Parquet file: appended, never overwritten.
    for _ in range(2):
        assert main(["evaluate", str(bare), "--attack", "fgsm", "--n", "50", "--no-progress",
                     "--out", str(tmp_path / "e.parquet")]) == 0
    assert len(pd.read_parquet(tmp_path / "e.parquet")) == 2 * len(rows)


@pytest.mark.parametrize("make", ["missing", "text", "folder"])
def test_evaluate_bad_path_is_one_line(make, tmp_path, capsys):
    path = tmp_path / "x"
    if make == "text":
        path.write_text("not a checkpoint")
    elif make == "folder":
        path.mkdir()
    assert main(["evaluate", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("robustdrop: error:") and len(err.strip().splitlines()) == 1 and "Traceback" not in err


# ---------------------------------------------------------------------------------------------
# the cached final evaluation (the method table's numbers)
# ---------------------------------------------------------------------------------------------
def test_cached_final_evaluation_computes_once_and_serves_metrics_only_copies(trained, data, tmp_path, capsys):
    import dataclasses
    import os
    import shutil

    from robustdrop.evaluation import EVAL_CACHE, CachedEvaluation, evaluate_run_cached, evaluation_is_cached

    run = tmp_path / "run"
    shutil.copytree(trained[0], run)
    shutil.copy(run / "checkpoints" / "last.pt", run / "checkpoints" / "best_model.pt")  # best = last epoch
    how = CachedEvaluation(n=0, seed=0, best="best_model", device="cpu")
    assert not evaluation_is_cached(run, how)
    out = evaluate_run_cached(run, how, data=data)
    final = out["final"]
    assert final["n"] == 500 and final["epoch"] == 3 and final["checkpoint"] == "last.pt"
    assert final["pgd_attack"] == "pgd-5 (ε=8/255, step 2/255, 1 restart(s))"
    assert final["cw_attack"] == "CW-loss pgd-5 (ε=8/255, step 2/255, 1 restart(s))"
    assert final["pgd"] <= final["clean"] and final["cw"] <= final["clean"]
    # the same model and images as `robustdrop evaluate --n 0`: the same clean accuracy
    report = evaluate_checkpoint(run, attacks=[], n=0, device="cpu", data=data, progress=False)
    assert final["clean"] == report.results[0].acc
    assert out["best"] == {**final, "checkpoint": "best_model.pt", "same_as": "final"}  # evaluated once
    assert evaluation_is_cached(run, how)
    capsys.readouterr()
    assert evaluate_run_cached(run, how, data=lambda: pytest.fail("nothing to compute")) == out
    assert capsys.readouterr().out == ""
    # a metrics-only copy (no checkpoints) serves the cached rows; rows never computed are an error
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in (RunStore.CONFIG, EVAL_CACHE):
        shutil.copy(run / name, copy / name)
    assert evaluate_run_cached(copy, how) == out
    with pytest.raises(RobustdropError, match="no checkpoints/result.pt and no cached final evaluation for n=50"):
        evaluate_run_cached(copy, dataclasses.replace(how, n=50))
    # a retrained run (another checkpoint file) is evaluated again
    os.utime(run / "checkpoints" / "last.pt", ns=(10**9, 10**9))
    assert not evaluation_is_cached(run, how)


# ---------------------------------------------------------------------------------------------
# track --final-eval
# ---------------------------------------------------------------------------------------------
def test_final_eval_logs_rows_at_the_end(data, tmp_path):
    store = track(_config(epochs=1, final_eval=["pgd", "fgsm"], final_eval_size=100), runs_dir=tmp_path,
                  name="fe", data=data, progress=False)
    m = store.metrics()
    fe = m[m.source == "final-eval"]
    assert set(fe.attack) == {"none", "pgd", "fgsm"} and (fe.n == 100).all() and (fe.epoch == 1).all()
    with pytest.raises(RobustdropError, match="unknown attack 'deepfool'"):
        _config(final_eval=["deepfool"])


# ---------------------------------------------------------------------------------------------
# TensorBoard
# ---------------------------------------------------------------------------------------------
def _scalars(folder) -> dict[tuple[str, int], float]:
    ea_mod = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator",
                                 reason="TensorBoard output needs tensorboard (pip install 'robustdrop[tensorboard]')")
    ea = ea_mod.EventAccumulator(str(folder), size_guidance={ea_mod.SCALARS: 0})
    ea.Reload()
    out = {}
    for tag in ea.Tags()["scalars"]:
        for event in ea.Scalars(tag):
            assert (tag, event.step) not in out, f"{tag} written twice at step {event.step}"
            out[(tag, event.step)] = event.value
    return out


def _expected(store: RunStore) -> dict[tuple[str, int], float]:
    eps = store.read_json(RunStore.CONFIG)["epsilon"]
    out = {}
    for row in store.metrics().to_dict("records"):
        key = (tensorboard_tag(row, eps), int(row["step"]))
        assert key not in out, f"two rows map to the tag {key}"
        out[key] = row["value"]
    return out


def _same(got, want):
    assert set(want) <= set(got)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-7, nan_ok=True), key


def test_tensorboard_live_and_export_read_back(data, tmp_path):
    pytest.importorskip("tensorboard", reason="TensorBoard output needs tensorboard (pip install 'robustdrop[tensorboard]')")
    store = track(_config(epochs=2, diagnostics=["default"], tensorboard=True, final_eval=["fgsm"],
                          final_eval_size=64), runs_dir=tmp_path, name="tb", data=data, progress=False)
    live = _scalars(store.path / "tensorboard")
    want = _expected(store)
    _same(live, want)
    for tag in ("probe/acc/pgd", "probe/acc/clean", "train/loss/pgd", "train/lr", "final-eval/test/acc/fgsm",
                "strength/probe/grad_alignment/noise-uniform"):
        assert any(k[0] == tag for k in live), tag
    assert live[("epoch", 2 * 8)] == 2
    exported = export_tensorboard(store.path, tmp_path / "tb-export")
    assert exported == tmp_path / "tb-export" / "tb"
    assert _scalars(exported) == live
    with pytest.raises(RobustdropError, match="already holds TensorBoard events"):
        export_tensorboard(store.path, tmp_path / "tb-export")


class _Crash(Hook):
    name = "crash"

    def __init__(self, step):
        super().__init__(every_n_steps=1)
        self.crash_step = step

    def on_train_step(self, run, batch, out):
        if run.step == self.crash_step:
            raise KeyboardInterrupt


def test_tensorboard_after_resume_has_each_point_once(data, tmp_path, capsys):
    pytest.importorskip("tensorboard", reason="TensorBoard output needs tensorboard (pip install 'robustdrop[tensorboard]')")
    cfg = _config(epochs=3, tensorboard=True)
    with pytest.raises(KeyboardInterrupt):
        track(cfg, runs_dir=tmp_path, name="killed", data=data, progress=False, hooks=[_Crash(2 * 8 + 3)])
    # Evaluating the unfinished run: its rows survive the resume in evaluate.csv.
    write_report(evaluate_checkpoint(tmp_path / "killed", attacks=["fgsm"], n=32, data=data, progress=False))
    assert "has not finished" in capsys.readouterr().out
    store = resume(tmp_path / "killed", data=data, progress=False)
    _same(_scalars(store.path / "tensorboard"), _expected(store))
    assert "evaluate" not in set(store.metrics().source)
    kept = pd.read_csv(store.path / "evaluate.csv")
    assert set(kept.attack) == {"none", "fgsm"} and (kept.epoch == 2).all()


def test_export_cli_on_a_synthetic_run(tmp_path, capsys):
    pytest.importorskip("tensorboard", reason="TensorBoard output needs tensorboard (pip install 'robustdrop[tensorboard]')")
    run = stable_pgd_run(tmp_path / "runs")
    assert main(["export", str(run), "--tensorboard", str(tmp_path / "tb")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "tb" / "pgd10")
    got = _scalars(tmp_path / "tb" / "pgd10")
    _same(got, _expected(RunStore.open(run)))
    assert main(["export", str(run)]) == 2
    assert "--tensorboard DIR" in capsys.readouterr().err


def test_tags_spell_out_non_default_specs():
    row = dict(source="evaluate", split="test", metric="acc", attack="pgd", steps=50, restarts=10, epsilon=16 / 255)
    assert tensorboard_tag(row, EPS) == "evaluate/test/acc/pgd-50x10-eps16"
    row = dict(source="eval", split="probe", metric="acc", attack="pgd", steps=20, restarts=1, epsilon=EPS)
    assert tensorboard_tag(row, EPS) == "probe/acc/pgd"
    row = dict(source="apart", split="train", metric="alpha", attack="none", steps=0, restarts=0, epsilon=math.nan)
    assert tensorboard_tag(row, EPS) == "apart/train/alpha"
    assert json.dumps(row)  # plain values: the mapping needs nothing but the row
