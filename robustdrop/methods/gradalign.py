"""GradAlign (Andriushchenko & Flammarion 2020, "Understanding and Improving Fast Adversarial
Training", NeurIPS; arXiv 2007.02617): FGSM training plus a gradient-alignment regulariser.

One step::

    g₁ = ∇ₓ CE(f(x), y)                                     # FGSM gradient at the clean input
    δ  = clip(ε·sign(g₁), ±ε), x + δ in [0, 1]              # FGSM from zero
    η  ~ U(−ε, ε)^d
    g₂ = ∇ₓ CE(f(x + η), y)                                 # kept in the graph (double backprop)
    R  = λ·(1 − mean_i cos(g₁,ᵢ, g₂,ᵢ))                     # cos of flattened per-example gradients
    θ ← θ − lr·∇θ [CE(f(x + δ), y) + R]

Conventions from the authors' code (github.com/tml-epfl/understanding-fast-adv-training at
commit ceed494):

* λ = 0.2 for ε = 8/255 on CIFAR-10 (``sh/exps_diff_eps_cifar10.sh:48`` and the README's
  command); their other ε use λ(ε) = exp(ln(10)·ε/8 + ln 0.02) with ε in 1/255 units
  (``sh/exps_diff_eps_cifar10.sh:40``; 0.356 at ε = 10/255, 2.0 at 16/255). robustdrop's
  default is 0.2 whatever ε is; set ``--gradalign-lambda`` for other radii;
* the FGSM step starts from zero (``--attack_init=zero`` in every GradAlign command) with step
  1.25ε clipped back to ±ε, i.e. exactly ε·sign(g₁) (train.py:143-144, 164-170);
* g₁ is the gradient of the FGSM pass at the clean input, *detached* (train.py:160-162; the
  README notes that back-propagating through one of the two gradients is enough,
  README.md:63-69);
* η ~ U(−ε, ε) per pixel (utils.py:147-151), and ``x + η`` is NOT clipped to [0, 1]
  (utils.py:81) — followed here;
* both gradients are of the batch-mean cross-entropy with the model in train mode;
  g₂ with ``create_graph=True`` (utils.py:70-91);
* cos over each example's flattened gradient, examples where either gradient is exactly zero are
  left out, mean over the rest (train.py:194-200); here the mean over the kept examples is
  computed with a mask (no host sync), and R = 0 if none is kept.

The batch-norm mode of the three passes follows ``--attack-bn`` for the FGSM pass (default
``train``, as the authors) and the training mode for the other two.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from robustdrop.attacks import AttackSpec, input_gradient, model_mode, project, uniform_noise
from robustdrop.data import Batch
from robustdrop.errors import RobustdropError
from robustdrop.methods.base import StepOutput, TrainingMethod
from robustdrop.methods.registry import register_method

DEFAULT_LAMBDA = 0.2  # the authors' λ for ε = 8/255 on CIFAR-10


def alignment_cos(g1: torch.Tensor, g2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cosine of per-example gradients, over examples where neither gradient is zero.

    Shape: ``g1``, ``g2`` (B, ...) → ``(mean_cos, kept)``: a scalar (differentiable through both
    inputs; 1 when no example is kept, so the regulariser is 0) and the number of kept examples.
    """
    a, b = g1.flatten(1).float(), g2.flatten(1).float()
    na, nb = a.norm(dim=1), b.norm(dim=1)
    keep = (na > 0) & (nb > 0)
    cos = (a * b).sum(1) / (na * nb).where(keep, torch.ones_like(na))
    kept = keep.sum()
    mean = torch.where(kept > 0, (cos * keep).sum() / kept.clamp(min=1), torch.ones_like(na[0]))
    return mean, kept


