"""Counting a model's FLOPs: what cost estimates (the GPU plan, benchmarks) are built on."""

from __future__ import annotations

import torch
from torch import nn


def forward_flops(model: nn.Module, image_shape: tuple[int, int, int]) -> float:
    """FLOPs of one forward pass of one image of ``image_shape`` ``(C, H, W)``: 2 per multiply-add
    of every convolution and linear layer. Batch norm, activations, pooling and additions are left
    out (under 1% of a ResNet's work).

    Examples:
        >>> from robustdrop.models import create_model
        >>> round(forward_flops(create_model("preactresnet18"), (3, 32, 32)) / 1e9, 2)   # GFLOP
        1.11
    """
    total = [0.0]

    def conv(mod: nn.Conv2d, _inp: tuple, out: torch.Tensor) -> None:
        k = mod.kernel_size[0] * mod.kernel_size[1] * mod.in_channels // mod.groups
        total[0] += 2.0 * out[0].numel() * k

    def linear(mod: nn.Linear, _inp: tuple, out: torch.Tensor) -> None:
        total[0] += 2.0 * out[0].numel() * mod.in_features

    handles = [m.register_forward_hook(conv) for m in model.modules() if isinstance(m, nn.Conv2d)]
    handles += [m.register_forward_hook(linear) for m in model.modules() if isinstance(m, nn.Linear)]
    device = next(model.parameters()).device
    modes = [m.training for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *image_shape, device=device))
    finally:
        for h in handles:
            h.remove()
        for module, mode in zip(model.modules(), modes):
            module.training = mode
    return total[0]
