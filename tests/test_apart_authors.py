"""The authors' recipe (preset ``apart-authors``) and the exact equivalence of robustdrop's APART
with the authors' algorithm.

The reference below is the one-iteration algorithm of the authors' code (github.com/zichaoli/APART
at 5aabd82: ``train.py`` lines 97-173, ``models/preresnet.py``, ``adaptive_data_aug.py``,
``cifar_dataloader.py``; paper.md §4.2 and §4.4), written out plainly: its own PreActResNet with
per-block step sizes and gradient hooks, per-example crop/flip loops on a 40×40 frame padded with
0.5, its own two SGD optimizers driven by PyTorch's ``CyclicLR`` (momentum cycling included), the ψ
ascent by negated gradients. It does not call robustdrop's APART. Given the same initial weights,
Ω, data and crop/flip draws, robustdrop configured by the preset must give the same loss, ψ, θ (BN
statistics included) and Ω after every one of 4 steps, to float64 rounding.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustdrop import make_config
from robustdrop.api import track
from robustdrop.data import ImageData, TrainLoader, make_synthetic
from robustdrop.engine import Hook
from robustdrop.engine.trainer import make_optimizer
from robustdrop.methods import MethodContext, create_method
from robustdrop.models import create_model

CPU = torch.device("cpu")
N_TRAIN, BATCH, EPOCHS = 12, 8, 2  # 2 steps per epoch (8 + 4 examples), every example seen twice
pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = dict(width=0.125, batch_size=BATCH, epochs=EPOCHS, device="cpu", diagnostics=["none"], threads=1)


@pytest.fixture
def float64():
    """Models, ψ and Ω created in float64 (robustdrop's APART follows the model's dtype)."""
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(dtype)


@pytest.fixture(scope="module")
def data() -> ImageData:
    return make_synthetic(n_train=N_TRAIN, n_test=16, num_classes=10, size=32, channels=3, seed=4)


# ---------------------------------------------------------------------------------------------
# The authors' algorithm, ported
# ---------------------------------------------------------------------------------------------


class RefBlock(nn.Module):
    """``models/preresnet.py`` PreActBlock: a step size ``alpha`` (init 0), a hook that records the
    gradient at ``u = relu(bn1(h))``, ``u += alpha·sign(g)`` when ``layerwise`` is on, and the
    projection shortcut applied to the raw input ``h``."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None
        self.alpha = nn.Parameter(torch.zeros(1))
        self.layerwise = False
        self.grad_u = None

    def _save(self, grad):
        self.grad_u = grad.detach().clone()

    def forward(self, h):
        u = F.relu(self.bn1(h))
        skip = h if self.shortcut is None else self.shortcut(h)
        if u.requires_grad:
            u.register_hook(self._save)
        if self.layerwise:
            u = u + self.alpha * self.grad_u.sign()
        return self.conv2(F.relu(self.bn2(self.conv1(u)))) + skip


class RefNet(nn.Module):
    """``models/preresnet.py`` PreActResNet([2, 2, 2, 2]) at width ``widths``, with model-level
    ``alpha`` and ``alpha_omega`` (init 1e-4) and a hook that records the input gradient."""

    def __init__(self, widths: list[int], num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        cin, layers = widths[0], []
        for i, w in enumerate(widths):
            layers.append(nn.Sequential(RefBlock(cin, w, 1 if i == 0 else 2), RefBlock(w, w, 1)))
            cin = w
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.bn = nn.BatchNorm2d(widths[-1])
        self.linear = nn.Linear(widths[-1], num_classes)
        self.alpha = nn.Parameter(torch.full((1,), 1e-4))
        self.alpha_omega = nn.Parameter(torch.full((1,), 1e-4))
        self.grad_x = None

    def blocks(self) -> list[RefBlock]:
        return [m for m in self.modules() if isinstance(m, RefBlock)]

    def _save(self, grad):
        self.grad_x = grad.detach().clone()

    def forward(self, x, layerwise: bool = False):
        if x.requires_grad:
            x.register_hook(self._save)
        for block in self.blocks():
            block.layerwise = layerwise
        out = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))
        out = F.avg_pool2d(F.relu(self.bn(out)), 4)
        return self.linear(out.flatten(1))


