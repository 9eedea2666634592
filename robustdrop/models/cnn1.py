"""One-conv-layer network: the smallest model in which catastrophic overfitting was shown
(Andriushchenko & Flammarion 2020, Fig. 11)."""

from __future__ import annotations

import torch
from torch import nn

from robustdrop.models.registry import register_model


class CNN1(nn.Module):
    """conv3x3(``width`` filters) -> ReLU -> linear. Input (B, C, H, W) in [0, 1] -> logits (B, classes)."""

    def __init__(self, *, num_classes: int, in_channels: int, image_size: int, width: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, width, 3, padding=1)
        self.act = nn.ReLU()
        self.linear = nn.Linear(width * image_size * image_size, num_classes)
        for layer in (self.conv, self.linear):
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.act(self.conv(x)).flatten(1))


@register_model("cnn1")
def cnn1(*, num_classes: int = 10, in_channels: int = 3, image_size: int = 32, width: float = 4) -> nn.Module:
    return CNN1(num_classes=num_classes, in_channels=in_channels, image_size=image_size, width=int(width))
