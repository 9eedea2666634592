"""Accuracy and loss of a model on a labelled set, clean and under attacks."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from robustdrop.attacks import CLEAN, Attack, AttackSpec, model_mode
from robustdrop.data import iterate_eval


@dataclass
class EvalResult:
    split: str
    spec: AttackSpec
    acc: float
    loss: float
    n: int


def spec_of(attack: Attack | None) -> AttackSpec:
    """The spec of an evaluation attack (``None`` = clean)."""
    return CLEAN if attack is None else attack.spec()


def autocast_for(device: torch.device, enabled: bool) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of bf16 autocast contexts on CUDA (a no-op context elsewhere)."""
    if enabled and device.type == "cuda":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    attacks: Sequence[Attack | None],
    *,
    split: str,
    batch_size: int,
    device: torch.device,
    generator: torch.Generator | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    channels_last: bool = False,
) -> list[EvalResult]:
    """Evaluate ``model`` (in eval mode) on ``images`` (N, C, H, W) uint8 and ``labels`` (N,).

    ``attacks`` may contain ``None`` for clean accuracy. Each attack sees the same batches; random
    starts come from ``generator`` so evaluation never consumes the training's random state.
    """
    correct = {i: torch.zeros((), device=device) for i in range(len(attacks))}
    loss_sum = {i: torch.zeros((), device=device) for i in range(len(attacks))}
    n = 0
    with model_mode(model, False):
        for x, y in iterate_eval(images, labels, batch_size, device, channels_last=channels_last):
            n += len(y)
            for i, attack in enumerate(attacks):
                with autocast():
                    x_in = x if attack is None else x + attack(model, x, y, generator)
                    with torch.no_grad():
                        logits = model(x_in).float()
                correct[i] += (logits.argmax(1) == y).sum()
                loss_sum[i] += F.cross_entropy(logits, y, reduction="sum")
    return [
        EvalResult(split, spec_of(a), correct[i].item() / max(n, 1), loss_sum[i].item() / max(n, 1), n)
        for i, a in enumerate(attacks)
    ]