class GradAlign(TrainingMethod):
    """FGSM + GradAlign (``name="gradalign"``).

    Args:
        epsilon: L∞ radius ε of FGSM and of the noise η.
        lam: λ, the regulariser's weight (default 0.2, the authors' value for ε = 8/255).
        train_mode: the FGSM pass with batch-norm in train mode (the authors' setting).

    Shape:
        ``batch.x`` (B, C, H, W) in [0, 1] → ``StepOutput.delta``: the FGSM δ, ``|δ| <= ε``,
        ``x + δ`` in [0, 1]. ``StepOutput.loss`` is the cross-entropy on ``x + δ`` (without R);
        the epoch means of R and of the cosine are logged as ``gradalign_reg`` and
        ``gradalign_cos`` (``source=gradalign``, ``split=train``; not computed when λ = 0).

    Examples:
        >>> method = GradAlign(8 / 255, lam=0.2)
        >>> out = method.train_step(model, batch, optimizer)
    """

    name = "gradalign"
    # Forward: FGSM, training, g₂. Backward (nominal): FGSM, g₂, the training loss, and the double
    # backward through g₂'s graph (≈ 2). Measured ≈ 3.1× FGSM's step (benchmarks/bench_baselines.py, cnn1).
    forward_passes = 3
    backward_passes = 5

    def __init__(self, epsilon: float, *, lam: float = DEFAULT_LAMBDA, train_mode: bool = True):
        if not 0 < epsilon <= 1:
            raise RobustdropError(f"--epsilon must be in (0, 1], got {epsilon}")
        if not lam >= 0 or math.isinf(lam):
            raise RobustdropError(f"--gradalign-lambda must be a finite number >= 0, got {lam}")
        self.epsilon = float(epsilon)
        self.lam = float(lam)
        self.train_mode = train_mode
        self._reset_stats()

    def _reset_stats(self) -> None:
        self._sums: torch.Tensor | None = None  # (R, cos) summed over steps, on the device
        self._count = 0

    def regularizer(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, g1: torch.Tensor,
                    noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(R, mean cos)`` with R attached to the model's parameters (double backprop).

        ``g1`` (B, C, H, W): the gradient at ``x`` (detached); ``noise``: η (default U(−ε, ε)
        from the global RNG).
        """
        eta = uniform_noise(x, self.epsilon) if noise is None else noise
        x2 = (x + eta).detach().requires_grad_(True)
        loss2 = F.cross_entropy(model(x2).float(), y)
        (g2,) = torch.autograd.grad(loss2, x2, create_graph=True)
        cos, _ = alignment_cos(g1.detach(), g2)
        return self.lam * (1.0 - cos), cos

    def train_step(self, model: nn.Module, batch: Batch, optimizer: torch.optim.Optimizer) -> StepOutput:
        x, y = batch.x, batch.y
        with model_mode(model, self.train_mode), torch.enable_grad():
            g1, _ = input_gradient(model, x, y)
        delta = project(x, self.epsilon * g1.sign(), self.epsilon).detach()
        logits = model(x + delta)
        loss = F.cross_entropy(logits.float(), y)
        total = loss
        if self.lam > 0:  # λ = 0 is plain FGSM (no third pass)
            reg, cos = self.regularizer(model, x, y, g1)
            total = loss + reg
            stats = torch.stack([reg.detach().float(), cos.detach().float()])
            self._sums = stats if self._sums is None else self._sums + stats
            self._count += 1
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        return StepOutput(loss.detach(), logits.detach(), delta)

    def perturbation_spec(self) -> AttackSpec:
        return AttackSpec(self.name, self.epsilon, 1, self.epsilon, 0)

    def epoch_metrics(self) -> dict[str, float]:
        """Epoch means of R and of the mean cosine since the last call (then reset)."""
        if self._count == 0 or self._sums is None:
            return {}
        reg, cos = (self._sums / self._count).tolist()
        self._reset_stats()
        return {"gradalign_reg": reg, "gradalign_cos": cos}


@register_method("gradalign")
def _gradalign(config: Any) -> TrainingMethod:
    if config.alpha is not None and abs(config.alpha - config.epsilon) > 1e-12:
        raise RobustdropError("--method gradalign steps exactly ε (FGSM from zero, as the authors); drop --alpha")
    return GradAlign(config.epsilon, lam=config.gradalign_lambda, train_mode=config.attack_bn == "train")
