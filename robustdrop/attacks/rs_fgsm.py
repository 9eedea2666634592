"""RS-FGSM (Wong et al. 2020, "Fast is better than free"): FGSM from a uniform random start."""

from __future__ import annotations

import torch
from torch import nn

from robustdrop.attacks.base import Attack, AttackSpec, input_gradient, project, uniform_noise


class RSFGSM(Attack):
    """δ₀ ~ U(−ε, ε); δ = clip(δ₀ + α · sign(∇ₓ L(x + δ₀, y))) with α = 1.25ε by default."""

    name = "rs-fgsm"

    def __init__(self, epsilon: float, *, step_size: float | None = None, **kwargs):
        super().__init__(epsilon, **kwargs)
        self.step_size = 1.25 * self.epsilon if step_size is None else float(step_size)

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        delta = project(x, uniform_noise(x, self.epsilon, generator), self.epsilon)
        grad, _ = input_gradient(model, x + delta, y, self.loss_fn)
        return project(x, delta + self.step_size * grad.sign(), self.epsilon)

    def spec(self) -> AttackSpec:
        return AttackSpec("rs-fgsm", self.epsilon, 1, self.step_size, 1)