def ref_padded_images(images_uint8: torch.Tensor) -> torch.Tensor:
    """``cifar_dataloader.py``: ToTensor (float32, /255) of the 4-pixel zero-padded images, then the
    border overwritten with 0.5."""
    x = F.pad(images_uint8.float() / 255, (4, 4, 4, 4))
    x[:, :, :4, :] = 0.5
    x[:, :, -4:, :] = 0.5
    x[:, :, :, :4] = 0.5
    x[:, :, :, -4:] = 0.5
    return x


def ref_crop(frames: torch.Tensor, top, left, flip) -> torch.Tensor:
    """``atta_aug_trans``: per example, the 32×32 window at (top, left), mirrored where ``flip``."""
    out = torch.zeros(frames.shape[0], frames.shape[1], 32, 32, dtype=frames.dtype)
    for i in range(frames.shape[0]):
        out[i] = frames[i, :, top[i]:top[i] + 32, left[i]:left[i] + 32]
        if flip[i]:
            out[i] = torch.flip(out[i], [2])
    return out


def ref_uncrop(frames: torch.Tensor, windows: torch.Tensor, top, left, flip) -> torch.Tensor:
    """``inverse_atta_aug``: un-mirror each window and write it back into its frame."""
    for i in range(frames.shape[0]):
        w = torch.flip(windows[i], [2]) if flip[i] else windows[i]
        frames[i, :, top[i]:top[i] + 32, left[i]:left[i] + 32] = w
    return frames


@dataclasses.dataclass
class RefRecipe:
    """The values the authors' ``train.py`` hard-codes or defaults to."""

    epsilon: float = 0.031        # --epsilon
    max_lr: float = 0.2           # CyclicLR(optimizer, max_lr=0.2)
    max_lr_psi: float = 5e-8      # CyclicLR(optimizer_alpha, max_lr=5e-8)
    weight_decay: float = 2e-4    # --weight_decay
    weight_decay_psi: float = 400.0  # optimizer_alpha's weight_decay
    momentum: float = 0.9         # --momentum (overridden by CyclicLR's momentum cycling)
    torch1_zero_grad: bool = False  # zero_grad zero-fills (PyTorch 1.x) instead of setting None (>= 2)
    psi_sign: float = -1.0        # ascent: ψ gradients negated before optimizer_alpha.step()


