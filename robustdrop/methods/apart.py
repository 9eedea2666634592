"""APART (Li et al. 2020, arXiv 2010.08034) and FGSM+, as the authors' code runs it (paper.md §4).

One step (paper.md §4.4)::

    w   = T(Ω[index])                                   # the batch's crop+flip, applied to ω too
    δ₀  = clip(α_ω·w, ±ε);  x₀ = clip(x + δ₀, 0, 1)
    pass 1 at x₀: g_x = ∇ₓL₀ and g_b = ∇L₀ at every perturbation point b (recorded, no update)
    δ   = clip(δ₀ + α·sign(g_x), ±ε);  x₁ = clip(x + δ, 0, 1)    # differentiable in α and α_ω
    pass 2 at x₁ with u_b += α_b·sign(g_b) at every point b:  L₁;  L₁.backward()
    w   ← clip(w + α/(α_ω + 1e-7)·sign(∇ₓ₁L₁), ±1);  Ω[index] = T⁻¹(w)
    ψ = (α, α_ω, α_b…) ← SGD step on −∇ψL₁ (gradient ASCENT, weight decay, own schedule)
    θ ← the run's optimizer step on ∇θL₁ (descent)

Perturbation points are found generically (:func:`find_perturbation_points`) and live as
forward (pre-)hooks that exist only while APART's two passes run: evaluation, attacks and
diagnostics never see them. Design choices and the code quirks are documented in docs/apart.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from robustdrop.attacks import AttackSpec
from robustdrop.attacks.base import model_mode
from robustdrop.data import Batch, CropFlip, apply_crop_flip, invert_crop_flip
from robustdrop.errors import RobustdropError
from robustdrop.methods.base import MethodContext, StepOutput, TrainingMethod
from robustdrop.methods.registry import register_method
from robustdrop.schedules import CYCLIC, Schedule

__all__ = [
    "OMEGA_PAD", "Apart", "PerturbationPoint", "find_perturbation_points", "omega_from_compact", "omega_to_compact",
]

OMEGA_PAD = 4  # Ω is kept in the frame padded by this many pixels (the trainer's crop padding)
OMEGA_INIT_STD = 1e-3  # Ω = 0.001·N(0, 1) (authors' code)
RATIO_EPS = 1e-7  # the ω update's α / (α_ω + 1e-7)
# Attributes whose presence marks a module with a `conv1` as a residual block (PreActResNet /
# CIFAR ResNet code: `shortcut`; torchvision ResNet: `downsample`; WideResNet code: `convShortcut`).
RESIDUAL_MARKERS = ("shortcut", "downsample", "convShortcut")
# Modules whose output is a hidden activation (the fall-back points of models without residual blocks).
ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
               nn.Softplus, nn.Hardswish, nn.Hardtanh, nn.Tanh, nn.Sigmoid)


# ---------------------------------------------------------------------------------------------
# Perturbation points
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PerturbationPoint:
    """A tensor inside the model that APART perturbs in its second pass.

    ``where="input"``: the (first) input of ``module`` (a forward pre-hook), e.g. a residual block's
    ``conv1``, which in a PreActBlock receives the pre-activated input ``relu(bn1(h))``.
    ``where="output"``: the output of ``module`` (a forward hook), e.g. an activation module.
    """

    name: str  # e.g. "layer1.0.conv1"
    module: nn.Module
    where: str


def find_perturbation_points(model: nn.Module) -> list[PerturbationPoint]:
    """The layer-wise perturbation points of ``model``, in module order.

    Rule 1 (residual models): every sub-module that has a direct child ``conv1`` and an attribute
    named ``shortcut``, ``downsample`` or ``convShortcut`` (it may be ``None``) is a residual
    block; its point is the input of that ``conv1`` (PreActBlock: ``relu(bn1(h))``, exactly where
    the authors add α_b·sign(g_b); the shortcut is not perturbed).

    Rule 2 (only if rule 1 finds nothing): the output of every activation *module* (``nn.ReLU``,
    ``nn.GELU``, …; see ``ACTIVATIONS``), i.e. the hidden activations. ``cnn1``: the output of
    ``act`` = the input of ``linear``; ``smallcnn``: the four ReLUs.

    Functional activations (``F.relu``) in a model without residual blocks are invisible to rule 2;
    such a model gets no points (APART then needs ``--no-layerwise``).
    """
    points = []
    for name, module in model.named_modules():
        if module is model:
            continue
        conv1 = module._modules.get("conv1")
        if conv1 is not None and any(hasattr(module, marker) for marker in RESIDUAL_MARKERS):
            points.append(PerturbationPoint(f"{name}.conv1", conv1, "input"))
    if points:
        return points
    return [PerturbationPoint(name, module, "output") for name, module in model.named_modules()
            if module is not model and isinstance(module, ACTIVATIONS)]


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    """Logits in at least float32 for the loss (bf16 under autocast; float64 models stay float64)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


