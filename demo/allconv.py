"""All-Convolutional network for the shapes demo (Springenberg et al. 2015, "Striving for Simplicity").

Self-contained on purpose: TorchServe copies this file flat into the model archive, so it imports
only torch and builds with no arguments. Down-sampling is done by stride-2 convolutions, not
pooling; the classifier is a 1x1 convolution followed by global average pooling. Every ReLU is its
own non-inplace nn.ReLU module so that module-hook explainers (Captum) see each one.
"""

from __future__ import annotations

import torch
from torch import nn


class AllConvNet(nn.Module):
    # num_classes defaults to len(demo.shapes.CLASS_NAMES), hard-coded so this file stands alone.
    def __init__(self, num_classes: int = 5, width: int = 32) -> None:
        super().__init__()
        # (in, out, stride) per 3x3 conv; 64 -> 32 -> 16 -> 8 spatially. Striding from the first
        # layer keeps a CPU training step cheap; the receptive field (55 px) still spans the
        # largest shape (48 px).
        plan = [
            (3, width // 2, 2),
            (width // 2, width, 2),
            (width, width, 1),
            (width, 2 * width, 2),
            (2 * width, 2 * width, 1),
            (2 * width, 2 * width, 1),
        ]
        layers: list[nn.Module] = []
        for position, (in_channels, out_channels, stride) in enumerate(plan):
            layers += [
                nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
                self._normalization(position, out_channels),
                nn.ReLU(),
            ]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Conv2d(2 * width, num_classes, kernel_size=1)
        self.pool = nn.AdaptiveAvgPool2d(1)

    @staticmethod
    def _normalization(position: int, channels: int) -> nn.Module:
        if position == 0:
            # Colours are random, so the first layer's responses vary mostly with each image's
            # background level and contrast; per-image normalisation removes both, without which
            # training sits at chance for hundreds of steps. It acts the same in eval mode.
            return nn.InstanceNorm2d(channels, affine=True)
        # BatchNorm makes a from-scratch CPU run converge in about a minute; in eval mode (served,
        # explained) it is a fixed affine map.
        return nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images [B, 3, H, W] -> logits [B, num_classes]."""
        return self.pool(self.classifier(self.features(x))).flatten(1)
