"""APART / FGSM+ (robustdrop/methods/apart.py): the step, the hooks, Ω, ψ ascent, state, resume."""

from __future__ import annotations

import io
import math

import pandas as pd
import pytest
import torch
from torch import nn

from robustdrop import make_config
from robustdrop.api import resume, track
from robustdrop.attacks import FGSM
from robustdrop.data import Batch, apply_crop_flip, make_synthetic, pad_images, sample_crop_flip
from robustdrop.engine import Hook
from robustdrop.errors import RobustdropError
from robustdrop.methods import MethodContext, create_method
from robustdrop.methods.apart import (
    OMEGA_PAD,
    Apart,
    find_perturbation_points,
    omega_from_compact,
    omega_to_compact,
)
from robustdrop.models import create_model

CPU = torch.device("cpu")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: one thread is much faster than an oversubscribed pool on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data():
    return make_synthetic(n_train=96, n_test=64, num_classes=10, size=32, channels=3, seed=1)


def _config(**kw):
    base = dict(model="cnn1", width=4, method="apart", device="cpu", diagnostics=["none"])
    base.update(kw)
    return make_config(**base)


def _model(cfg, seed=0):
    torch.manual_seed(seed)
    return create_model(cfg.model, width=cfg.width)


def _setup(cfg, model, data, total_steps=100, seed=0):
    method = create_method(cfg)
    torch.manual_seed(seed)
    method.setup(model, MethodContext(len(data.train_y), (3, 32, 32), total_steps, 10, CPU))
    return method


def _batch(data, n=16, crop=True, seed=0, pad=OMEGA_PAD):
    g = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(data.train_y), generator=g)[:n]
    images = data.train_x[index]
    params = None
    if crop:
        params = sample_crop_flip(n, pad, g)
        images = apply_crop_flip(pad_images(images, pad, 0.0), params)
    return Batch(images.float() / 255, data.train_y[index], index, params)


# ---------------------------------------------------------------------------------------------
# perturbation points and their hooks
# ---------------------------------------------------------------------------------------------


def test_points_are_found_generically():
    prn = create_model("preactresnet18", width=0.0625)
    points = find_perturbation_points(prn)
    assert [p.name for p in points] == [f"layer{i}.{j}.conv1" for i in range(1, 5) for j in range(2)]
    assert all(p.where == "input" and p.module is prn.get_submodule(p.name) for p in points)
    cnn = create_model("cnn1", width=2)
    assert [(p.name, p.where) for p in find_perturbation_points(cnn)] == [("act", "output")]
    small = create_model("smallcnn", width=4)
    assert len(find_perturbation_points(small)) == 4
    no_points = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    assert find_perturbation_points(no_points) == []
    cfg = _config()
    with pytest.raises(RobustdropError, match="no-layerwise"):
        create_method(cfg).setup(no_points, MethodContext(8, (3, 32, 32), 10, 10, CPU))


def _no_apart_hooks(model):
    return all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_layerwise_perturbation_only_in_second_pass(data):
    """PreActBlock: conv1's input equals relu(bn1(h)) except in APART's pass 2, where it is shifted
    by α_b·sign(g_b); never in model(x) outside the step, nor in eval mode."""
    cfg = _config(model="preactresnet18", width=0.0625)
    model = _model(cfg)
    method = _setup(cfg, model, data)
    with torch.no_grad():
        method.psi["alpha_b"].copy_(torch.arange(1, 9) * 0.1)
    blocks = [model.get_submodule(p.name.rsplit(".", 1)[0]) for p in method.points]
    calls: list[list[float]] = []
    activated: dict[int, torch.Tensor] = {}

    def on_bn1(i):
        def hook(module, args, output):
            activated[i] = torch.relu(output).detach()
        return hook

    def on_conv1(i):
        def hook(module, args, output):
            if i == 0:
                calls.append([])
            calls[-1].append((args[0].detach() - activated[i]).abs().max().item())
        return hook

    spies = [h for i, b in enumerate(blocks) for h in (b.bn1.register_forward_hook(on_bn1(i)),
                                                       b.conv1.register_forward_hook(on_conv1(i)))]
    batch = _batch(data)
    model.train()
    method.train_step(model, batch, torch.optim.SGD(model.parameters(), lr=0.01))
    assert len(calls) == 2  # pass 1, pass 2
    assert calls[0] == [0.0] * 8
    assert calls[1] == pytest.approx([0.1 * (i + 1) for i in range(8)], rel=1e-5)
    model(batch.x)
    model.eval()
    with torch.no_grad():
        model(batch.x)
    assert calls[2] == [0.0] * 8 and calls[3] == [0.0] * 8
    for h in spies:
        h.remove()
    assert _no_apart_hooks(model)


