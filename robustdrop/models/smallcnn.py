"""A small CNN with batch norm: fast on a CPU, deep enough to have residual-free hidden layers."""

from __future__ import annotations

from torch import nn

from robustdrop.models.registry import register_model


def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


@register_model("smallcnn")
def smallcnn(*, num_classes: int = 10, in_channels: int = 3, image_size: int = 32, width: float = 16) -> nn.Module:
    """conv-bn-relu x2 -> pool -> conv-bn-relu x2 -> pool -> linear; ``width`` filters in the first stage."""
    w = int(width)
    return nn.Sequential(
        _conv_bn(in_channels, w), _conv_bn(w, w), nn.MaxPool2d(2),
        _conv_bn(w, 2 * w), _conv_bn(2 * w, 2 * w), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(2 * w * (image_size // 4) ** 2, num_classes),
    )
