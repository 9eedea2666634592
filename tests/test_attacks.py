"""Attacks: the ε-ball, [0, 1], the analytic FGSM answer, PGD >= FGSM, model modes."""

import pytest
import torch
from torch import nn

from robustdrop.attacks import FGSM, PGD, RSFGSM, input_gradient, model_mode
from robustdrop.engine.evaluate import evaluate
from robustdrop.errors import RobustdropError

EPS = 8 / 255


def _linear_model(seed=0, classes=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, classes))


@pytest.mark.parametrize("attack", [FGSM(EPS), RSFGSM(EPS), PGD(EPS, steps=5), PGD(EPS, steps=3, restarts=2)])
def test_attacks_stay_in_eps_ball_and_image_range(attack):
    model = _linear_model()
    x = torch.rand(16, 3, 4, 4)
    x[:4] = 0.0  # saturated pixels: the [0, 1] clip must bind
    x[4:8] = 1.0
    y = torch.randint(0, 3, (16,))
    delta = attack(model, x, y, torch.Generator().manual_seed(0))
    assert delta.shape == x.shape
    assert delta.abs().max() <= EPS + 1e-7
    assert (x + delta).min() >= 0 and (x + delta).max() <= 1


def test_fgsm_on_linear_model_equals_analytic_answer():
    # For logits W x + b and CE loss, ∇ₓ L = Wᵀ (softmax - onehot); FGSM = ε sign of it.
    model = _linear_model(classes=3)
    x = torch.full((8, 3, 4, 4), 0.5)  # away from the box so no clipping
    y = torch.randint(0, 3, (8,))
    w = model[1].weight
    p = torch.softmax(model(x), 1)
    grad = (p - nn.functional.one_hot(y, 3).float()) @ w
    expected = EPS * grad.sign().view_as(x)
    assert torch.allclose(FGSM(EPS)(model, x, y), expected)


def test_fgsm_binary_linear_direction_is_sign_of_w():
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 2))
    x = torch.full((4, 3, 4, 4), 0.5)
    y = torch.zeros(4, dtype=torch.long)
    w_diff = (model[1].weight[1] - model[1].weight[0]).view(3, 4, 4)
    delta = FGSM(EPS)(model, x, y)
    assert torch.allclose(delta, EPS * w_diff.sign().expand_as(x))
    # On a linear model PGD with enough steps reaches the same corner as FGSM.
    pgd = PGD(EPS, steps=10, step_size=EPS / 2)(model, x, y, torch.Generator().manual_seed(1))
    assert torch.allclose(pgd, delta)


def test_pgd_at_least_as_strong_as_fgsm_on_a_trained_model():
    torch.manual_seed(0)
    n = 512
    x = torch.rand(n, 3, 8, 8)
    y = (x[:, 0].mean((1, 2)) > x[:, 1].mean((1, 2))).long()
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 2))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(150):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    images = (x * 255).round().to(torch.uint8)
    attacks = [None, FGSM(EPS), PGD(EPS, steps=10, step_size=2 / 255)]
    clean, fgsm, pgd = evaluate(model, images, y, attacks, split="t", batch_size=128, device=torch.device("cpu"),
                                generator=torch.Generator().manual_seed(0))
    assert clean.acc > 0.8
    assert pgd.acc <= fgsm.acc <= clean.acc
    assert pgd.acc < clean.acc


def test_attack_runs_in_eval_mode_and_restores_mode():
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(self.training)
            return x

    model = nn.Sequential(Probe(), nn.Flatten(), nn.Linear(48, 2), nn.BatchNorm1d(2))
    model.train()
    x, y = torch.rand(4, 3, 4, 4), torch.zeros(4, dtype=torch.long)
    before = model[3].running_mean.clone()
    PGD(EPS, steps=2)(model, x, y)
    assert seen and not any(seen)
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(model[3].running_mean, before)  # eval mode: batch-norm statistics untouched
    seen.clear()
    FGSM(EPS, train_mode=True)(model, x, y)
    assert all(seen)


def test_model_mode_restores_mixed_modes():
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout())
    model.train()
    model[1].eval()
    with model_mode(model, True):
        assert model[1].training
    assert model.training and not model[1].training


def test_input_gradient_accumulates_no_parameter_gradients():
    model = _linear_model()
    input_gradient(model, torch.rand(2, 3, 4, 4), torch.zeros(2, dtype=torch.long))
    assert all(p.grad is None for p in model.parameters())


def test_pgd_keeps_updating_misclassified_examples():
    # A model that misclassifies everything from the start: an early-exit PGD would return δ = start.
    model = _linear_model()
    x = torch.full((8, 3, 4, 4), 0.5)
    logits = model(x)
    y = logits.argmin(1)
    pgd = PGD(EPS, steps=5, step_size=EPS / 4, random_start=False)
    delta = pgd(model, x, y)
    assert delta.abs().max() > 0


def test_bad_epsilon_rejected():
    with pytest.raises(ValueError):
        FGSM(0.0)
    with pytest.raises(ValueError):
        PGD(1.5)


def test_eval_attack_registry_is_the_one_list_and_cw_is_its_own_attack():
    """``--final-eval``, ``evaluate --attack`` and the cached evaluation read one registry; the
    CW-loss PGD's rows are named ``pgd-cw``, never mistaken for cross-entropy PGD's."""
    from robustdrop.attacks.registry import EVAL_ATTACKS, AttackSettings, build_attacks, check_attack_names
    from robustdrop.engine.config import TrackConfig

    assert EVAL_ATTACKS.names() == ["clean", "fgsm", "pgd", "cw", "autoattack"]
    assert TrackConfig.__dataclass_fields__["final_eval"].metadata["names"]() == EVAL_ATTACKS.names()
    clean, pgd, cw = build_attacks(["clean", "pgd", "cw", "pgd"], AttackSettings(8 / 255, num_classes=10))
    assert clean is None and pgd.spec().attack == "pgd" and cw.spec().attack == "pgd-cw"
    assert cw.spec().as_columns() | {"attack": "pgd"} == pgd.spec().as_columns()  # same ε, steps, step, restarts
    with pytest.raises(RobustdropError, match="--final-eval: unknown attack 'deepfool'; choose one of: clean"):
        check_attack_names(["pgd", "deepfool"], "--final-eval")


def test_attack_registry_sits_below_the_engine():
    """The config validates attack names with a module-level import from ``robustdrop.attacks``:
    the registry loads without the engine, and the config has no late engine imports left (they
    were the workaround for the circle config -> attack_eval -> engine package -> config)."""
    import ast
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys, robustdrop.attacks.registry; "
            "print(sorted(m for m in sys.modules if m.startswith('robustdrop.engine')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    config = Path(__file__).parents[1] / "robustdrop" / "engine" / "config.py"
    late = [node.module for fn in ast.walk(ast.parse(config.read_text())) if isinstance(fn, ast.FunctionDef)
            for node in ast.walk(fn) if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                ("robustdrop.engine", "robustdrop.attacks"))]
    assert late == []