def test_hidden_activation_point_of_cnn1(data):
    cfg = _config()
    model = _model(cfg)
    method = _setup(cfg, model, data)
    with torch.no_grad():
        method.psi["alpha_b"].fill_(0.25)
    seen: list[torch.Tensor] = []
    act_out: list[torch.Tensor] = []
    h1 = model.act.register_forward_hook(lambda m, a, o: act_out.append(o.detach()))
    h2 = model.linear.register_forward_hook(lambda m, a, o: seen.append(a[0].detach()))
    method.train_step(model, _batch(data), torch.optim.SGD(model.parameters(), lr=0.0))
    model(_batch(data).x)
    h1.remove()
    h2.remove()
    diffs = [(s - a.flatten(1)).abs().max().item() for s, a in zip(seen, act_out)]
    assert diffs[0] == 0.0 and diffs[1] == pytest.approx(0.25) and diffs[2] == 0.0
    assert _no_apart_hooks(model)


# ---------------------------------------------------------------------------------------------
# Ω: crop/flip frame and compact storage
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("crop", [True, False])
def test_omega_crop_flip_round_trip(data, crop):
    cfg = _config()
    model = _model(cfg)
    method = _setup(cfg, model, data)
    method.omega = torch.randn_like(method.omega)
    before = method.omega.clone()
    batch = _batch(data, crop=crop)
    rows, w = method.read_omega(batch)
    assert w.shape == batch.x.shape
    if not crop:  # the unpadded centre window
        p = OMEGA_PAD
        assert torch.equal(w, before[batch.index][:, :, p:p + 32, p:p + 32])
    else:  # the same crop+flip as the image
        assert torch.equal(w, apply_crop_flip(before[batch.index], batch.crop))
    method.write_omega(batch, rows, w)
    assert torch.equal(method.omega, before)  # exact inverse
    rows, w = method.read_omega(batch)
    method.write_omega(batch, rows, w + 1)
    assert torch.equal(method.read_omega(batch)[1], w + 1)
    changed = (method.omega != before).flatten(1).sum(1)
    mask = torch.zeros(len(before), dtype=torch.bool)
    mask[batch.index] = True
    assert (changed[mask] == 3 * 32 * 32).all() and (changed[~mask] == 0).all()


def test_omega_crop_with_smaller_pad(data):
    cfg = _config()
    method = _setup(cfg, _model(cfg), data)
    batch = _batch(data, pad=2)
    rows, w = method.read_omega(batch)
    frame = method.omega[batch.index][:, :, 2:-2, 2:-2]
    assert torch.equal(w, apply_crop_flip(frame, batch.crop))


def test_omega_compact_state_is_bit_exact():
    g = torch.Generator().manual_seed(0)
    omega = torch.randn(7, 3, 10, 10, generator=g)
    omega[omega > 0.3] = 1.0
    omega[omega < -0.3] = -1.0
    flat = omega.view(-1)
    flat[:6] = torch.tensor([-0.0, 0.0, 1 - 2**-24, -1 + 2**-24, float("nan"), 1e-40])
    state = omega_to_compact(omega)
    assert state["code"].dtype == torch.int8
    assert state["rest"].numel() == int(((omega != 1) & (omega != -1)).sum())
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    back = omega_from_compact(torch.load(buf, weights_only=True))
    assert back.dtype == torch.float32 and back.shape == omega.shape
    assert torch.equal(back.view(torch.int32), omega.view(torch.int32))