def ref_train(model: RefNet, frames: torch.Tensor, labels: torch.Tensor, omega_sets: torch.Tensor,
              draws: list[tuple], total_steps: int, r: RefRecipe) -> list[float]:
    """The authors' training iterations (``train.py`` 97-173) over the given batches
    ``(index, top, left, flip)``; updates ``model`` and ``omega_sets`` in place; returns L₁ per step."""
    psi = [p for p in model.parameters() if len(p.data) == 1]  # train.py: the 10 scalars
    assert len(psi) == 2 + len(model.blocks())
    opt = torch.optim.SGD(model.parameters(), lr=r.max_lr, momentum=r.momentum, weight_decay=r.weight_decay)
    opt_psi = torch.optim.SGD(psi, lr=r.max_lr_psi, momentum=r.momentum, weight_decay=r.weight_decay_psi)
    half = total_steps / 2
    sched = torch.optim.lr_scheduler.CyclicLR(opt, base_lr=0, max_lr=r.max_lr, step_size_up=half,
                                              step_size_down=half)
    sched_psi = torch.optim.lr_scheduler.CyclicLR(opt_psi, base_lr=0, max_lr=r.max_lr_psi, step_size_up=half,
                                                  step_size_down=half)
    to_none = not r.torch1_zero_grad
    eps, losses = r.epsilon, []
    for index, top, left, flip in draws:
        omega = ref_crop(omega_sets[index], top, left, flip)
        x = ref_crop(frames[index], top, left, flip)
        y = labels[index]
        model.train()
        opt.zero_grad(set_to_none=to_none)
        opt_psi.zero_grad(set_to_none=to_none)
        # initialization and pass 1 (its θ- and ψ-gradients are discarded by the next zero_grad)
        delta = (model.alpha_omega * omega).clamp(-eps, eps)
        loss0 = F.cross_entropy(model((x + delta).clamp(0, 1)), y)
        loss0.backward(retain_graph=True)
        # input step, pass 2 with the layer-wise perturbations
        delta = (delta + model.alpha * model.grad_x.sign()).clamp(-eps, eps)
        loss1 = F.cross_entropy(model((x + delta).clamp(0, 1), layerwise=True), y)
        opt.zero_grad(set_to_none=to_none)
        loss1.backward()
        # ω update with ψ before its step, from ∇ₓ₁L₁
        ratio = model.alpha.data.item() / (model.alpha_omega.data.item() + 1e-7)
        omega = (omega + ratio * model.grad_x.sign()).clamp(-1, 1)
        # ψ ascent, then θ descent
        for p in psi:
            p.grad = r.psi_sign * p.grad
        opt_psi.step()
        opt_psi.zero_grad(set_to_none=to_none)
        opt.step()
        sched.step()
        sched_psi.step()
        omega_sets[index] = ref_uncrop(omega_sets[index], omega, top, left, flip)
        losses.append(loss1.item())
    return losses


def ref_model_from(model: nn.Module) -> RefNet:
    """A :class:`RefNet` with ``model``'s weights and BN statistics (robustdrop's key names)."""
    widths = [model.layer1[0].conv1.out_channels, model.layer2[0].conv1.out_channels,
              model.layer3[0].conv1.out_channels, model.layer4[0].conv1.out_channels]
    ref = RefNet(widths).to(next(model.parameters()).dtype)
    missing, unexpected = ref.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all(k.endswith("alpha") or k.endswith("alpha_omega") for k in missing)
    return ref


def ref_psi(ref: RefNet) -> dict[str, torch.Tensor]:
    return {"alpha": ref.alpha.detach().reshape(()), "alpha_omega": ref.alpha_omega.detach().reshape(()),
            "alpha_b": torch.cat([b.alpha.detach() for b in ref.blocks()])}


# ---------------------------------------------------------------------------------------------
# robustdrop, configured by the preset
# ---------------------------------------------------------------------------------------------


def authors_config(**overrides):
    return make_config("apart-authors", **{**SMALL, **overrides})


def robustdrop_run(cfg, data: ImageData, seed: int = 0):
    """robustdrop's APART over EPOCHS epochs of the real loader, driven like the Trainer's loop
    (``schedule.apply``, ``train_step``, ``schedule.step``) in the default dtype.

    Returns the initial state (θ, Ω), the batches' draws, per-step losses, the final model and method.
    """
    torch.manual_seed(seed)
    model = create_model(cfg.model, width=cfg.width)
    loader = TrainLoader(data.train_x, data.train_y, cfg.batch_size, device=CPU, augment=cfg.augment, pad=4,
                         pad_value=cfg.pad_value)
    steps_per_epoch = len(loader)
    method = create_method(cfg)
    method.setup(model, MethodContext(N_TRAIN, (3, 32, 32), steps_per_epoch * cfg.epochs, steps_per_epoch, CPU))
    optimizer, schedule = make_optimizer(cfg, model, steps_per_epoch)
    start = {"model": {k: v.clone() for k, v in model.state_dict().items()}, "omega": method.omega.clone(),
             "psi": {k: p.detach().clone() for k, p in method.psi.items()}}
    generator = torch.Generator().manual_seed(seed)
    draws, losses, batches = [], [], []
    model.train()
    for _ in range(cfg.epochs):
        for batch in loader.epoch(generator):
            batch = dataclasses.replace(batch, x=batch.x.to(torch.get_default_dtype()))
            schedule.apply(optimizer)
            out = method.train_step(model, batch, optimizer)
            schedule.step()
            c = batch.crop
            draws.append((batch.index.clone(), c.top.tolist(), c.left.tolist(), c.flip.tolist()))
            losses.append(out.loss.item())
            batches.append(batch.x.clone())
    return start, draws, losses, batches, model, method, steps_per_epoch * cfg.epochs


