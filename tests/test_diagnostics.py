"""Diagnostics: each measure on a case with a known answer, the selection syntax, the reference
model, files that round-trip, "diagnostics do not change training", and the collapse detector on
recorded series and on real small runs (one that collapses, one PGD run that does not)."""

from __future__ import annotations

import io
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from test_engine import CrashAt
from torch import nn

from robustdrop.api import resume, track
from robustdrop.data import ImageData, make_synthetic
from robustdrop.diagnostics import (
    DIAGNOSTICS,
    SIGNALS,
    CollapseDetector,
    CollapseDiagnostic,
    CollapseRule,
    LandscapeDiagnostic,
    SnapshotDiagnostic,
    StrengthDiagnostic,
    build_hooks,
    build_reference,
    compute_landscape,
    create_diagnostic,
    delta_autocorr,
    detect_collapse,
    find_reference,
    pick_snapshot_indices,
    schema,
    select,
)
from robustdrop.engine import Hook, RunContext, Trainer, make_config
from robustdrop.errors import RobustdropError
from robustdrop.methods import create_method
from robustdrop.store import RunStore, metric_row

EPS = 8 / 255


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: small models are fastest so, and a shared CPU does not stall them."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def fake_run(tmp_path, model: nn.Module, images_u8: torch.Tensor, labels: torch.Tensor, **cfg) -> RunContext:
    """A RunContext with just what hooks use, for calling a hook directly on a given model."""
    values = dict(epsilon=EPS, eval_batch_size=32, eval_pgd_steps=5, eval_pgd_step_size=EPS / 4, device="cpu",
                  diagnostics=["none"])
    values.update(cfg)
    config = make_config(**values)
    data = ImageData("fake", images_u8, labels, images_u8, labels, [f"c{i}" for i in range(int(labels.max()) + 1)])
    run = RunContext(config=config, store=RunStore.create(tmp_path, "fake", overwrite=True), model=model.eval(),
                     method=create_method(config), optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                     device=torch.device("cpu"), data=data, train_images=images_u8,
                     probe=(images_u8, labels), epoch=1, step=10)
    return run


def rows(store: RunStore, source: str, metric: str, **where) -> pd.DataFrame:
    m = store.metrics()
    m = m[(m["source"] == source) & (m["metric"] == metric)]
    for k, v in where.items():
        m = m[m[k] == v]
    return m


def value(store: RunStore, source: str, metric: str, **where) -> float:
    r = rows(store, source, metric, **where)
    assert len(r) == 1, r
    return float(r["value"].iloc[0])


class BinaryLinear(nn.Module):
    """Two-class linear model: ∇ₓCE ∝ ±(w1 − w0), the same direction everywhere."""

    def __init__(self, shape=(3, 8, 8)):
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(int(np.prod(shape)), 2)

    def forward(self, x):
        return self.linear(x.flatten(1))


class FarLogit(nn.Module):
    """Logits (f(x), c) with c far above f(x): for label 0, CE = c − f(x) up to e^−30."""

    def __init__(self, f, c: float = 40.0):
        super().__init__()
        self.f, self.c = f, c
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        z0 = self.f(x) + 0 * self.dummy
        return torch.stack([z0, torch.full_like(z0, self.c)], 1)


def mid_gray(n=16, shape=(3, 8, 8), classes=2):
    images = torch.full((n, *shape), 128, dtype=torch.uint8)
    images += torch.randint(0, 20, images.shape, generator=torch.Generator().manual_seed(1)).to(torch.uint8)
    labels = torch.arange(n) % classes
    return images, labels


# ---------------------------------------------------------------------------------------------
# measures with known answers
# ---------------------------------------------------------------------------------------------
def test_delta_autocorr_known_answers():
    g = torch.Generator().manual_seed(0)
    noise = (torch.randint(0, 2, (64, 3, 32, 32), generator=g) * 2 - 1).float() * EPS
    assert abs(delta_autocorr(noise).mean().item()) < 0.02
    assert torch.allclose(delta_autocorr(torch.full((2, 3, 8, 8), -EPS)), torch.ones(2))
    checker = (torch.arange(8).view(8, 1) + torch.arange(8).view(1, 8)) % 2 * 2 - 1
    assert torch.allclose(delta_autocorr(checker.float().expand(2, 3, 8, 8) * EPS), -torch.ones(2))
    blob = torch.full((1, 3, 16, 16), -EPS)
    blob[..., 4:12, 4:12] = EPS  # object-shaped: one square on a background
    assert delta_autocorr(blob).item() > 0.7


