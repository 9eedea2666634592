"""PreActResNet-18 as in the fast_adversarial code (inputs in [0, 1], no normalisation), and the
APART authors' variant whose projection shortcut takes the block's raw input (paper.md §4.3-5)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from robustdrop.models.registry import register_model


class PreActBlock(nn.Module):
    """Pre-activation basic block.

    ``conv1`` receives the block's pre-activated input ``relu(bn1(h))``; APART's layer-wise
    perturbation is added exactly there (a forward pre-hook on ``conv1``), so the block needs no
    special flags.

    Args:
        raw_shortcut: the projection shortcut takes the un-activated input ``h`` (the APART
            authors' ``models/preresnet.py``) instead of ``relu(bn1(h))`` (canonical).
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, *, raw_shortcut: bool = False):
        super().__init__()
        self.raw_shortcut = raw_shortcut
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        # Canonical PreActResNet: the projection shortcut takes the activated input.
        if self.shortcut is None:
            shortcut = x
        else:
            shortcut = self.shortcut(x if self.raw_shortcut else out)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    def __init__(self, num_blocks: list[int], *, num_classes: int, in_channels: int, width: float, image_size: int,
                 raw_shortcut: bool = False):
        super().__init__()
        self.raw_shortcut = raw_shortcut
        widths = [max(1, round(w * width)) for w in (64, 128, 256, 512)]
        self.in_planes = widths[0]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        layers = []
        for i, (planes, n) in enumerate(zip(widths, num_blocks)):
            layers.append(self._make_layer(planes, n, stride=1 if i == 0 else 2))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.bn = nn.BatchNorm2d(widths[3])
        self.linear = nn.Linear(widths[3], num_classes)
        self.pool = image_size // 8

    def _make_layer(self, planes: int, n: int, stride: int) -> nn.Sequential:
        blocks = []
        for s in [stride] + [1] * (n - 1):
            blocks.append(PreActBlock(self.in_planes, planes, s, raw_shortcut=self.raw_shortcut))
            self.in_planes = planes
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.relu(self.bn(out))
        out = F.avg_pool2d(out, self.pool)
        return self.linear(out.flatten(1))


@register_model("preactresnet18")
def preactresnet18(*, num_classes: int = 10, in_channels: int = 3, image_size: int = 32, width: float = 1.0) -> nn.Module:
    """PreActResNet-18: PreActBlock x [2, 2, 2, 2], widths 64-128-256-512 times ``width``."""
    return PreActResNet([2, 2, 2, 2], num_classes=num_classes, in_channels=in_channels, width=width, image_size=image_size)


@register_model("preactresnet18-apart")
def preactresnet18_apart(*, num_classes: int = 10, in_channels: int = 3, image_size: int = 32,
                         width: float = 1.0) -> nn.Module:
    """PreActResNet-18 of the APART authors' code (``models/preresnet.py``, their ``preact20``): the
    projection shortcuts take the block's un-activated input (paper.md §4.3-5). Same parameters
    and state-dict keys as ``preactresnet18``."""
    return PreActResNet([2, 2, 2, 2], num_classes=num_classes, in_channels=in_channels, width=width,
                        image_size=image_size, raw_shortcut=True)