def reference_run(start, draws, data: ImageData, total_steps: int, recipe: RefRecipe, model_template: nn.Module):
    """The ported algorithm from the same initial θ, Ω and draws. Returns (losses, ref model, Ω, x of each batch)."""
    ref = ref_model_from(model_template)
    ref.load_state_dict(start["model"], strict=False)
    dtype = next(ref.parameters()).dtype
    frames = ref_padded_images(data.train_x).to(dtype)
    omega = start["omega"].clone()
    xs = [ref_crop(frames[index], top, left, flip) for index, top, left, flip in draws]
    losses = ref_train(ref, frames, data.train_y, omega, draws, total_steps, recipe)
    return losses, ref, omega, xs


def assert_same_run(rd, ref_out, *, rtol: float, atol: float):
    """loss per step, ψ, θ (parameters and BN buffers) and Ω of both runs agree to rounding."""
    _, _, losses, batches, model, method, _ = rd
    ref_losses, ref, ref_omega, ref_xs = ref_out
    for a, b in zip(batches, ref_xs, strict=True):
        assert torch.equal(a, b), "the batches differ (pad value, crop or flip)"
    assert losses == pytest.approx(ref_losses, rel=rtol, abs=atol)
    psi = ref_psi(ref)
    for name, p in method.psi.items():
        torch.testing.assert_close(p.detach(), psi[name], rtol=rtol, atol=atol, msg=lambda m, n=name: f"ψ {n}: {m}")
    ref_state = ref.state_dict()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, ref_state[key], rtol=rtol, atol=atol, msg=lambda m, k=key: f"θ {k}: {m}")
    torch.testing.assert_close(method.omega, ref_omega, rtol=rtol, atol=atol, msg=lambda m: f"Ω: {m}")


# ---------------------------------------------------------------------------------------------
# the equivalence
# ---------------------------------------------------------------------------------------------

# float64: the two implementations order a few sums differently, so they agree to ~1e-15, not bitwise.
RTOL, ATOL = 1e-9, 1e-12


def test_apart_step_equals_the_authors_algorithm(data, float64):
    """The authors' code as it runs under PyTorch >= 2 (ψ decay 400, paper.md §4.3-1), at the
    preset's values, from the same start: equal loss, ψ, θ and Ω after 4 steps."""
    cfg = authors_config(apart_psi_weight_decay=400.0)
    rd = robustdrop_run(cfg, data)
    start, draws, *_, model, method, total = rd
    assert total == 4 and len(draws) == 4 and sorted(torch.cat([d[0] for d in draws]).tolist()) == sorted(
        list(range(N_TRAIN)) * 2)
    # The preset starts ψ where the authors' model does.
    assert start["psi"]["alpha"].item() == start["psi"]["alpha_omega"].item() == 1e-4
    assert start["psi"]["alpha_b"].eq(0).all() and len(start["psi"]["alpha_b"]) == 8
    ref_out = reference_run(start, draws, data, total, RefRecipe(), model)
    assert_same_run(rd, ref_out, rtol=RTOL, atol=ATOL)
    # Everything moved (a comparison of unchanged values would prove nothing).
    assert not torch.equal(method.omega, start["omega"])
    assert (method.psi["alpha_b"] != 0).all() and method.psi["alpha"].item() != 1e-4
    assert not torch.equal(model.conv1.weight, start["model"]["conv1.weight"])