def test_method_state_round_trip(data):
    cfg = _config(model="preactresnet18", width=0.0625, apart_psi_lr=1e-4)
    model = _model(cfg)
    method = _setup(cfg, model, data)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for s in range(2):
        method.train_step(model, _batch(data, seed=s), opt)
    touched = method.omega[_batch(data, seed=0).index]
    assert (touched.abs() == 1).float().mean() > 0.05  # the first update already saturates some entries
    buf = io.BytesIO()
    torch.save(method.state_dict(), buf)
    buf.seek(0)
    other = _setup(cfg, _model(cfg, seed=5), data, seed=7)
    other.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(other.omega.view(torch.int32), method.omega.view(torch.int32))
    for k in method.psi:
        assert torch.equal(other.psi[k], method.psi[k])
    assert other.psi_schedule.last_step == method.psi_schedule.last_step == 2
    buf_a, buf_b = method.psi_optimizer.state_dict(), other.psi_optimizer.state_dict()
    assert all(torch.equal(buf_a["state"][i]["momentum_buffer"], buf_b["state"][i]["momentum_buffer"])
               for i in buf_a["state"])
    with pytest.raises(ValueError):
        _setup(_config(), _model(_config()), data).load_state_dict(method.state_dict())


# ---------------------------------------------------------------------------------------------
# ψ: gradient ascent
# ---------------------------------------------------------------------------------------------


def test_psi_update_is_gradient_ascent(data):
    """One step with the model frozen (lr 0): ψ moves along +∇ψL₁ and L₁ (same θ, same ω) rises."""
    cfg = _config(apart_psi_lr=1e-4, apart_psi_weight_decay=0.0, schedule="constant")
    model = _model(cfg)
    method = _setup(cfg, model, data)
    with torch.no_grad():
        method.psi["alpha_b"].fill_(1e-3)
    batch = _batch(data, n=32)
    _, w = method.read_omega(batch)
    w = w.clone()
    out = method.objective(model, batch, w)
    grads = torch.autograd.grad(out["loss"], list(method.psi.values()))
    before = {k: p.detach().clone() for k, p in method.psi.items()}
    method.train_step(model, batch, torch.optim.SGD(model.parameters(), lr=0.0))
    for (k, p), g in zip(method.psi.items(), grads):
        moved = p.detach() - before[k]
        assert torch.allclose(moved, 1e-4 * g, rtol=1e-2, atol=0), k  # first momentum step = lr·(+grad)
    after = method.objective(model, batch, w)["loss"].item()
    assert after > out["loss"].item()


def test_alpha_grows_while_it_raises_the_loss(data):
    cfg = _config(apart_psi_lr=2e-6, apart_psi_weight_decay=1200.0, schedule="constant", learned_init=False,
                  layerwise=False)
    model = _model(cfg)
    method = _setup(cfg, model, data)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    alphas = [method.psi["alpha"].item()]
    for s in range(6):
        batch = _batch(data, n=32, seed=s)
        grad = torch.autograd.grad(method.objective(model, batch, None)["loss"], method.psi["alpha"])[0]
        assert grad.item() > 1200.0 * alphas[-1]  # ascent direction of L₁ − 600α² still points up
        method.train_step(model, batch, opt)
        alphas.append(method.psi["alpha"].item())
    assert all(b > a for a, b in zip(alphas, alphas[1:]))
    assert alphas[-1] > 5 * alphas[0]


