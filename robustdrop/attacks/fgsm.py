"""FGSM (Goodfellow et al. 2015): one signed-gradient step of size ε from δ = 0."""

from __future__ import annotations

import torch
from torch import nn

from robustdrop.attacks.base import Attack, AttackSpec, input_gradient, project


class FGSM(Attack):
    """δ = clip(ε · sign(∇ₓ L(x, y))). Shapes as in :class:`Attack`."""

    name = "fgsm"

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        grad, _ = input_gradient(model, x, y, self.loss_fn)
        return project(x, self.epsilon * grad.sign(), self.epsilon)

    def spec(self) -> AttackSpec:
        return AttackSpec("fgsm", self.epsilon, 1, self.epsilon, 0)