class _PointHooks:
    """Installs APART's hooks on the perturbation points for the duration of one pass only."""

    def __init__(self, points: Sequence[PerturbationPoint]):
        self.points = list(points)

    @contextmanager
    def _installed(self, fn) -> Iterator[None]:
        handles = []
        try:
            for i, point in enumerate(self.points):
                if point.where == "input":
                    handles.append(point.module.register_forward_pre_hook(
                        lambda module, args, i=i: self._pre(fn, i, args)))
                else:
                    handles.append(point.module.register_forward_hook(
                        lambda module, args, output, i=i: fn(i, output)))
            yield
        finally:
            for handle in handles:
                handle.remove()

    @staticmethod
    def _pre(fn, i: int, args: tuple) -> tuple | None:
        new = fn(i, args[0])
        return None if new is None else (new, *args[1:])

    def _once(self, seen: list, i: int) -> None:
        if seen[i]:
            raise RobustdropError(f"APART: the perturbation point {self.points[i].name} ran twice in one forward pass; "
                                  "layer-wise perturbations need modules called once per pass (use --no-layerwise)")
        seen[i] = True

    @contextmanager
    def record(self) -> Iterator[list[torch.Tensor | None]]:
        """Pass 1: collect the tensor at every point (unchanged)."""
        tensors: list[torch.Tensor | None] = [None] * len(self.points)
        seen = [False] * len(self.points)

        def fn(i: int, t: torch.Tensor) -> None:
            self._once(seen, i)
            tensors[i] = t
            return None

        with self._installed(fn):
            yield tensors

    @contextmanager
    def perturb(self, steps: torch.Tensor, signs: Sequence[torch.Tensor]) -> Iterator[None]:
        """Pass 2: add ``steps[i] · signs[i]`` at point ``i``."""
        seen = [False] * len(self.points)

        def fn(i: int, t: torch.Tensor) -> torch.Tensor:
            self._once(seen, i)
            if signs[i].shape != t.shape:
                raise RobustdropError(f"APART: the tensor at {self.points[i].name} changed shape between the passes "
                                      f"({tuple(signs[i].shape)} -> {tuple(t.shape)})")
            return t + steps[i] * signs[i]

        with self._installed(fn):
            yield


# ---------------------------------------------------------------------------------------------
# Ω: exact compact storage
# ---------------------------------------------------------------------------------------------


def omega_to_compact(omega: torch.Tensor) -> dict[str, Any]:
    """Exact, compact form of Ω: an int8 ``code`` (+1 / −1 where the entry is exactly ±1.0, else 0)
    and the float32 values of the other entries (``rest``, in flat order). Most entries are ±1
    after their first update (paper.md §4.3-9), so this is ≈ 1 byte per entry instead of 4."""
    omega = omega.detach()
    code = torch.zeros(omega.shape, dtype=torch.int8, device=omega.device)
    code.masked_fill_(omega == 1.0, 1)
    code.masked_fill_(omega == -1.0, -1)
    rest = omega[code == 0].clone()
    return {"shape": list(omega.shape), "code": code, "rest": rest}


def omega_from_compact(state: dict[str, Any], device: torch.device | str | None = None) -> torch.Tensor:
    """Inverse of :func:`omega_to_compact` (bit-exact)."""
    code = state["code"]
    if device is not None:
        code = code.to(device)
    if list(code.shape) != list(state["shape"]):
        raise ValueError(f"Ω code has shape {tuple(code.shape)}, expected {tuple(state['shape'])}")
    omega = code.to(torch.float32)
    rest = state["rest"].to(device=omega.device, dtype=torch.float32)
    mask = code == 0
    if int(mask.sum()) != rest.numel():
        raise ValueError(f"Ω state is inconsistent: {int(mask.sum())} free entries but {rest.numel()} values")
    omega[mask] = rest
    return omega


# ---------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------