def test_equivalence_with_a_strong_psi(data, float64):
    """The same with ψ's LR raised to 1e-3 (ψ moves enough to change the perturbations, so the
    layer-wise noise, the α-step and the ω ratio all shape the later steps)."""
    cfg = authors_config(apart_psi_weight_decay=400.0, apart_psi_lr=1e-3)
    rd = robustdrop_run(cfg, data)
    start, draws, *_, model, method, total = rd
    ref_out = reference_run(start, draws, data, total, RefRecipe(max_lr_psi=1e-3), model)
    assert_same_run(rd, ref_out, rtol=RTOL, atol=ATOL)
    assert method.psi["alpha_b"].abs().min() > 1e-5  # the layer-wise perturbations are not negligible


@pytest.mark.parametrize("mutation", ["psi_descent", "psi_decay_1200", "canonical_shortcut", "pad_128"])
def test_equivalence_detects_a_changed_detail(data, float64, mutation):
    """The comparison is sharp: one changed detail of the algorithm breaks it."""
    cfg = authors_config(apart_psi_weight_decay=400.0)
    if mutation == "psi_decay_1200":
        cfg = authors_config(apart_psi_weight_decay=1200.0)
    if mutation == "canonical_shortcut":
        cfg = authors_config(apart_psi_weight_decay=400.0, model="preactresnet18")
    if mutation == "pad_128":
        cfg = authors_config(apart_psi_weight_decay=400.0, pad_value=128 / 255)
    rd = robustdrop_run(cfg, data)
    start, draws, *_, model, _, total = rd
    recipe = RefRecipe(psi_sign=+1.0 if mutation == "psi_descent" else -1.0)
    ref_out = reference_run(start, draws, data, total, recipe, model)
    with pytest.raises(AssertionError):
        assert_same_run(rd, ref_out, rtol=RTOL, atol=ATOL)


def _psi_moves_close(method, ref, start, rtol):
    psi = ref_psi(ref)
    return all(torch.allclose(p.detach() - start["psi"][k], psi[k] - start["psi"][k], rtol=rtol, atol=0)
               for k, p in method.psi.items())


def test_psi_decay_1200_matches_the_pytorch1_run(data, float64):
    """Under PyTorch 1.x (the authors' 1.3.1) ``zero_grad`` zero-fills, so the model's optimizer
    also decays ψ (2e-4 at 4·10⁶ × ψ's LR): robustdrop's single decay of 1200 (the preset's)
    reproduces that run. Not bitwise: the model optimizer decays the ψ that optimizer_alpha has
    just updated, which moves each ψ increment by a relative ≈ 800·η_ψ (≤ 4·10⁻⁵ + rounding)."""
    cfg = authors_config()
    assert cfg.apart_psi_weight_decay == 1200.0
    rd = robustdrop_run(cfg, data)
    start, draws, losses, _, model, method, total = rd
    ref_losses, ref, ref_omega, _ = reference_run(start, draws, data, total, RefRecipe(torch1_zero_grad=True), model)
    assert _psi_moves_close(method, ref, start, rtol=2e-4)
    assert losses == pytest.approx(ref_losses, rel=1e-6)
    torch.testing.assert_close(method.omega, ref_omega, rtol=0, atol=1e-4)
    # … while a decay of 400 is visibly off for that run.
    rd400 = robustdrop_run(authors_config(apart_psi_weight_decay=400.0), data)
    assert not _psi_moves_close(rd400[5], ref, start, rtol=2e-4)


# ---------------------------------------------------------------------------------------------
# the preset, through the trainer
# ---------------------------------------------------------------------------------------------