def test_cycled_psi_momentum(data):
    cfg = _config(epochs=2)
    model = _model(cfg)
    method = _setup(cfg, model, data, total_steps=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    momenta = []
    for s in range(6):
        method.train_step(model, _batch(data, seed=s), opt)
        momenta.append(method.psi_optimizer.param_groups[0]["momentum"])
    assert momenta == pytest.approx([0.9, 0.88, 0.86, 0.84, 0.82, 0.8])  # LR 0 -> peak at step 5 of 10


# ---------------------------------------------------------------------------------------------
# FGSM+, ablations, metrics
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method,flags", [
    ("fgsm+", {}),
    ("apart", {"learned_init": False}),
    ("apart", {"learned_step": False}),
    ("apart", {"layerwise": False}),
    ("apart", {"learned_init": False, "learned_step": False, "layerwise": False}),
    ("apart", {"apart_omega_device": "cpu", "attack_bn": "eval"}),
])
def test_variants_train(data, method, flags):
    cfg = _config(model="smallcnn", width=4, method=method, apart_psi_lr=1e-4, **flags)
    model = _model(cfg)
    m = _setup(cfg, model, data)
    assert (m.forward_passes, m.backward_passes) == (2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for s in range(3):
        batch = _batch(data, seed=s)
        out = m.train_step(model, batch, opt)
        assert math.isfinite(out.loss.item())
        assert out.delta.abs().max() <= cfg.epsilon + 1e-6
        assert ((batch.x + out.delta) >= -1e-6).all() and ((batch.x + out.delta) <= 1 + 1e-6).all()
    metrics = m.epoch_metrics()
    layerwise = method == "apart" and flags.get("layerwise", True)
    expected = {"alpha", "lr_psi", "delta_abs_mean", "delta_frac_at_eps"}
    expected |= {"alpha_omega"} if flags.get("learned_init", True) else set()
    expected |= {f"alpha_b{i}" for i in range(1, 5)} if layerwise else set()
    assert set(metrics) == expected
    assert (m.omega is None) == (not flags.get("learned_init", True))
    if not flags.get("learned_step", True):
        assert metrics["alpha"] == pytest.approx(cfg.epsilon) and "alpha" not in m.psi
    assert m.epoch_metrics() == {}  # reset after reading


def test_all_ablations_off_is_fgsm(data):
    """No learned init, fixed step ε, no layer-wise perturbation: δ is exactly FGSM's."""
    cfg = _config(learned_init=False, learned_step=False, layerwise=False)
    model = _model(cfg)
    method = _setup(cfg, model, data)
    batch = _batch(data)
    expected = FGSM(cfg.epsilon, train_mode=True)(model, batch.x, batch.y)
    out = method.train_step(model, batch, torch.optim.SGD(model.parameters(), lr=0.0))
    assert torch.allclose(out.delta, expected, atol=1e-7)
    assert method.perturbation_spec().step_size == pytest.approx(cfg.epsilon)


def test_bad_options():
    with pytest.raises(RobustdropError, match="apart-psi-lr"):
        create_method(_config(apart_psi_lr=-1.0))


# ---------------------------------------------------------------------------------------------
# through the trainer: metrics and exact resume
# ---------------------------------------------------------------------------------------------


class _Crashed(Exception):
    pass


class _Crash(Hook):
    """Kills the run in epoch 3, after the epoch-2 checkpoint was written."""

    name = "crash"

    def on_epoch_end(self, run, epoch):
        if epoch == 3:
            raise _Crashed


def _metrics(store):
    df = store.metrics()
    df = df[~df["metric"].str.startswith("time_")]
    return df.sort_values(["epoch", "step", "split", "source", "metric", "attack"]).reset_index(drop=True)


def test_resume_is_exact(tmp_path):
    data = make_synthetic(n_train=200, n_test=64, seed=2)
    cfg = _config(model="preactresnet18", width=0.0625, epochs=4, batch_size=50, val_size=40, probe_size=32,
                  eval_pgd_steps=2, test_every=0, apart_psi_lr=1e-4, threads=1)
    straight = track(cfg, runs_dir=tmp_path, name="straight", progress=False, data=data)
    with pytest.raises(_Crashed):
        track(cfg, runs_dir=tmp_path, name="resumed", progress=False, data=data, hooks=[_Crash()])
    resumed = resume(tmp_path / "resumed", progress=False, data=data)
    a, b = _metrics(straight), _metrics(resumed)
    assert len(a) == len(b) and set(a["epoch"]) == {1, 2, 3, 4}
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    apart = a[a["source"] == "apart"]
    assert {"alpha", "alpha_omega", "alpha_b8", "lr_psi", "delta_abs_mean", "delta_frac_at_eps"} <= set(apart["metric"])
    last = torch.load(tmp_path / "resumed" / "checkpoints" / "last.pt", weights_only=True)
    first = torch.load(tmp_path / "straight" / "checkpoints" / "last.pt", weights_only=True)
    assert torch.equal(omega_from_compact(last["method"]["omega"]), omega_from_compact(first["method"]["omega"]))


def test_apart_is_registered():
    assert isinstance(create_method(_config(method="fgsm+")), Apart)
    assert create_method(_config(method="fgsm+")).layerwise is False
    assert create_method(_config()).name == "apart"
