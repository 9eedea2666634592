"""Tensor measures shared by the diagnostics (pure functions, no run state).

Shapes: images and perturbations are ``(B, C, H, W)``; per-example results are ``(B,)`` float32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

Autocast = Callable[[], contextlib.AbstractContextManager]

_TINY = 1e-12


def per_example_cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of ``a[i]`` and ``b[i]`` (flattened), per example; 0 where either is 0."""
    a, b = a.flatten(1).float(), b.flatten(1).float()
    dot = (a * b).sum(1)
    norm = a.norm(dim=1) * b.norm(dim=1)
    return torch.where(norm > _TINY, dot / norm.clamp_min(_TINY), torch.zeros_like(dot))


def sign_agreement(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Fraction of coordinates where ``sign(a) == sign(b)``, per example (a 0 only agrees with a 0)."""
    return (a.sign() == b.sign()).flatten(1).float().mean(1)


def delta_autocorr(delta: torch.Tensor) -> torch.Tensor:
    """Spatial autocorrelation of δ at lag 1, per example.

    For each channel, the (uncentred) cosine between δ and δ shifted by one pixel, along the height
    and along the width; the mean over channels and the two axes. About 0 for i.i.d. sign noise,
    1 for a constant δ, −1 for a checkerboard; object-shaped (piecewise constant) δ is close to 1.
    A channel that is all zero counts as 0.
    """
    d = delta.float()

    def lag1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        dot = (a * b).sum((-2, -1))
        norm = (a.square().sum((-2, -1)) * b.square().sum((-2, -1))).sqrt()
        return torch.where(norm > _TINY, dot / norm.clamp_min(_TINY), torch.zeros_like(dot))

    along_h = lag1(d[..., 1:, :], d[..., :-1, :])  # (B, C)
    along_w = lag1(d[..., :, 1:], d[..., :, :-1])
    return 0.5 * (along_h + along_w).mean(1)


def delta_stats(delta: torch.Tensor, epsilon: float) -> dict[str, torch.Tensor]:
    """Per-example statistics of a perturbation: ``delta_abs_mean`` (mean |δ|, input units),
    ``delta_frac_at_eps`` (fraction of coordinates with |δ| >= 0.999 ε) and ``delta_autocorr``."""
    d = delta.float()
    flat = d.abs().flatten(1)
    return {
        "delta_abs_mean": flat.mean(1),
        "delta_frac_at_eps": (flat >= 0.999 * epsilon).float().mean(1),
        "delta_autocorr": delta_autocorr(d),
    }


def losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor, autocast: Autocast = contextlib.nullcontext) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example cross-entropy and the logits at ``x``, without gradients."""
    with torch.no_grad(), autocast():
        logits = model(x).float()
    return F.cross_entropy(logits, y, reduction="none"), logits


def loss_and_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor, autocast: Autocast = contextlib.nullcontext
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example loss, ∇ₓ of the summed loss (= per-example gradients) and the logits at ``x``.

    Uses ``torch.autograd.grad`` with respect to the input only: parameter ``.grad`` is untouched.
    """
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        with autocast():
            logits = model(x).float()
        loss = F.cross_entropy(logits, y, reduction="none")
        (grad,) = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), grad.detach(), logits.detach()


def take(batches: Iterator[tuple[torch.Tensor, torch.Tensor]], n: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``n`` examples of a stream of ``(x, y)`` batches (``n <= 0``: all of them)."""
    seen = 0
    for x, y in batches:
        if n > 0:
            if seen >= n:
                return
            x, y = x[: n - seen], y[: n - seen]
        seen += len(y)
        yield x, y


class Mean:
    """Running sums of per-example tensors, kept on the device (one ``.item()`` at the end)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, **values: torch.Tensor) -> None:
        for k, v in values.items():
            v = v.detach().float().sum()
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        if values:
            self.count += int(next(iter(values.values())).numel())

    def means(self) -> dict[str, float]:
        return {k: v.item() / max(self.count, 1) for k, v in self.sums.items()}

    def __bool__(self) -> bool:
        return self.count > 0