def test_strength_on_linear_model_fgsm_equals_pgd_and_grads_untouched(tmp_path):
    model = BinaryLinear()
    images, labels = mid_gray()
    run = fake_run(tmp_path, model, images, labels)
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    hook = StrengthDiagnostic(n=0, pgd_steps=5)
    hook.on_run_start(run)
    hook.on_epoch_end(run, 1)
    store = run.store
    # On a two-class linear model FGSM and PGD reach the same corner and the gradient direction
    # is the same at x and x + η.
    assert value(store, "strength", "cos_fgsm_pgd") == pytest.approx(1.0, abs=1e-6)
    assert value(store, "strength", "sign_agreement_fgsm_pgd") == pytest.approx(1.0)
    assert value(store, "strength", "grad_alignment") == pytest.approx(1.0, abs=1e-5)
    assert value(store, "strength", "delta_frac_at_eps", attack="fgsm") == pytest.approx(1.0)
    assert value(store, "strength", "delta_abs_mean", attack="fgsm") == pytest.approx(EPS, rel=1e-5)
    # FGSM is the worst case of a linear loss: far stronger than random signs.
    fgsm = value(store, "strength", "loss_increase", attack="fgsm")
    noise = value(store, "strength", "loss_increase", attack="noise-sign")
    assert fgsm > 0 and fgsm > 5 * abs(noise)
    assert value(store, "strength", "strength_ratio") == pytest.approx(fgsm / max(noise, 1e-3), rel=1e-5)
    assert rows(store, "strength", "time_s")["value"].iloc[0] > 0
    assert set(rows(store, "strength", "acc")["attack"]) == {"fgsm", "noise-sign"}
    for p in model.parameters():  # parameter gradients untouched
        assert torch.equal(p.grad, torch.full_like(p, 7.0))


def test_training_perturbation_statistics_are_epoch_means(tmp_path):
    from robustdrop.methods import StepOutput

    images, labels = mid_gray()
    run = fake_run(tmp_path, BinaryLinear(), images, labels)
    hook = StrengthDiagnostic(n=4, train_every=1, train_n=0)
    hook.on_run_start(run)
    constant = torch.full((4, 3, 8, 8), EPS)
    half = torch.full((4, 3, 8, 8), EPS / 2)
    for delta in (constant, half):
        hook.on_train_step(run, None, StepOutput(torch.zeros(()), torch.zeros(4, 2), delta))
    hook.on_epoch_end(run, 1)
    where = dict(split="train", attack="train-perturbation")
    assert value(run.store, "strength", "delta_abs_mean", **where) == pytest.approx(0.75 * EPS)
    assert value(run.store, "strength", "delta_frac_at_eps", **where) == pytest.approx(0.5)
    assert value(run.store, "strength", "delta_autocorr", **where) == pytest.approx(1.0)
    assert int(rows(run.store, "strength", "delta_abs_mean", **where)["n"].iloc[0]) == 8


def test_landscape_linear_loss_has_no_linearity_error_or_curvature():
    torch.manual_seed(0)
    a = torch.randn(48) * 0.1
    model = FarLogit(lambda x: x.flatten(1) @ a).eval()
    x = torch.rand(6, 3, 4, 4)
    y = torch.zeros(6, dtype=torch.long)
    noise = torch.randint(0, 2, x.shape, generator=torch.Generator().manual_seed(0)).float() * 2 - 1
    out = compute_landscape(model, x, y, EPS, noise_direction=noise, points=21, grid=11)
    assert out["linearity_error"] < 1e-4
    assert abs(out["curvature"]) < 1e-4
    assert np.abs(np.diff(out["loss_fgsm"].astype(np.float64), 2)).max() < 1e-4  # linear in t
    assert out["loss_fgsm"][-1] > out["loss_fgsm"][0]  # ascends along the FGSM direction
    # the 2-D grid's axes are the two 1-D profiles (grid point i = profile point 2i)
    assert np.allclose(out["loss_2d"][:, 5], out["loss_fgsm"][::2], atol=1e-5)
    assert np.allclose(out["loss_2d"][5, :], out["loss_noise"][::2], atol=1e-5)
    assert out["loss_2d"].shape == (11, 11) and out["t"].shape == (21,)


def test_landscape_quadratic_loss_curvature_is_analytic():
    torch.manual_seed(0)
    x0 = torch.rand(1, 3, 4, 4)
    s = 1.0
    model = FarLogit(lambda x: -s * (x - x0).square().flatten(1).sum(1)).eval()
    x = (x0 + 0.2 * (torch.rand(5, 3, 4, 4) - 0.5)).clamp(0, 1)
    y = torch.zeros(5, dtype=torch.long)
    out = compute_landscape(model, x, y, EPS, noise_direction=torch.ones_like(x), points=5, grid=3)
    dim = 48  # L(x + t d) = c + s‖x − x0 + t d‖², d = ±1 per coordinate
    assert out["curvature"] == pytest.approx(2 * s * EPS**2 * dim, rel=1e-3)
    assert out["linearity_error"] == pytest.approx(s * EPS**2 * dim, rel=1e-3)


