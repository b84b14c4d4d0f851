"""A small VGG-style network with max pooling for the shapes demo: the second demo architecture.

The All-Convolutional Net (demo/allconv.py) has no pooling, so DeconvNet there has no switches.
This one down-samples by ``nn.MaxPool2d`` as VGG does (and as the networks Zeiler & Fergus and
Nie et al. analysed did): the backward pass of a max pool routes each gradient to the position
that won the forward max, which is exactly DeconvNet's "pooling switches".

Self-contained on purpose, like allconv.py: TorchServe copies this file flat into a model archive,
so it imports only torch and builds with no arguments. Every ReLU is its own non-inplace nn.ReLU
module so that module-hook explainers (Captum) see each one.
"""

from __future__ import annotations

import torch
from torch import nn


class MaxPoolNet(nn.Module):
    # num_classes defaults to len(demo.shapes.CLASS_NAMES), hard-coded so this file stands alone.
    def __init__(self, num_classes: int = 5, width: int = 32) -> None:
        super().__init__()
        # Stages of 3x3 convolutions at stride 1, each but the last closed by a 2x2 max pool:
        # 64 -> 32 -> 16 -> 8 spatially. The receptive field of the last convolution (54 px) spans
        # the largest shape (48 px), as AllConvNet's does.
        stages = [
            [(3, width // 2)],
            [(width // 2, width)],
            [(width, 2 * width)],
            [(2 * width, 2 * width), (2 * width, 2 * width)],
        ]
        layers: list[nn.Module] = []
        for index, stage in enumerate(stages):
            for in_channels, out_channels in stage:
                layers += [
                    nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
                    self._normalization(len(layers), out_channels),
                    nn.ReLU(),
                ]
            if index < len(stages) - 1:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(2 * width, num_classes)

    @staticmethod
    def _normalization(position: int, channels: int) -> nn.Module:
        if position == 0:
            # Colours are random: per-image normalisation of the first responses removes each
            # image's background level and contrast (see AllConvNet, where training otherwise sits
            # at chance for hundreds of steps).
            return nn.InstanceNorm2d(channels, affine=True)
        return nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images [B, 3, H, W] -> logits [B, num_classes]."""
        return self.classifier(self.pool(self.features(x)).flatten(1))
