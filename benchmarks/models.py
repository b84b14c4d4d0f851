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

from demo import allconv

from .resnet50_model import ResNet50

RESNET50_FILE = Path(__file__).with_name("resnet50_model.py")


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


def demo_model() -> tuple[nn.Module, str, Path]:
    """The demo's AllConvNet with seeded weights: the model, what it is, and the file that defines
    it (for a model archive)."""
    return seeded_init(allconv.AllConvNet()), "demo.allconv.AllConvNet", Path(allconv.__file__)


def resnet50() -> nn.Module:
    return seeded_init(ResNet50())