def test_snapshots_and_landscape_files_round_trip(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 10))
    images = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8)
    labels = torch.arange(40) % 10
    run = fake_run(tmp_path, model, images, labels)
    snap = SnapshotDiagnostic(k=8)
    snap.on_run_start(run)
    assert snap.index == pick_snapshot_indices(labels, 8) == list(range(8))
    snap.on_epoch_end(run, 3)
    arrays = run.store.load_arrays("snapshots", "epoch_0003")
    assert set(arrays) == {"images", "labels", "delta", "epsilon", "classes"}
    assert arrays["images"].dtype == np.uint8 and arrays["images"].shape == (8, 3, 8, 8)
    assert arrays["delta"].dtype == np.float16 and arrays["delta"].shape == (8, 3, 8, 8)
    assert np.array_equal(arrays["images"], images[:8].numpy())
    assert sorted(arrays["labels"].tolist()) == list(range(8))  # eight different classes
    assert float(arrays["epsilon"]) == pytest.approx(EPS)
    assert list(arrays["classes"]) == [f"c{i}" for i in range(10)]
    assert np.abs(arrays["delta"].astype(np.float32)).max() <= EPS + 1e-3
    assert len(rows(run.store, "snapshots", "delta_autocorr")) == 1

    land = LandscapeDiagnostic(every=1, n=16, points=7, grid=5)
    land.on_epoch_end(run, 3)
    arrays = run.store.load_arrays("landscape", "epoch_0003")
    assert set(arrays) == {"t", "loss_fgsm", "loss_noise", "grid_u", "grid_v", "loss_2d", "epsilon"}
    assert arrays["loss_2d"].shape == (5, 5) and arrays["loss_fgsm"].shape == (7,)
    assert arrays["t"][0] == pytest.approx(-2 * EPS) and arrays["t"][-1] == pytest.approx(2 * EPS)
    assert len(rows(run.store, "landscape", "linearity_error")) == 1
    assert len(rows(run.store, "landscape", "curvature")) == 1


def test_pick_snapshot_indices_fills_up_when_few_classes():
    labels = torch.tensor([1, 1, 0, 2, 0, 2, 1])
    assert pick_snapshot_indices(labels, 2) == [2, 0]
    assert pick_snapshot_indices(labels, 5) == [2, 0, 3, 1, 4]


def test_landscape_runs_around_a_collapse_onset(tmp_path):
    images, labels = mid_gray()
    run = fake_run(tmp_path, BinaryLinear(), images, labels, epochs=20)
    land = LandscapeDiagnostic(every=5, n=4, points=3, grid=3)
    assert all(land.wants_epoch(e) for e in range(1, 8))  # decides itself in on_epoch_end
    for epoch in range(1, 11):
        run.epoch = epoch
        run.metrics = {"collapse/onset": 7.0} if epoch == 7 else {}  # the detector fired at epoch 7
        land.on_epoch_end(run, epoch)
    assert run.store.list_arrays("landscape") == ["epoch_0005", "epoch_0007", "epoch_0008", "epoch_0010"]


# ---------------------------------------------------------------------------------------------
# selection
# ---------------------------------------------------------------------------------------------
def test_selection_words():
    assert list(select(["default"])) == ["strength", "snapshots", "collapse"]
    assert list(select(["all"])) == ["strength", "snapshots", "collapse", "landscape"]
    assert list(select(["all", "wong"])) == ["strength", "snapshots", "wong", "collapse", "landscape"]
    assert list(select(["all"], reference="runs/ref")) == [n for n in DIAGNOSTICS if n != "wong"]
    assert list(select(["default"], reference="runs/ref"))[0] == "strength-ref"
    assert select(["none"]) == {}
    assert select(["landscape:every=2,points=11", "collapse"]) == {"collapse": {},
                                                                  "landscape": {"every": 2, "points": 11}}
    assert select(["default", "strength:n=100"])["strength"] == {"n": 100}
    assert select(["landscape:around_collapse=no"])["landscape"] == {"around_collapse": False}


@pytest.mark.parametrize("words, match", [
    (["strenght"], "unknown diagnostic 'strenght'.*strength-ref.*landscape"),
    (["landscape:evry=2"], "bad option 'evry=2' for diagnostic landscape.*every"),
    (["landscape:every"], "bad option"),
    (["landscape:every=two"], "needs a whole number"),
    (["landscape:every=0"], "at least 1"),
    (["none", "strength"], "cannot be combined"),
    (["strength-ref"], "needs a reference model"),
])
def test_selection_errors(words, match):
    with pytest.raises(RobustdropError, match=match):
        build_hooks(make_config(diagnostics=words))