class Apart(TrainingMethod):
    """APART (``name="apart"``) or FGSM+ (``name="fgsm+"``, no layer-wise perturbations).

    Args (all from the run's :class:`~robustdrop.engine.config.TrackConfig`):
        config: uses ``epsilon``, ``alpha`` (α when ``learned_step`` is off; default ε),
            ``apart_*``, ``learned_init``, ``learned_step``, ``layerwise``, ``attack_bn`` (``train``:
            pass 1 in train mode, so BN running statistics are updated by both passes, as the
            authors; ``eval``: pass 1 uses and keeps the running statistics), ``schedule``,
            ``lr_peak_at``, ``cycle_epochs``, ``lr_milestones``, ``lr_gamma``, ``momentum``.
        name: the method's name (metric ``source`` and training-metric ``attack``).
        layerwise: overrides ``config.layerwise`` (FGSM+ passes ``False``).
    """

    forward_passes = 2
    backward_passes = 2

    def __init__(self, config: Any, *, name: str = "apart", layerwise: bool | None = None):
        self.name = name
        self.config = config
        self.epsilon = float(config.epsilon)
        self.learned_init = bool(config.learned_init)
        self.learned_step = bool(config.learned_step)
        self.layerwise = bool(config.layerwise if layerwise is None else layerwise)
        self.bn_train = config.attack_bn == "train"
        self.fixed_alpha = float(config.alpha) if config.alpha is not None else self.epsilon
        for field in ("apart_alpha_init", "apart_alpha_omega_init", "apart_psi_lr", "apart_psi_weight_decay"):
            value = getattr(config, field)
            if not value >= 0 or math.isinf(value):
                raise RobustdropError(f"--{field.replace('_', '-')} must be a finite number >= 0, got {value}")
        omega_device = getattr(config, "apart_omega_device", "device")
        if omega_device not in ("device", "cpu"):
            raise RobustdropError(f"--apart-omega-device must be 'device' or 'cpu', got {omega_device!r}")
        self.omega_on_cpu = omega_device == "cpu"
        self.points: list[PerturbationPoint] = []
        self.omega: torch.Tensor | None = None

    # -- set-up -------------------------------------------------------------------------------
    def setup(self, model: nn.Module, ctx: MethodContext) -> None:
        cfg = self.config
        self.device = torch.device(ctx.device)
        if self.layerwise:
            self.points = find_perturbation_points(model)
            if not self.points:
                raise RobustdropError(f"APART found no layer-wise perturbation points in {type(model).__name__} (no "
                                      "residual block with conv1, no activation module); use --no-layerwise")
        self.hooks = _PointHooks(self.points)

        # ψ: the learned scalars (not in the model's optimizer).
        self.psi: dict[str, nn.Parameter] = {}
        if self.learned_step:
            self.psi["alpha"] = nn.Parameter(torch.tensor(float(cfg.apart_alpha_init), device=self.device))
            self.alpha = self.psi["alpha"]
        else:
            self.alpha = torch.tensor(self.fixed_alpha, device=self.device)
        if self.learned_init:
            self.psi["alpha_omega"] = nn.Parameter(torch.tensor(float(cfg.apart_alpha_omega_init), device=self.device))
        if self.layerwise:
            self.psi["alpha_b"] = nn.Parameter(torch.zeros(len(self.points), device=self.device))
        # ψ's momentum is cycled like the authors' CyclicLR (paper.md §4.2) where the schedule has a
        # cycle; the schedule's apply() sets it, the same code as the model's --cycle-momentum.
        cycle_momentum = bool(cfg.apart_psi_cycle_momentum) and cfg.schedule in CYCLIC
        self.psi_optimizer = (torch.optim.SGD(list(self.psi.values()), lr=0.0, momentum=float(cfg.momentum),
                                              weight_decay=float(cfg.apart_psi_weight_decay))
                              if self.psi else None)
        self.psi_schedule = Schedule.from_config(cfg, cfg.apart_psi_lr, ctx.total_steps, ctx.steps_per_epoch,
                                                 cycle_momentum=cycle_momentum)

        # Ω: per-example initialization in the padded frame, 0.001·N(0, 1) from the global CPU RNG
        # (the same numbers on CPU and CUDA).
        if self.learned_init:
            c, h, w = ctx.image_shape
            omega = torch.randn(ctx.num_train, c, h + 2 * OMEGA_PAD, w + 2 * OMEGA_PAD).mul_(OMEGA_INIT_STD)
            self.omega = omega if self.omega_on_cpu else omega.to(self.device)
        self._reset_stats()

    @property
    def point_names(self) -> list[str]:
        return [p.name for p in self.points]

    def stat_names(self) -> list[str]:
        names = ["alpha"] + (["alpha_omega"] if self.learned_init else [])
        names += [f"alpha_b{i + 1}" for i in range(len(self.points))]
        return names + ["delta_abs_mean", "delta_frac_at_eps"]

    def _reset_stats(self) -> None:
        self._stat_sum = torch.zeros(len(self.stat_names()), device=self.device)
        self._lr_sum = 0.0
        self._count = 0

    # -- Ω in the batch's frame -----------------------------------------------------------------
    def _omega_window(self, rows: torch.Tensor, crop: CropFlip | None, image_hw: tuple[int, int]) -> torch.Tensor:
        """The part of the padded rows that ``apply_crop_flip`` works on (a view of ``rows``)."""
        p = 0 if crop is None else crop.pad
        if p > OMEGA_PAD:
            raise RobustdropError(f"APART keeps Ω padded by {OMEGA_PAD} pixels, but the batch was cropped with pad {p}")
        off = OMEGA_PAD - p
        h, w = image_hw
        return rows[:, :, off:off + h + 2 * p, off:off + w + 2 * p]

    def read_omega(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rows, w)``: the batch's padded Ω rows (a copy on the training device) and ω in the
        batch's frame (its crop + flip applied; the unpadded centre window when ``batch.crop`` is None)."""
        assert self.omega is not None
        index = batch.index.to(self.omega.device)
        rows = self.omega.index_select(0, index).to(self.device, non_blocking=True)
        window = self._omega_window(rows, batch.crop, batch.x.shape[-2:])
        w = window.clone() if batch.crop is None else apply_crop_flip(window, batch.crop)
        return rows, w

    def write_omega(self, batch: Batch, rows: torch.Tensor, w: torch.Tensor) -> None:
        """Write ω (batch frame) back into Ω: the crop + flip are inverted, only the window changes."""
        assert self.omega is not None
        window = self._omega_window(rows, batch.crop, batch.x.shape[-2:])
        if batch.crop is None:
            window.copy_(w)
        else:
            invert_crop_flip(window, w, batch.crop)
        self.omega.index_copy_(0, batch.index.to(self.omega.device), rows.to(self.omega.device))

    # -- the objective --------------------------------------------------------------------------
    def objective(self, model: nn.Module, batch: Batch, w: torch.Tensor | None) -> dict[str, Any]:
        """Pass 1 and the forward half of pass 2 at the current θ, ψ and ω = ``w``.

        Returns ``loss`` (L₁, attached to θ and ψ), ``logits``, ``x1`` (the pass-2 input, gradient
        retained when Ω is learned) and ``delta`` (the ε-clipped δ before the [0, 1] clip).
        """
        x, y, eps = batch.x, batch.y, self.epsilon
        if w is not None:
            delta0 = (self.psi["alpha_omega"] * w).clamp(-eps, eps)
            x0 = (x + delta0).clamp(0.0, 1.0)
        else:
            delta0, x0 = None, x
        # Pass 1: gradients at the initialization point (no model gradients are accumulated).
        x0 = x0.detach().requires_grad_(True)
        with model_mode(model, self.bn_train), torch.enable_grad(), self.hooks.record() as recorded:
            loss0 = F.cross_entropy(_upcast(model(x0)), y)
        inputs = [x0] + [t for t in recorded if t is not None]
        grads = torch.autograd.grad(loss0, inputs, allow_unused=True)
        grad_x = grads[0]
        signs: list[torch.Tensor] = []
        it = iter(grads[1:])
        for t in recorded:
            if t is None:  # the point did not run: it cannot be perturbed either
                raise RobustdropError("APART: a layer-wise perturbation point was not reached in the forward pass")
            g = next(it)
            signs.append(torch.zeros_like(t) if g is None else g.sign().detach())
        del recorded, inputs, grads
        # Input step, differentiable in α and α_ω.
        step = self.alpha * grad_x.sign()
        delta = (step if delta0 is None else delta0 + step).clamp(-eps, eps)
        x1 = (x + delta).clamp(0.0, 1.0)
        if w is not None:
            x1.retain_grad()
        # Pass 2 (forward) with the layer-wise perturbations.
        with self.hooks.perturb(self.psi["alpha_b"] if self.layerwise else None, signs):
            logits = model(x1)
        loss = F.cross_entropy(_upcast(logits), y)
        return {"loss": loss, "logits": logits, "x1": x1, "delta": delta}

    # -- one step -------------------------------------------------------------------------------
    def train_step(self, model: nn.Module, batch: Batch, optimizer: torch.optim.Optimizer) -> StepOutput:
        lr_psi = self.psi_schedule.apply(self.psi_optimizer) if self.psi_optimizer is not None else \
            self.psi_schedule.current()
        rows, w = self.read_omega(batch) if self.learned_init else (None, None)

        out = self.objective(model, batch, w)
        loss, x1 = out["loss"], out["x1"]
        optimizer.zero_grad(set_to_none=True)
        for p in self.psi.values():
            p.grad = None
        loss.backward()

        # Ω update: an FGSM-like sign step at x₁ (layer noise active), with ψ before its update.
        if w is not None:
            ratio = self.alpha.detach() / (self.psi["alpha_omega"].detach() + RATIO_EPS)
            w_new = (w + ratio * x1.grad.sign()).clamp(-1.0, 1.0)
            self.write_omega(batch, rows, w_new)
        delta = x1.detach() - batch.x  # the perturbation the model is trained on
        stats = self._step_stats(delta)
        # ψ: gradient ascent (negated gradients; weight decay pulls ψ back to 0).
        if self.psi_optimizer is not None:
            for p in self.psi.values():
                if p.grad is not None:
                    p.grad.neg_()
            self.psi_optimizer.step()
            self.psi_optimizer.zero_grad(set_to_none=True)
        # θ: descent on L₁.
        optimizer.step()
        self.psi_schedule.step()
        self._stat_sum += stats
        self._lr_sum += lr_psi
        self._count += 1
        return StepOutput(loss.detach(), out["logits"].detach(), delta)

    def _step_stats(self, delta: torch.Tensor) -> torch.Tensor:
        """ψ as used in this step and the size of the trained-on δ, as one device tensor (no sync)."""
        values = [self.alpha.detach().float().reshape(1)]
        if self.learned_init:
            values.append(self.psi["alpha_omega"].detach().reshape(1))
        if self.layerwise:
            values.append(self.psi["alpha_b"].detach())
        mag = delta.detach().abs().float()
        values.append(mag.mean().reshape(1))
        values.append((mag >= self.epsilon * (1 - 1e-4)).float().mean().reshape(1))
        return torch.cat(values)

    # -- reporting ------------------------------------------------------------------------------
    def perturbation_spec(self) -> AttackSpec:
        return AttackSpec(self.name, self.epsilon, 1, math.nan if self.learned_step else self.fixed_alpha, 0)

    def epoch_metrics(self) -> dict[str, float]:
        """Epoch means over the steps since the last call (then reset)."""
        if self._count == 0:
            return {}
        means = (self._stat_sum / self._count).tolist()
        names = self.stat_names()
        metrics = dict(zip(names[:-2], means[:-2]))
        metrics["lr_psi"] = self._lr_sum / self._count
        metrics.update(zip(names[-2:], means[-2:]))
        self._reset_stats()
        return metrics

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "points": self.point_names,
            "psi": {k: p.detach().clone() for k, p in self.psi.items()},
            "psi_optimizer": self.psi_optimizer.state_dict() if self.psi_optimizer is not None else None,
            "psi_schedule": self.psi_schedule.state_dict(),
            "omega": omega_to_compact(self.omega) if self.omega is not None else None,
            "stats": {"sum": self._stat_sum.clone(), "lr_sum": self._lr_sum, "count": self._count},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["points"]) != self.point_names:
            raise ValueError(f"APART perturbation points differ: checkpoint {state['points']}, model {self.point_names}")
        if set(state["psi"]) != set(self.psi):
            raise ValueError(f"APART ψ differs: checkpoint {sorted(state['psi'])}, method {sorted(self.psi)}")
        with torch.no_grad():
            for k, p in self.psi.items():
                p.copy_(state["psi"][k])
        if self.psi_optimizer is not None:
            self.psi_optimizer.load_state_dict(state["psi_optimizer"])
        self.psi_schedule.load_state_dict(state["psi_schedule"])
        if (state["omega"] is None) != (self.omega is None):
            raise ValueError("APART: the checkpoint and the method disagree on the learned initialization Ω")
        if self.omega is not None:
            omega = omega_from_compact(state["omega"], "cpu" if self.omega_on_cpu else self.device)
            if omega.shape != self.omega.shape:
                raise ValueError(f"APART Ω has shape {tuple(omega.shape)}, expected {tuple(self.omega.shape)}")
            self.omega = omega
        stats = state["stats"]
        self._stat_sum = stats["sum"].to(self.device)
        self._lr_sum, self._count = float(stats["lr_sum"]), int(stats["count"])


@register_method("apart")
def _apart(config) -> TrainingMethod:
    return Apart(config, name="apart")


@register_method("fgsm+")
def _fgsm_plus(config) -> TrainingMethod:
    """FGSM+ as we read the paper (a hypothesis, paper.md E2): APART without layer-wise perturbations."""
    return Apart(config, name="fgsm+", layerwise=False)
