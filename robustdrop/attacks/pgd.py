"""PGD-k (Madry et al. 2018) with random start and restarts, L∞, in [0, 1] input space."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from robustdrop.attacks.base import Attack, AttackSpec, input_gradient, project, uniform_noise
from robustdrop.attacks.losses import loss_name


class PGD(Attack):
    """k signed-gradient steps of size ``step_size``, projected to the ε-ball and [0, 1] each step.

    Every example is updated for all k steps (no early exit once misclassified, which weakens PGD).
    With ``restarts > 1`` the attack keeps, per example, the restart with the highest final loss
    (a misclassified restart always beats a correctly classified one).
    """

    name = "pgd"

    def __init__(self, epsilon: float, *, steps: int = 10, step_size: float | None = None,
                 random_start: bool = True, restarts: int = 1, **kwargs):
        super().__init__(epsilon, **kwargs)
        if steps < 1 or restarts < 1:
            raise ValueError("PGD needs steps >= 1 and restarts >= 1")
        self.steps = int(steps)
        self.step_size = epsilon / 4 if step_size is None else float(step_size)
        self.random_start = random_start
        self.restarts = int(restarts)

    def _one_run(self, model, x, y, generator):
        delta = uniform_noise(x, self.epsilon, generator) if self.random_start else torch.zeros_like(x)
        delta = project(x, delta, self.epsilon)
        for _ in range(self.steps):
            grad, _ = input_gradient(model, x + delta, y, self.loss_fn)
            delta = project(x, delta + self.step_size * grad.sign(), self.epsilon)
        return delta

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        best = self._one_run(model, x, y, generator)
        if self.restarts == 1:
            return best
        with torch.no_grad():
            best_score = self._score(model, x + best, y)
        for _ in range(self.restarts - 1):
            delta = self._one_run(model, x, y, generator)
            with torch.no_grad():
                score = self._score(model, x + delta, y)
            better = score > best_score
            best = torch.where(better.view(-1, 1, 1, 1), delta, best)
            best_score = torch.maximum(score, best_score)
        return best

    def _score(self, model, x_adv, y):
        logits = model(x_adv).float()
        loss = (self.loss_fn or F.cross_entropy)(logits, y, reduction="none")
        # Misclassification dominates; among equals the higher loss wins.
        return loss + 1e6 * (logits.argmax(1) != y).float()

    def spec(self) -> AttackSpec:
        # another loss is another attack in the metric rows (``pgd-cw``), not a second "pgd"
        name = "pgd" if self.loss_fn is None else f"pgd-{loss_name(self.loss_fn)}"
        return AttackSpec(name, self.epsilon, self.steps, self.step_size, self.restarts)
