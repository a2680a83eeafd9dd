"""Small models for quick experiments on tiny images (8x8 digits, MNIST, CIFAR)."""

from __future__ import annotations

import math

import torch.nn as nn

from .registry import register_model


class MLP(nn.Module):
    """flatten -> [Linear -> ReLU] * len(hidden) -> Linear."""

    def __init__(self, num_classes: int, in_shape, hidden=(256, 128)):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(in_shape)
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class ConvNet(nn.Module):
    """conv(C->32) conv(32->64) maxpool conv(64->64) global-avgpool linear.

    Padding keeps the spatial size, and the single max-pool halves it once, so
    anything from 8x8 (4x4 after pooling) upwards works; the adaptive pool
    makes the classifier independent of the input size.
    """

    def __init__(self, num_classes: int, in_shape, width: int = 1):
        super().__init__()
        c1, c2 = 32 * width, 64 * width
        self.features = nn.Sequential(
            *_conv_bn_relu(in_shape[0], c1),
            *_conv_bn_relu(c1, c2),
            nn.MaxPool2d(2),
            *_conv_bn_relu(c2, c2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.fc = nn.Linear(c2, num_classes)

    def forward(self, x):
        return self.fc(self.features(x))


@register_model("mlp")
def mlp(num_classes: int, in_shape, hidden=(256, 128), **kwargs) -> nn.Module:
    return MLP(num_classes, in_shape, hidden=list(hidden), **kwargs)


@register_model("convnet")
def convnet(num_classes: int, in_shape, width: int = 1, **kwargs) -> nn.Module:
    return ConvNet(num_classes, in_shape, width=width, **kwargs)
