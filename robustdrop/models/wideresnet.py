"""Wide residual networks (Zagoruyko & Komodakis 2016), WRN-depth-k, as adversarial-training
papers use them (Madry et al. 2018 and TRADES: WRN-34-10; N-FGSM / Rice et al. 2020: WRN-28-10).

Inputs in [0, 1], no normalisation layer, no dropout (the adversarial-training convention).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from robustdrop.errors import RobustdropError
from robustdrop.models.registry import register_model


class WideBasicBlock(nn.Module):
    """Pre-activation basic block: ``bn1 → relu → conv1 (stride) → bn2 → relu → conv2``, plus the
    identity or a 1×1 projection ``shortcut``.

    As in the original WRN, the projection shortcut takes the *activated* input
    ``relu(bn1(h))`` when the block changes width or resolution, the raw ``h`` otherwise.
    ``conv1`` receives ``relu(bn1(h))``: APART's generic rule (a module with ``conv1`` and a
    ``shortcut`` attribute) perturbs exactly there, as for :class:`PreActBlock`.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class WideResNet(nn.Module):
    """WRN-``depth``-``widen``: a 3×3 stem of 16 filters, three groups of ``n = (depth − 4) / 6``
    :class:`WideBasicBlock` of widths 16k, 32k, 64k (strides 1, 2, 2), BN-ReLU, global average
    pooling, linear.

    Args:
        depth: 6n + 4 (28 and 34 are the usual ones: 4 and 5 blocks per group).
        widen: the widen factor k (10 in this literature).
        num_classes, in_channels: output logits and input channels.

    Shape: (B, ``in_channels``, H, W) in [0, 1] → logits (B, ``num_classes``).

    Examples:
        >>> model = create_model("wideresnet", depth=34, width=10)   # WRN-34-10, 46.2 M parameters
        >>> model(torch.rand(8, 3, 32, 32)).shape
        torch.Size([8, 10])
    """

    def __init__(self, depth: int = 28, widen: int = 10, *, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise RobustdropError(f"--depth of a wideresnet must be 6n+4 with n >= 1 (e.g. 28 or 34), got {depth}")
        if widen < 1:
            raise RobustdropError(f"--width (the widen factor k) of a wideresnet must be >= 1, got {widen}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.depth, self.widen = depth, widen
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.in_planes = widths[0]
        self.layer1 = self._make_group(widths[1], n, stride=1)
        self.layer2 = self._make_group(widths[2], n, stride=2)
        self.layer3 = self._make_group(widths[3], n, stride=2)
        self.bn = nn.BatchNorm2d(widths[3])
        self.linear = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def _make_group(self, planes: int, n: int, stride: int) -> nn.Sequential:
        blocks = []
        for s in [stride] + [1] * (n - 1):
            blocks.append(WideBasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        out = F.relu(self.bn(out))
        out = F.adaptive_avg_pool2d(out, 1)
        return self.linear(out.flatten(1))


@register_model("wideresnet")
def wideresnet(*, num_classes: int = 10, in_channels: int = 3, image_size: int = 32, width: float = 10,
               depth: int = 28) -> nn.Module:
    """WRN-``depth``-``width``: ``--depth 28 --width 10`` (default) or ``--depth 34 --width 10``."""
    if float(width) != int(width):
        raise RobustdropError(f"--width of a wideresnet is the integer widen factor k (e.g. 10), got {width}")
    return WideResNet(int(depth), int(width), num_classes=num_classes, in_channels=in_channels)
