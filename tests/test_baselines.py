"""N-FGSM and GradAlign (the field's catastrophic-overfitting baselines) and WideResNet: perturbations
obey their documented bounds, the regulariser does what the paper says, every diagnostic runs on
them, and APART finds WideResNet's perturbation points."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustdrop.api import track
from robustdrop.data import Batch
from robustdrop.engine import make_config
from robustdrop.errors import RobustdropError
from robustdrop.methods import MethodContext, create_method
from robustdrop.methods.apart import find_perturbation_points
from robustdrop.methods.gradalign import GradAlign, alignment_cos
from robustdrop.methods.n_fgsm import NFGSM
from robustdrop.models import create_model

EPS = 8 / 255


pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(n=32, seed=0, classes=10, size=32):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g)
    x[:4] = x[:4].round()  # pixels at the box edges: the clip to [0, 1] must bind there
    y = torch.randint(0, classes, (n,), generator=g)
    return Batch(x=x, y=y, index=torch.arange(n), crop=None)


def _cnn(seed=0):
    torch.manual_seed(seed)
    return create_model("cnn1", width=4)


# ---------------------------------------------------------------------------------------------
# N-FGSM
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [0.0, 1.0, 2.0])
def test_n_fgsm_perturbation_obeys_its_bounds(k):
    batch, model = _batch(), _cnn()
    delta = NFGSM(EPS, noise=k).perturb(model, batch.x, batch.y)
    x_adv = batch.x + delta
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert delta.abs().max() <= (k + 1) * EPS + 1e-6
    if k == 2.0:  # no projection back to the ε-ball: most of δ lies beyond ε
        assert (delta.abs() > EPS + 1e-6).float().mean() > 0.3


def test_n_fgsm_is_noise_plus_one_signed_step():
    """δ − η = α·sign(∇ₓL(x + η)) wherever no clip to [0, 1] binds (the authors' train.py:216-233)."""
    batch, model = _batch(), _cnn()
    method = NFGSM(EPS, noise=2.0, step_size=EPS, train_mode=False)
    torch.manual_seed(3)
    delta = method.perturb(model, batch.x, batch.y)
    torch.manual_seed(3)  # the same noise, drawn as the method draws it
    eta = (batch.x + (2 * torch.rand_like(batch.x) - 1) * 2 * EPS).clamp(0, 1) - batch.x
    x_eta = (batch.x + eta).requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(x_eta), batch.y, reduction="sum"), x_eta)
    inside = ((batch.x + eta + EPS * grad.sign()) > 0) & ((batch.x + eta + EPS * grad.sign()) < 1)
    torch.testing.assert_close(delta[inside], (eta + EPS * grad.sign())[inside], atol=1e-6, rtol=0)


def test_n_fgsm_trains_on_its_own_perturbation():
    batch, model = _batch(), _cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    torch.manual_seed(0)
    out = NFGSM(EPS).train_step(model, batch, opt)
    assert out.delta.shape == batch.x.shape and out.logits.shape == (32, 10) and torch.isfinite(out.loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


# ---------------------------------------------------------------------------------------------
# GradAlign
# ---------------------------------------------------------------------------------------------
def test_gradalign_regularizer_is_zero_for_a_linear_model():
    """A linear binary classifier's input gradient is (p₁ − y)(w₁ − w₀) everywhere: aligned, R = 0.
    (The check of the paper's motivation; for more classes softmax makes even a linear model's
    gradient direction depend on x.)"""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2))
    batch = _batch(n=16, classes=2, size=8)
    method = GradAlign(EPS, lam=1.0)
    g1 = torch.autograd.grad(F.cross_entropy(model(batch.x.requires_grad_(True)), batch.y), batch.x)[0]
    reg, cos = method.regularizer(model, batch.x.detach(), batch.y, g1)
    assert reg.item() == pytest.approx(0.0, abs=1e-5) and cos.item() == pytest.approx(1.0, abs=1e-5)


