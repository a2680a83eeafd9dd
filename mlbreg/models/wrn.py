"""WideResNet (Zagoruyko & Komodakis, 2016); WRN-28-10 is ~5.25 GMAC at 32x32."""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from .registry import register_model


class WideBasic(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3 + shortcut."""

    def __init__(self, cin: int, cout: int, stride: int, dropout: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.dropout = dropout
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x):
        o = F.relu(self.bn1(x))
        # As in the reference code, a projection shortcut sees the
        # pre-activated input, an identity shortcut the raw one.
        skip = x if self.shortcut is None else self.shortcut(o)
        o = self.conv1(o)
        o = F.relu(self.bn2(o))
        if self.dropout > 0:
            o = F.dropout(o, p=self.dropout, training=self.training)
        return self.conv2(o) + skip


class WideResNet(nn.Module):
    def __init__(self, num_classes: int, in_shape, depth: int = 28, widen: int = 10, dropout: float = 0.0):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_shape[0], widths[0], 3, padding=1, bias=False)
        stages, cin = [], widths[0]
        for w, stride in zip(widths[1:], (1, 2, 2)):
            blocks = []
            for j in range(n):
                blocks.append(WideBasic(cin, w, stride if j == 0 else 1, dropout))
                cin = w
            stages.append(nn.Sequential(*blocks))
        self.block1, self.block2, self.block3 = stages
        self.bn = nn.BatchNorm2d(cin)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = F.relu(self.bn(x))
        return self.fc(self.pool(x).flatten(1))


@register_model("wrn28_10")
def wrn28_10(num_classes: int, in_shape, depth: int = 28, widen: int = 10, **kwargs) -> nn.Module:
    return WideResNet(num_classes, in_shape, depth=depth, widen=widen, **kwargs)
