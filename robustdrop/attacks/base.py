"""The one small base class every L∞ attack shares."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from robustdrop.formatting import format_eps


@dataclass(frozen=True)
class AttackSpec:
    """How a perturbation was obtained; copied into every metric row measured under it."""

    attack: str
    epsilon: float = math.nan
    steps: int = 0
    step_size: float = math.nan
    restarts: int = 0

    def as_columns(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        if self.attack == "none":
            return "clean"
        eps = f"ε={format_eps(self.epsilon)}"
        if self.steps <= 1:
            smaller = self.step_size == self.step_size and self.step_size < self.epsilon * (1 - 1e-9)
            return f"{self.attack} ({eps}, step {format_eps(self.step_size)})" if smaller else f"{self.attack} ({eps})"
        return f"{self.attack}-{self.steps} ({eps}, step {format_eps(self.step_size)}, {self.restarts} restart(s))"


CLEAN = AttackSpec("none")


@contextmanager
def model_mode(model: nn.Module, train: bool) -> Iterator[None]:
    """Put ``model`` in train or eval mode for the block, then restore every module's own flag."""
    modes = [m.training for m in model.modules()]
    model.train(train)
    try:
        yield
    finally:
        for module, mode in zip(model.modules(), modes):
            module.training = mode


def project(x: torch.Tensor, delta: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Clip δ to the L∞ ball of radius ε and so that ``x + δ`` stays in [0, 1]."""
    delta = delta.clamp(-epsilon, epsilon)
    return (x + delta).clamp(0.0, 1.0) - x


def input_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn=None) -> tuple[torch.Tensor, torch.Tensor]:
    """∇ₓ of the summed loss at ``x`` (no parameter gradients are accumulated).

    Returns ``(grad, logits)``; ``grad`` has ``x``'s shape.
    """
    x = x.detach().requires_grad_(True)
    logits = model(x)
    loss = (loss_fn or F.cross_entropy)(logits.float(), y, reduction="sum")
    (grad,) = torch.autograd.grad(loss, x)
    return grad, logits.detach()


class Attack:
    """Base class of L∞ attacks in [0, 1] input space.

    Subclasses implement :meth:`perturb`. Calling the attack runs the model in eval mode (or train
    mode with ``train_mode=True``, which uses and updates batch-norm batch statistics, as
    single-step adversarial training usually does) and restores each module's mode afterwards.

    Shapes: ``x`` (B, C, H, W) float in [0, 1]; ``y`` (B,) int64; returns δ (B, C, H, W) with
    ``|δ| <= ε`` and ``x + δ`` in [0, 1].
    """

    name = "attack"

    def __init__(self, epsilon: float, *, train_mode: bool = False, loss_fn=None):
        if not 0 < epsilon <= 1:
            raise ValueError(f"epsilon must be in (0, 1], got {epsilon}")
        self.epsilon = float(epsilon)
        self.train_mode = train_mode
        self.loss_fn = loss_fn

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError

    def spec(self) -> AttackSpec:
        raise NotImplementedError

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Return δ for the batch (see class docstring for shapes)."""
        with model_mode(model, self.train_mode), torch.enable_grad():
            return self.perturb(model, x, y, generator).detach()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec().describe()}, train_mode={self.train_mode})"


def uniform_noise(x: torch.Tensor, epsilon: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """δ ~ U(−ε, ε) of ``x``'s shape (drawn on the generator's device, then moved)."""
    device = generator.device if generator is not None else x.device
    noise = torch.rand(x.shape, generator=generator, device=device, dtype=x.dtype)
    return ((2 * noise - 1) * epsilon).to(x.device)


def sign_noise(x: torch.Tensor, epsilon: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """δ = ε·s with s uniform random signs, of ``x``'s shape."""
    device = generator.device if generator is not None else x.device
    bits = torch.randint(0, 2, x.shape, generator=generator, device=device)
    return ((2 * bits - 1).to(dtype=x.dtype) * epsilon).to(x.device)
