"""Small models for the explainer tests, each written with one way of using ReLUs.

Every model with functional, in-place, reused or branching ReLUs also has ``reference_forward``:
the same computation written out with an explicit ``relu`` function, so a test can put a slow,
obvious implementation of a backward rule in place of every ReLU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def seeded(model: nn.Module, seed: int = 0) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    return model.eval()


class ModuleReluNet(nn.Module):
    """Only nn.ReLU modules, each used once, no branches: Captum's hooks are exact here."""

    def __init__(self, classes: int = 4):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, classes))

    def forward(self, x):
        return self.head(self.features(x))


class MixedReluNet(nn.Module):
    """Every way of writing a ReLU, a reused in-place module, and ReLU inputs feeding other branches."""

    def __init__(self, classes: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.conv3 = nn.Conv2d(6, 6, 3, padding=1)
        self.conv4 = nn.Conv2d(6, 6, 3, padding=1)
        self.shared_relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(6 * 16, classes)  # 16x16 input, pooled by 4

    def forward(self, x):
        a = self.conv1(x)
        b = F.relu(a)                       # functional; a also feeds the skip below
        c = self.conv2(b)
        c.relu_()                           # Tensor.relu_
        d = self.shared_relu(self.conv3(c)) + a   # reused in-place module, then skip from a
        e = torch.relu(d)                   # torch.relu; d also feeds the product below
        f = F.relu(self.conv4(e), inplace=True) * d.sigmoid()
        g = F.max_pool2d(f, 4)
        h = torch.relu_(g + 0.1)            # torch.relu_
        h = self.shared_relu(h)             # the same module again
        return self.fc(h.flatten(1).relu())  # Tensor.relu

    def reference_forward(self, x, relu):
        a = self.conv1(x)
        b = relu(a)
        c = relu(self.conv2(b))
        d = relu(self.conv3(c)) + a
        e = relu(d)
        f = relu(self.conv4(e)) * d.sigmoid()
        g = F.max_pool2d(f, 4)
        h = relu(relu(g + 0.1))
        return self.fc(relu(h.flatten(1)))


class BasicBlock(nn.Module):
    """A residual block with one ReLU module reused twice, as residual networks write it."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return self.relu(out)

    def reference_forward(self, x, relu):
        out = relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out)) + x
        return relu(out)


class TinyResNet(nn.Module):
    def __init__(self, classes: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2)
        self.block1 = BasicBlock(8)
        self.block2 = BasicBlock(8)
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        x = self.pool(self.relu(self.bn(self.stem(x))))
        x = self.block2(self.block1(x))
        return self.fc(x.mean(dim=(2, 3)))

    def reference_forward(self, x, relu):
        x = self.pool(relu(self.bn(self.stem(x))))
        x = self.block2.reference_forward(self.block1.reference_forward(x, relu), relu)
        return self.fc(x.mean(dim=(2, 3)))


class UntraceableNet(MixedReluNet):
    """Data-dependent control flow: torch.fx cannot trace it, so the intercepting fallback runs."""

    def forward(self, x):
        if x.sum() > -1e9:  # always true, but a Python branch on a tensor value
            return super().forward(x)
        return super().forward(-x)

    def reference_forward(self, x, relu):
        return super().reference_forward(x, relu)


def randomise_batchnorm(model: nn.Module, seed: int = 1) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
    return model


class ChannelsLastNet(nn.Module):
    """A Swin-like stage: its ``act`` outputs a channels-last map ``[B, 8, 8, 5]``."""

    def __init__(self, classes: int = 4):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.mix = nn.Linear(6, 5)
        self.act = nn.GELU()
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(20, classes))

    def forward(self, x):
        x = self.act(self.mix(self.conv(x).permute(0, 2, 3, 1)))
        return self.head(x.permute(0, 3, 1, 2))


class TokenNet(nn.Module):
    """A ViT-like model: a class token and a 4x4 grid of patch tokens; ``block`` outputs ``[B, 17, 6]``."""

    def __init__(self, classes: int = 4):
        super().__init__()
        self.patch = nn.Conv2d(3, 6, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, 6))
        self.block = nn.Sequential(nn.Linear(6, 6), nn.GELU())
        self.head = nn.Linear(17 * 6, classes)

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(len(x), -1, -1), tokens], dim=1)
        return self.head(self.block(tokens).flatten(1))