class _Record(Hook):
    """Records the run's start, every step's batch and loss, and the end state."""

    name = "record"

    def __init__(self):
        super().__init__(every_n_steps=1, every_n_epochs=0)
        self.draws, self.losses, self.xs, self.momenta = [], [], [], []

    def on_run_start(self, run):
        self.start = {"model": {k: v.clone() for k, v in run.model.state_dict().items()},
                      "omega": run.method.omega.clone()}
        self.train_images = run.train_images.clone()

    def on_train_step(self, run, batch, out):
        c = batch.crop
        self.draws.append((batch.index.clone(), c.top.tolist(), c.left.tolist(), c.flip.tolist()))
        self.losses.append(out.loss.item())
        self.xs.append(batch.x.clone())
        self.momenta.append(run.optimizer.param_groups[0]["momentum"])

    def on_run_end(self, run):
        self.model, self.method = run.model, run.method


def test_preset_resolves_to_the_authors_values():
    cfg = make_config("apart-authors")
    assert (cfg.method, cfg.model, cfg.dataset) == ("apart", "preactresnet18-apart", "cifar10")
    assert cfg.epsilon == 0.031 and cfg.eval_epsilon == pytest.approx(8 / 255)
    assert (cfg.val_size, cfg.train_subset, cfg.pad_value, cfg.batch_size, cfg.epochs) == (0, 0, 0.5, 128, 30)
    assert (cfg.lr, cfg.weight_decay, cfg.schedule, cfg.lr_peak_at) == (0.2, 2e-4, "cyclic", 0.5)
    assert cfg.cycle_momentum and (cfg.base_momentum, cfg.max_momentum) == (0.8, 0.9)
    assert (cfg.apart_psi_lr, cfg.apart_psi_weight_decay, cfg.apart_psi_cycle_momentum) == (5e-8, 1200.0, True)
    assert cfg.layerwise and cfg.learned_init and cfg.learned_step and cfg.attack_bn == "train"
    assert (cfg.eval_pgd_steps, cfg.eval_pgd_step_size, cfg.eval_restarts) == (20, pytest.approx(2 / 255), 1)
    assert cfg.amp is False and cfg.test_every == 2


def test_preset_trains_through_the_trainer_like_the_authors(data, tmp_path):
    """A real ``track`` run of the preset (float32, the Trainer's loader, optimizer, momentum
    cycling, ε) follows the ported algorithm step by step; evaluation uses ε = 8/255."""
    hook = _Record()
    cfg = authors_config(apart_psi_weight_decay=400.0, probe_size=8, eval_pgd_steps=2, eval_batch_size=16)
    store = track(cfg, runs_dir=tmp_path, name="authors", progress=False, data=data, hooks=[hook])
    assert hook.momenta == pytest.approx([0.9, 0.85, 0.8, 0.85])  # CyclicLR's cycle_momentum, 4 steps
    frames_data = dataclasses.replace(data, train_x=hook.train_images)
    start = {"model": hook.start["model"], "omega": hook.start["omega"]}
    ref_losses, ref, ref_omega, ref_xs = reference_run(start, hook.draws, frames_data, 4, RefRecipe(), hook.model)
    for a, b in zip(hook.xs, ref_xs, strict=True):
        assert torch.equal(a, b)
    # float32: the sums are ordered a little differently; agreement to float32 rounding.
    assert hook.losses == pytest.approx(ref_losses, rel=1e-5)
    torch.testing.assert_close(hook.method.psi["alpha_b"].detach(), ref_psi(ref)["alpha_b"], rtol=1e-4, atol=1e-12)
    ref_state = ref.state_dict()
    for key, value in hook.model.state_dict().items():
        torch.testing.assert_close(value, ref_state[key], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(hook.method.omega, ref_omega, rtol=1e-5, atol=1e-5)
    m = store.metrics()
    pgd = m[(m.split == "probe") & (m.attack == "pgd") & (m.metric == "acc")]
    assert len(pgd) == EPOCHS and (pgd.epsilon - 8 / 255).abs().max() < 1e-9
    train = m[(m.split == "train") & (m.metric == "loss")]
    assert (train.epsilon - 0.031).abs().max() < 1e-9 and train.value.map(math.isfinite).all()
    assert store.read_json("manifest.json")["dataset"]["val"] == 0
