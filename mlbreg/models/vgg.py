"""VGG-16 with batch norm, CIFAR variant (single linear classifier, ~0.31 GMAC at 32x32)."""

from __future__ import annotations

import torch.nn as nn

from .registry import register_model

CFG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class VGG(nn.Module):
    def __init__(self, num_classes: int, in_shape, cfg=CFG16):
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_shape[0]
        for v in cfg:
            if v == "M":
                # ceil_mode keeps inputs smaller than 32x32 (e.g. 8x8) from
                # collapsing to 0x0 after five halvings.
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                cin = v
        self.features = nn.Sequential(*layers)
        # Adaptive pooling lets the same head serve 32x32 and 64x64 inputs.
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


@register_model("vgg16")
def vgg16(num_classes: int, in_shape, **kwargs) -> nn.Module:
    return VGG(num_classes, in_shape, cfg=CFG16, **kwargs)