def test_options_are_declared_once_on_each_class():
    assert list(DIAGNOSTICS) == ["strength-ref", "strength", "snapshots", "wong", "collapse", "landscape"]
    for name, cls in DIAGNOSTICS.items():
        opts = schema(name)
        assert opts and all(f.metadata["help"] for f in opts.values()), name
        if not cls.needs_reference:
            assert cls().options == cls.Options(), name  # the constructor's defaults are the schema's
        # a non-default value given as text reaches the built hook
        key, f = next((k, f) for k, f in opts.items() if not isinstance(f.default, bool))
        text = str(f.default * 3 + 1)
        chosen = select([f"{name}:{key}={text}"], reference="runs/ref" if cls.needs_reference else None)
        assert chosen[name] == {key: type(f.default)(text)}
        if not cls.needs_reference:
            assert getattr(create_diagnostic(name, None, **chosen[name]).options, key) == type(f.default)(text)
    assert CollapseDiagnostic(drop=0.7).detector.rule == CollapseRule(drop=0.7)  # the rule is collapse's options
    with pytest.raises(RobustdropError) as err:
        select(["nope"])
    for name in DIAGNOSTICS:  # the usage lists every name and option
        assert f"{name}[:{','.join(k + '=' for k in schema(name))}]" in str(err.value)


def test_docs_table_shows_the_declared_defaults():
    docs = (Path(__file__).parent.parent / "docs" / "diagnostics.md").read_text()
    for name in DIAGNOSTICS:
        row = next(line for line in docs.splitlines() if line.startswith(f"| `{name}` |"))
        listed = dict(re.findall(r"`(\w+)` \(([^;),]+)", row.split("|")[4]))
        for key, f in schema(name).items():
            if key == "every":  # the cadence column
                continue
            text = listed[key].split()[0]
            if isinstance(f.default, str):
                assert text == f.default, (name, key)
                continue
            assert (text == "yes") == f.default if isinstance(f.default, bool) else float(text) == f.default, (name, key)


def test_build_hooks_order_and_cadence():
    hooks = build_hooks(make_config(diagnostics=["all", "wong", "landscape:every=3", "strength:train_every=4"]))
    assert [h.name for h in hooks] == ["strength", "snapshots", "wong", "collapse", "landscape"]
    assert hooks[0].every_n_steps == 4 and hooks[0].every_n_epochs == 1
    assert hooks[4].every_n_epochs == 3
    assert build_hooks(make_config(diagnostics=["none"])) == []


# ---------------------------------------------------------------------------------------------
# reference model
# ---------------------------------------------------------------------------------------------
def small_config(**over):
    values = dict(model="cnn1", width=2, epochs=2, batch_size=64, optimizer="adam", lr=0.003, epsilon=EPS,
                  probe_size=64, val_size=0, test_every=0, eval_pgd_steps=3, eval_pgd_step_size=EPS / 2,
                  eval_batch_size=64, device="cpu", seed=0, threads=1,
                  diagnostics=["default" if "reference" in over else "none"])
    values.update(over)
    return make_config(**values)


@pytest.fixture(scope="module")
def small_data():
    return make_synthetic(n_train=256, n_test=128, num_classes=10, size=16, channels=3, seed=0)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, small_data):
    runs = tmp_path_factory.mktemp("ref")
    track(small_config(method="pgd", pgd_steps=2, epochs=1), runs_dir=runs, name="ref", progress=False,
          data=small_data)
    return runs / "ref"


def test_reference_strength_metrics(tmp_path, small_data, reference_run):
    store = track(small_config(epochs=2, diagnostics=["strength-ref"], reference=str(reference_run)),
                  runs_dir=tmp_path, name="r", progress=False, data=small_data)
    r = rows(store, "strength-ref", "ref_acc", split="probe")
    assert set(r[r["epoch"] == 1]["attack"]) == {"none", "fgsm", "noise-sign", "noise-uniform"}
    assert set(r[r["epoch"] == 2]["attack"]) == {"none", "fgsm", "pgd", "noise-sign", "noise-uniform"}  # last epoch
    assert r["value"].between(0, 1).all() and (r["n"] == 64).all()
    pgd = r[r["attack"] == "pgd"].iloc[0]
    assert (pgd["steps"], pgd["step_size"]) == (3, pytest.approx(EPS / 2))  # the run's eval PGD
    event = store.events("reference")[0]
    assert event["method"] == "pgd" and event["checkpoint"].endswith("last.pt")
    assert len(rows(store, "strength-ref", "time_s")) == 2


