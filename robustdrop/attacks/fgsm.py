"""FGSM (Goodfellow et al. 2015): one signed-gradient step from δ = 0, of size ε or a smaller α."""

from __future__ import annotations

import torch
from torch import nn

from robustdrop.attacks.base import Attack, AttackSpec, input_gradient, project


class FGSM(Attack):
    """δ = clip(α · sign(∇ₓ L(x, y))) with α = ε by default. Shapes as in :class:`Attack`.

    Args:
        epsilon: the L∞ radius.
        step_size: α ≤ ε. A smaller step gives a weaker FGSM whose δ has ``|δ| = α`` (where
            ``x + δ`` stays in [0, 1]): the matched-strength control of APART's small learned
            perturbations (docs/collapse-prediction.md).

    Examples:
        >>> FGSM(8 / 255).spec().step_size == 8 / 255
        True
        >>> FGSM(10 / 255, step_size=2.6 / 255).spec().describe()
        'fgsm (ε=10/255, step 2.6/255)'
    """

    name = "fgsm"

    def __init__(self, epsilon: float, *, step_size: float | None = None, **kwargs):
        super().__init__(epsilon, **kwargs)
        self.step_size = self.epsilon if step_size is None else float(step_size)
        if not 0 < self.step_size <= self.epsilon * (1 + 1e-9):
            raise ValueError(f"FGSM step must be in (0, ε={self.epsilon:.6g}], got {self.step_size:.6g}")

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        grad, _ = input_gradient(model, x, y, self.loss_fn)
        return project(x, self.step_size * grad.sign(), self.epsilon)

    def spec(self) -> AttackSpec:
        return AttackSpec("fgsm", self.epsilon, 1, self.step_size, 0)
