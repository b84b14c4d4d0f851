"""Models the benchmarks explain: a ResNet-50-shaped network and the demo's 64x64 shapes model.

torchvision does not work in this environment, so the ResNet-50 shape is written out here as
torchvision writes it: Bottleneck blocks [3, 4, 6, 3], widths 64..2048, BatchNorm, and one
``nn.ReLU(inplace=True)`` module reused three times inside each block. Weights are random but
seeded, with BatchNorm statistics set so activations neither vanish nor explode (a random
ResNet's logits are then of a realistic spread and the ReLU masks are mixed, as with real weights).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .standin_allconv import StandInAllConvNet


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)  # one module, three call sites, as torchvision has it
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet50(nn.Module):
    def __init__(self, num_classes: int = 1000, layers: tuple[int, ...] = (3, 4, 6, 3)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.in_channels = 64
        self.layer1 = self._stage(64, layers[0], 1)
        self.layer2 = self._stage(128, layers[1], 2)
        self.layer3 = self._stage(256, layers[2], 2)
        self.layer4 = self._stage(512, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * Bottleneck.expansion, num_classes)

    def _stage(self, width: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        out_channels = width * Bottleneck.expansion
        if stride != 1 or self.in_channels != out_channels:
            downsample = nn.Sequential(nn.Conv2d(self.in_channels, out_channels, 1, stride=stride, bias=False),
                                       nn.BatchNorm2d(out_channels))
        stage = [Bottleneck(self.in_channels, width, stride, downsample)]
        self.in_channels = out_channels
        stage += [Bottleneck(out_channels, width) for _ in range(1, blocks)]
        return nn.Sequential(*stage)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def seeded_init(model: nn.Module, seed: int = 0) -> nn.Module:
    """He-initialised convolutions, small random BatchNorm affine terms, all from one seed."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * (2.0 / fan_in) ** 0.5)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.BatchNorm2d):
                module.weight.copy_(1.0 + 0.1 * torch.randn(module.weight.shape, generator=generator))
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))
                module.running_mean.zero_()
                module.running_var.fill_(1.0)
    return model.eval()


STANDIN_FILE = Path(__file__).with_name("standin_allconv.py")


def demo_model() -> tuple[nn.Module, str, Path]:
    """The demo's AllConvNet when the demo package has it, else the stand-in of the same shape:
    the model, what it is, and the self-contained file that defines it (for a model archive)."""
    try:
        import demo.allconv as allconv  # type: ignore[import-not-found]
    except ImportError:
        return seeded_init(StandInAllConvNet()), "stand-in AllConvNet (demo.allconv not in this checkout)", STANDIN_FILE
    return seeded_init(allconv.AllConvNet()), "demo.allconv.AllConvNet", Path(allconv.__file__)


def resnet50() -> nn.Module:
    return seeded_init(ResNet50())