def test_reference_from_checkpoint_file_and_result_preferred(tmp_path, reference_run):
    src = find_reference(reference_run / "checkpoints" / "last.pt")
    assert src.config["method"] == "pgd"
    model = build_reference(src, num_classes=10, image_shape=(3, 16, 16))
    assert not any(p.requires_grad for p in model.parameters()) and not model.training


def test_reference_errors(tmp_path, small_data, reference_run):
    with pytest.raises(RobustdropError, match="does not exist"):
        build_hooks(small_config(reference=str(tmp_path / "missing")))
    with pytest.raises(RobustdropError, match="not a robustdrop run directory"):
        build_hooks(small_config(reference=str(tmp_path)))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(RobustdropError, match="no checkpoints/result.pt"):
        find_reference(tmp_path / "empty")
    src = find_reference(reference_run)
    with pytest.raises(RobustdropError, match="does not fit this run.*5 classes"):
        build_reference(src, num_classes=5, image_shape=(3, 16, 16))
    with pytest.raises(RobustdropError, match="does not fit this run"):
        build_reference(src, num_classes=10, image_shape=(1, 16, 16))
    five = make_synthetic(n_train=128, n_test=64, num_classes=5, size=16, seed=0)
    with pytest.raises(RobustdropError, match="does not fit"):
        track(small_config(epochs=1, diagnostics=["default"], reference=str(reference_run)), runs_dir=tmp_path, name="five",
              progress=False, data=five)
    with pytest.raises(RobustdropError, match="drop one of them"):
        build_hooks(small_config(diagnostics=["none"], reference=str(reference_run)))