def test_gradalign_regularizer_is_positive_and_reaches_the_weights():
    """For a ReLU network the gradients at x and x + η disagree (R > 0), and R has a parameter
    gradient (double backprop)."""
    batch, model = _batch(), _cnn()
    method = GradAlign(EPS, lam=0.2)
    x = batch.x.clone().requires_grad_(True)
    g1 = torch.autograd.grad(F.cross_entropy(model(x), batch.y), x)[0]
    reg, cos = method.regularizer(model, batch.x, batch.y, g1, noise=torch.full_like(batch.x, EPS))
    assert 0 < reg.item() <= 0.4 and reg.item() == pytest.approx(0.2 * (1 - cos.item()))
    grads = torch.autograd.grad(reg, list(model.parameters()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_alignment_cos_leaves_out_zero_gradients():
    """As the authors (train.py:194): examples with a zero gradient do not count; none left → cos 1."""
    g1 = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    g2 = torch.tensor([[1.0, 0.0], [1.0, 1.0], [-1.0, -1.0]])
    cos, kept = alignment_cos(g1.requires_grad_(True), g2)
    assert kept.item() == 2 and cos.item() == pytest.approx(0.0, abs=1e-6)  # mean of 1 and −1
    cos.backward()
    assert torch.isfinite(g1.grad).all()
    cos, kept = alignment_cos(torch.zeros(3, 2), g2)
    assert kept.item() == 0 and cos.item() == 1.0


def test_gradalign_step_is_fgsm_plus_regularizer():
    """δ is FGSM's from zero (|δ| = ε away from the box edges); with λ > 0 the update differs from
    plain FGSM's by the regulariser's gradient only."""
    batch = _batch()
    deltas, params = [], []
    for lam in (0.0, 0.5):
        model = _cnn()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        torch.manual_seed(0)
        out = GradAlign(EPS, lam=lam).train_step(model, batch, opt)
        deltas.append(out.delta)
        params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(deltas[0], deltas[1])
    x_adv = batch.x + deltas[0]
    assert deltas[0].abs().max() <= EPS + 1e-7 and x_adv.min() >= 0 and x_adv.max() <= 1
    interior = (batch.x > EPS) & (batch.x < 1 - EPS)
    torch.testing.assert_close(deltas[0][interior].abs(), torch.full_like(deltas[0][interior], EPS))
    assert not torch.equal(params[0], params[1])


def test_gradalign_logs_regularizer_per_epoch():
    method, batch = GradAlign(EPS, lam=0.2), _batch()
    model = _cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(2):
        method.train_step(model, batch, opt)
    stats = method.epoch_metrics()
    assert set(stats) == {"gradalign_reg", "gradalign_cos"}
    assert stats["gradalign_reg"] == pytest.approx(0.2 * (1 - stats["gradalign_cos"]), rel=1e-5)
    assert method.epoch_metrics() == {}  # reset after reading


@pytest.mark.parametrize(("overrides", "message"), [
    (dict(method="n-fgsm", nfgsm_noise=-1.0), "--nfgsm-noise"),
    (dict(method="gradalign", gradalign_lambda=float("nan")), "--gradalign-lambda"),
    (dict(method="gradalign", alpha=4 / 255), "drop --alpha"),
])
def test_bad_method_options_fail_in_one_line(overrides, message):
    with pytest.raises(RobustdropError, match=message):
        create_method(make_config(**overrides))


@pytest.mark.parametrize("method", ["n-fgsm", "gradalign"])
def test_new_methods_train_with_every_diagnostic(method, synthetic_data, tmp_path):
    cfg = make_config(model="cnn1", width=4, epochs=2, batch_size=64, val_size=64, probe_size=64, lr=0.003,
                      optimizer="adam", eval_pgd_steps=3, eval_batch_size=128, diagnostics=["all"], method=method)
    store = track(cfg, runs_dir=tmp_path, name=method, data=synthetic_data, progress=False)
    m = store.metrics()
    train = m[(m.split == "train") & (m.metric == "loss") & (m.source == "train")]
    assert len(train) == 2 and (train.attack == method).all() and train.value.notna().all()
    assert {"strength", "snapshots", "collapse", "landscape"} <= set(m.source)
    probe = m[(m.split == "probe") & (m.metric == "acc") & (m.attack == "pgd")]
    assert len(probe) == 2 and probe.value.between(0, 1).all()
    passes = m[m.metric == "passes_forward"].value.iloc[0]
    assert passes == (2 if method == "n-fgsm" else 3)
    size = m[(m.source == "strength") & (m.split == "train") & (m.metric == "delta_abs_mean")].value
    if method == "n-fgsm":  # the noise 2ε plus the step make δ larger than FGSM's ε on average
        assert (size > 8 / 255).all()
        assert m[(m.split == "train") & (m.metric == "loss")].epsilon.tolist() == pytest.approx([8 / 255] * 2)
    else:
        assert (size <= 8 / 255 + 1e-6).all()
        reg = m[(m.source == "gradalign") & (m.metric == "gradalign_reg")]
        assert len(reg) == 2 and (reg.value >= 0).all()


# ---------------------------------------------------------------------------------------------
# WideResNet
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("depth", "width", "millions"), [(28, 10, 36.48), (34, 10, 46.16)])
def test_wideresnet_standard_configurations(depth, width, millions):
    with torch.device("meta"):
        model = create_model("wideresnet", depth=depth, width=width)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(millions, abs=0.01)
    n = (depth - 4) // 6
    assert [p.name for p in find_perturbation_points(model)] == [
        f"layer{g}.{i}.conv1" for g in (1, 2, 3) for i in range(n)]


def test_apart_trains_on_a_small_wideresnet():
    """The generic rule finds every block's conv1 input, and APART's step runs with them."""
    torch.manual_seed(0)
    model = create_model("wideresnet", depth=10, width=1)
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    cfg = make_config(model="wideresnet", depth=10, width=1, method="apart", epsilon=EPS)
    method = create_method(cfg)
    method.setup(model, MethodContext(num_train=32, image_shape=(3, 32, 32), total_steps=10, steps_per_epoch=5,
                                      device=torch.device("cpu")))
    assert method.point_names == ["layer1.0.conv1", "layer2.0.conv1", "layer3.0.conv1"]
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    out = method.train_step(model, _batch(), opt)
    assert torch.isfinite(out.loss) and method.psi["alpha_b"].shape == (3,)


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(name="wideresnet", depth=27), "6n\\+4"),
    (dict(name="wideresnet", width=2.5), "integer widen factor"),
    (dict(name="cnn1", depth=28), "--depth does not apply to 'cnn1'"),
])
def test_bad_model_shapes_fail_in_one_line(kwargs, message):
    with pytest.raises(RobustdropError, match=message):
        create_model(kwargs.pop("name"), **kwargs)
