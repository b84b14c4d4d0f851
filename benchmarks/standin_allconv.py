"""Stand-in for the demo's AllConvNet while demo/ is not in this checkout: same shape (64x64 inputs,
5 classes, stride-2 3x3 convolutions with batch norm and ReLU, a 1x1 classifier, global average
pooling). Self-contained (imports torch only, one nn.Module class) so it can go into a model archive.
"""

from __future__ import annotations

import torch
from torch import nn


class StandInAllConvNet(nn.Module):
    def __init__(self, num_classes: int = 5, width: int = 32):
        super().__init__()
        plan = [(3, width // 2, 2), (width // 2, width, 2), (width, width, 1),
                (width, 2 * width, 2), (2 * width, 2 * width, 1), (2 * width, 2 * width, 1)]
        layers: list[nn.Module] = []
        for in_channels, out_channels, stride in plan:
            layers += [nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
                       nn.BatchNorm2d(out_channels), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Conv2d(2 * width, num_classes, kernel_size=1)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.classifier(self.features(x))).flatten(1)