# ---------------------------------------------------------------------------------------------
# diagnostics do not change training
# ---------------------------------------------------------------------------------------------
def test_diagnostics_on_and_off_train_identically(tmp_path, small_data, reference_run):
    words = ["all", "wong:n=32", "landscape:every=1,n=32,points=5,grid=3", "strength:train_every=1,n=64"]
    model = dict(model="smallcnn", width=4)  # batch norm: eval mode in hooks must hold
    off = track(small_config(**model), runs_dir=tmp_path, name="off", progress=False, data=small_data)
    on = track(small_config(**model, diagnostics=words, reference=str(reference_run)), runs_dir=tmp_path,
               name="on", progress=False, data=small_data)

    def core(store):
        m = store.metrics()
        m = m[m["source"].isin(["train", "eval"]) & ~m["metric"].str.startswith("time_")]
        return m.drop(columns=["source"]).reset_index(drop=True)

    assert len(core(off)) > 10
    pd.testing.assert_frame_equal(core(off), core(on))
    on_sources = set(on.metrics()["source"])
    assert {"strength", "strength-ref", "snapshots", "wong", "collapse", "landscape"} <= on_sources
    a = torch.load(off.checkpoint_path("last"), weights_only=True)["model"]
    b = torch.load(on.checkpoint_path("last"), weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------
# the channel: run.metrics
# ---------------------------------------------------------------------------------------------
class Recorder(Hook):
    """Copies the channel at every epoch end (it runs last, so it sees every hook's values)."""

    name = "recorder"

    def __init__(self):
        super().__init__(every_n_epochs=1)
        self.seen: dict[int, dict[str, float]] = {}

    def on_epoch_end(self, run, epoch):
        self.seen[epoch] = dict(run.metrics)


def test_channel_holds_the_epochs_values_as_logged(tmp_path, small_data):
    recorder = Recorder()
    store = track(small_config(epochs=3, eval_every=2, val_size=64, diagnostics=["default", "strength:n=32"]),
                  runs_dir=tmp_path, name="c", progress=False, data=small_data, hooks=[recorder])
    seen = recorder.seen
    # epoch 1 is not evaluated: no evaluation values, and nothing left over from another epoch
    assert not any(k.startswith(("probe/", "val/", "collapse/")) for k in seen[1])
    assert {"probe/acc/pgd", "probe/loss/fgsm", "probe/acc/none", "val/acc/pgd", "val/acc/none"} <= set(seen[2])
    assert "val/acc/fgsm" not in seen[2] and "test/acc/pgd" in seen[3] and "test/acc/pgd" not in seen[2]
    for epoch in (2, 3):
        assert seen[epoch]["probe/acc/pgd"] == value(store, "eval", "acc", split="probe", attack="pgd", epoch=epoch)
        assert seen[epoch]["collapse/collapse_score"] == value(store, "collapse", "collapse_score", epoch=epoch)
    for epoch in (1, 2, 3):
        assert seen[epoch]["train/loss"] == value(store, "train", "loss", split="train", epoch=epoch)
        assert seen[epoch]["strength/strength_ratio"] == value(store, "strength", "strength_ratio", epoch=epoch)
        assert seen[epoch]["strength/grad_alignment"] == value(store, "strength", "grad_alignment", epoch=epoch)


def test_collapse_detector_reads_the_channel_only(tmp_path):
    images, labels = mid_gray()
    run = fake_run(tmp_path, BinaryLinear(), images, labels, epochs=20)
    hook = CollapseDiagnostic()
    onsets = {}
    for e in range(1, len(COLLAPSING["pgd"]) + 1):
        run.epoch = e
        run.metrics = {"probe/acc/pgd": COLLAPSING["pgd"][e - 1], "probe/acc/fgsm": COLLAPSING["fgsm"][e - 1],
                       "strength/strength_ratio": COLLAPSING["ratio"][e - 1]}
        hook.on_epoch_end(run, e)
        onsets[e] = run.metrics.get("collapse/onset")
    assert {e: o for e, o in onsets.items() if o is not None} == {8: 8.0}
    (event,) = run.store.events("collapse_onset")
    assert event["epoch"] == 8 and event["signals"]["weak_fgsm"] and "misaligned" not in event["signals"]
    assert list(event["signals"])[:3] == ["pgd_acc", "fgsm_acc", "strength_ratio"]
    run.metrics = {"strength/strength_ratio": 0.1}  # no probe evaluation: no verdict
    hook.on_epoch_end(run, 12)
    assert len(rows(run.store, "collapse", "collapse_score")) == len(COLLAPSING["pgd"])


# ---------------------------------------------------------------------------------------------
# per-instance hook state
# ---------------------------------------------------------------------------------------------
class Feed(Hook):
    """Replaces the epoch's probe accuracies in the channel by a fixed series (before the detectors)."""

    name = "feed"
    PGD, FGSM = [.30, .32, .05, .04], [.35, .37, .50, .60]

    def __init__(self):
        super().__init__(every_n_epochs=1)

    def on_epoch_end(self, run, epoch):
        run.metrics.update({"probe/acc/pgd": self.PGD[epoch - 1], "probe/acc/fgsm": self.FGSM[epoch - 1]})


def test_state_key_is_the_name_plus_non_default_options():
    assert CollapseDiagnostic().state_key == "collapse"
    assert CollapseDiagnostic(patience=2, drop=0.6).state_key == "collapse[drop=0.6,patience=2]"
    assert StrengthDiagnostic(n=100).state_key == "strength[n=100]" and Feed().state_key == "feed"
    with pytest.raises(RobustdropError, match="state key 'collapse'"):
        Trainer(small_config(epochs=1), None, [CollapseDiagnostic(), Feed(), CollapseDiagnostic()])


def test_two_instances_of_a_diagnostic_keep_separate_states_across_resume(tmp_path, small_data):
    # With the fed series the default detector fires at epoch 3, the patient one (patience=2) at 4.
    cfg = small_config(epochs=4)
    steps = 256 // 64

    def hooks():
        return [Feed(), CollapseDiagnostic(), CollapseDiagnostic(patience=2)]

    def onsets(store):
        return [(e["epoch"], e["detected_epoch"]) for e in store.events("collapse_onset")]

    straight = track(cfg, runs_dir=tmp_path, name="straight", progress=False, data=small_data, hooks=hooks())
    assert onsets(straight) == [(3, 3), (3, 4)]
    with pytest.raises(KeyboardInterrupt):
        track(cfg, runs_dir=tmp_path, name="killed", progress=False, data=small_data,
              hooks=[*hooks(), CrashAt(3 * steps + 1)])
    store = RunStore.open(tmp_path / "killed")
    saved = store.load_checkpoint("last")
    assert saved["hooks"]["collapse"]["onset"] == 3 and saved["hooks"]["collapse[patience=2]"]["onset"] is None
    resumed = resume(tmp_path / "killed", progress=False, data=small_data, hooks=hooks())
    assert onsets(resumed) == onsets(straight)  # the default detector did not fire a second time

    # the epoch-3 checkpoint as written before state keys (hook states by name) still resumes
    saved["hooks"] = {"collapse": saved["hooks"]["collapse"]}
    del saved["hooks_by"]
    store.save_checkpoint("last", saved)
    again = resume(store.path, progress=False, data=small_data, hooks=hooks())
    assert onsets(again)[0] == (3, 3) and again.metrics()["epoch"].max() == 4


# ---------------------------------------------------------------------------------------------
# the collapse detector on recorded series
# ---------------------------------------------------------------------------------------------
def series(pgd, fgsm, ratio=None, align=None) -> pd.DataFrame:
    out = []
    for e, (p, f) in enumerate(zip(pgd, fgsm), start=1):
        out.append(metric_row(e, 10 * e, "probe", "acc", p, attack="pgd", source="eval"))
        out.append(metric_row(e, 10 * e, "probe", "acc", f, attack="fgsm", source="eval"))
        out.append(metric_row(e, 10 * e, "probe", "acc", 0.7, attack="none", source="eval"))
        if ratio is not None:
            out.append(metric_row(e, 10 * e, "probe", "strength_ratio", ratio[e - 1], attack="fgsm", source="strength"))
        if align is not None:
            out.append(metric_row(e, 10 * e, "probe", "grad_alignment", align[e - 1], attack="noise-uniform",
                                  source="strength"))
    return pd.DataFrame(out)


COLLAPSING = dict(pgd=[.05, .12, .20, .26, .30, .33, .31, .02, .00, .00, .00],
                  fgsm=[.07, .15, .24, .30, .35, .38, .36, .45, .62, .70, .74],
                  ratio=[30, 25, 20, 18, 16, 15, 12, 0.9, 0.3, -2, -5],
                  align=[.95, .93, .9, .88, .85, .82, .8, .2, .12, .1, .1])
STABLE = dict(pgd=[.05, .12, .20, .26, .24, .30, .28, .31, .29, .33, .32],
              fgsm=[.07, .15, .24, .30, .28, .35, .33, .36, .34, .38, .37],
              ratio=[30, 25, 20, 18, 19, 16, 17, 15, 16, 14, 15],
              align=[.95, .94, .93, .93, .92, .92, .91, .91, .9, .9, .9])


def onset(verdicts):
    return next((v.onset for v in verdicts if v.fired), None)


def test_detector_fires_once_at_the_onset_of_a_recorded_collapse():
    verdicts = detect_collapse(series(**COLLAPSING))
    assert onset(verdicts) == 8
    assert sum(v.fired for v in verdicts) == 1
    fired = next(v for v in verdicts if v.fired)
    assert fired.flags == {"pgd_drop": True, "gap_widening": True, "weak_fgsm": True, "misaligned": True,
                           "align_fall": True}  # the early rule's trend signal (it warned at the same epoch)
    assert fired.values["best_pgd_acc"] == pytest.approx(0.33) and fired.values["best_epoch"] == 6
    assert [v.score for v in verdicts][:7] == [0.0] * 7 and verdicts[7].score == 1.0
    # accuracies alone (no strength diagnostic) suffice: the PGD drop plus the FGSM−PGD gap
    assert onset(detect_collapse(series(COLLAPSING["pgd"], COLLAPSING["fgsm"]))) == 8


def test_detector_silent_on_a_recorded_stable_run_and_on_a_drop_without_a_second_signal():
    assert onset(detect_collapse(series(**STABLE))) is None
    assert max(v.score for v in detect_collapse(series(**STABLE))) == 0.0
    # PGD and FGSM accuracy fall together (e.g. an LR spike), FGSM still strong: not a collapse
    pgd = [.05, .12, .20, .26, .30, .10, .12, .2, .25]
    verdicts = detect_collapse(series(pgd, [p + .03 for p in pgd], ratio=[20] * 9, align=[.9] * 9))
    assert onset(verdicts) is None
    assert verdicts[5].flags["pgd_drop"] and verdicts[5].score == pytest.approx(0.25)
    # a drop from a best below the floor does not count
    low = [.02, .05, .08, .01, .0]
    assert onset(detect_collapse(series(low, [.1, .2, .3, .4, .5]))) is None


def test_detector_patience_reference_signal_and_state_round_trip():
    rule = CollapseRule(patience=2)
    assert onset(detect_collapse(series(**COLLAPSING), rule)) == 8
    verdicts = detect_collapse(series(**COLLAPSING), rule)
    assert next(v.epoch for v in verdicts if v.fired) == 9  # confirmed one epoch later

    det = CollapseDetector()
    for e, p in enumerate([.1, .3, .32], start=1):
        det.update(e, {"pgd_acc": p, "fgsm_acc": p + .02})
    resumed = CollapseDetector()
    buf = io.BytesIO()
    torch.save({"hooks": {"collapse": det.state_dict()}}, buf)  # as the trainer checkpoints it
    buf.seek(0)
    resumed.load_state_dict(torch.load(buf, weights_only=True)["hooks"]["collapse"])
    signals = {"pgd_acc": .05, "fgsm_acc": .1, "ref_acc_fgsm": .78, "ref_acc_noise": .79}
    a, b = det.update(4, dict(signals)), resumed.update(4, dict(signals))
    assert a.fired and b.fired and a.onset == b.onset == 4 and a.flags == b.flags
    assert a.flags["ref_weak"] and not a.flags["gap_widening"]
    assert not det.update(5, dict(signals)).fired  # fires once


def test_signals_are_defined_once_and_documented():
    names = [s.name for s in SIGNALS]
    assert names == ["pgd_drop", "gap_widening", "weak_fgsm", "ref_weak", "misaligned",  # the events' order
                     "align_fall", "cos_fall", "ref_fall", "wong_fall"]
    fired = next(v for v in detect_collapse(series(**COLLAPSING)) if v.fired)
    # no reference and no cos_fgsm_pgd in the series
    assert list(fired.flags) == [n for n in names if n not in ("ref_weak", "cos_fall", "ref_fall", "wong_fall")]
    docs = (Path(__file__).parent.parent / "docs" / "diagnostics.md").read_text()
    listed = re.findall(r"^- `([a-z_]+)`:", docs, flags=re.M)
    assert listed == names


# ---------------------------------------------------------------------------------------------
# the detector on real small runs: FGSM collapses, PGD does not
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cifar16(cifar10_jpeg):
    """24500 seeded CIFAR-10 training images and 1000 test images, area-downsampled to 16x16."""
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(cifar10_jpeg.train_y), generator=g)[:24500]
    test = torch.randperm(len(cifar10_jpeg.test_y), generator=g)[:1000]  # the files are sorted by class

    def small(x):
        return F.interpolate(x.float(), size=(16, 16), mode="area").round().to(torch.uint8)

    d = cifar10_jpeg
    return ImageData("cifar10-16px", small(d.train_x[idx]), d.train_y[idx], small(d.test_x[test]), d.test_y[test],
                     d.classes)


