"""What a training method is: one optimisation step on a batch, plus the state it carries."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from robustdrop.attacks import Attack, AttackSpec
from robustdrop.data import Batch


@dataclass
class StepOutput:
    """What one training step produced (all detached).

    loss: scalar, the mean training loss the model was updated on.
    logits: (B, classes) on the training inputs ``batch.x + delta``.
    delta: (B, C, H, W) the input perturbation the model was trained on.
    """

    loss: torch.Tensor
    logits: torch.Tensor
    delta: torch.Tensor


@dataclass
class MethodContext:
    """What a method may need to set itself up."""

    num_train: int                 # examples in the training tensor (``Batch.index`` ranges over it)
    image_shape: tuple[int, int, int]
    total_steps: int               # optimizer steps in the whole run
    steps_per_epoch: int
    device: torch.device


class TrainingMethod:
    """Base class. Subclasses implement :meth:`train_step`.

    ``forward_passes`` / ``backward_passes`` count full-model passes per step (the cost model).
    """

    name = "method"
    forward_passes = 2
    backward_passes = 2

    def setup(self, model: nn.Module, ctx: MethodContext) -> None:
        """Allocate per-run state (called once, before any step or ``load_state_dict``)."""

    def train_step(self, model: nn.Module, batch: Batch, optimizer: torch.optim.Optimizer) -> StepOutput:
        raise NotImplementedError

    def perturbation_spec(self) -> AttackSpec:
        """The spec recorded with training-set metrics."""
        raise NotImplementedError

    def epoch_metrics(self) -> dict[str, float]:
        """Internal values to log once per epoch (e.g. APART's learned step sizes)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def descend(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One SGD step of the model on CE(model(x), y). Returns (loss, logits), detached."""
    logits = model(x)
    loss = F.cross_entropy(logits.float(), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), logits.detach()


class AttackTraining(TrainingMethod):
    """Adversarial training on the perturbations of a fixed attack (FGSM, RS-FGSM, PGD-k)."""

    def __init__(self, name: str, attack: Attack):
        self.name = name
        self.attack = attack
        steps = attack.spec().steps
        self.forward_passes = self.backward_passes = steps + 1

    def train_step(self, model: nn.Module, batch: Batch, optimizer: torch.optim.Optimizer) -> StepOutput:
        delta = self.attack(model, batch.x, batch.y)
        loss, logits = descend(model, optimizer, batch.x + delta, batch.y)
        return StepOutput(loss, logits, delta)

    def perturbation_spec(self) -> AttackSpec:
        return self.attack.spec()