def collapse_config(**over):
    # The quick preset's model and optimizer at ε = 16/255 on 16x16 images: FGSM training collapses
    # around epoch 4 (probe PGD acc ≈ 0.12 → 0.03 while FGSM acc rises), PGD training does not.
    values = dict(model="cnn1", width=4, optimizer="adam", lr=0.003, weight_decay=5e-4, schedule="cyclic",
                  lr_peak_at=0.4, epsilon=16 / 255, epochs=6, batch_size=64, probe_size=500, val_size=0,
                  test_every=0, eval_pgd_steps=10, eval_pgd_step_size=4 / 255, eval_batch_size=500, device="cpu",
                  seed=0, threads=1, diagnostics=["default", "landscape:every=100,n=64,points=5,grid=3"])
    values.update(over)
    return make_config(**values)


def test_detector_fires_on_a_collapsing_fgsm_run_and_rolls_back(tmp_path, cifar16):
    store = track(collapse_config(on_collapse="rollback"), runs_dir=tmp_path, name="fgsm", progress=False,
                  data=cifar16)
    events = store.events("collapse_onset")
    assert len(events) == 1, store.metrics().query("source == 'eval' and split == 'probe'")
    onset_epoch = events[0]["epoch"]
    assert events[0]["action"] == "rollback" and events[0]["signals"]["pgd_drop"]
    assert 2 <= onset_epoch <= 6
    score = rows(store, "collapse", "collapse_score").set_index("epoch")["value"]
    assert score[onset_epoch] > 0.5 and (score[score.index < onset_epoch] < 0.5).all()
    # stopped at the onset, result = the checkpoint before it, landscape taken at the onset
    assert store.metrics()["epoch"].max() == onset_epoch
    assert store.events("rollback")[0]["to_epoch"] == onset_epoch - 1
    assert store.load_checkpoint("result")["epoch"] == onset_epoch - 1
    assert store.list_arrays("landscape") == [f"epoch_{onset_epoch:04d}"]
    # the strength measures see it: FGSM no stronger than noise, misaligned gradients
    ratio = rows(store, "strength", "strength_ratio").set_index("epoch")["value"]
    align = rows(store, "strength", "grad_alignment").set_index("epoch")["value"]
    assert ratio[onset_epoch] < 1.5 < ratio[1]
    assert align[onset_epoch] < 0.5 < align[1]


def test_detector_silent_on_pgd_training_of_the_same_length(tmp_path, cifar16):
    store = track(collapse_config(method="pgd", pgd_steps=2, alpha=8 / 255, on_collapse="stop"), runs_dir=tmp_path,
                  name="pgd", progress=False, data=cifar16)
    assert store.events("collapse_onset") == [] and store.events("stop") == []
    assert store.metrics()["epoch"].max() == 6
    score = rows(store, "collapse", "collapse_score")["value"]
    assert len(score) == 6 and score.max() < 0.5
    assert math.isfinite(rows(store, "strength", "strength_ratio")["value"].min())
