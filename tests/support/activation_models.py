"""Small nets with one elementwise activation written in one form (module, functional, tensor
method, in place), and one net with every form at once, each behind gates (sigmoid,
hard-sigmoid, tanh, softmax) that the rules must leave alone."""

from __future__ import annotations

import collections

import torch
import torch.nn.functional as F
from torch import nn

# name -> (kind, factory of the activation as a callable on a tensor: a module or a function).
ACTIVATION_FORMS = {
    "nn.ReLU": ("relu", lambda: nn.ReLU()),
    "nn.ReLU(inplace)": ("relu", lambda: nn.ReLU(inplace=True)),
    "F.relu": ("relu", lambda: F.relu),
    "F.relu(inplace)": ("relu", lambda: (lambda x: F.relu(x, inplace=True))),
    "F.relu_": ("relu", lambda: F.relu_),
    "torch.relu": ("relu", lambda: torch.relu),
    "torch.relu_": ("relu", lambda: torch.relu_),
    "Tensor.relu": ("relu", lambda: (lambda x: x.relu())),
    "Tensor.relu_": ("relu", lambda: (lambda x: x.relu_())),
    "nn.ReLU6": ("relu6", lambda: nn.ReLU6()),
    "nn.ReLU6(inplace)": ("relu6", lambda: nn.ReLU6(inplace=True)),
    "F.relu6": ("relu6", lambda: F.relu6),
    "F.relu6(inplace)": ("relu6", lambda: (lambda x: F.relu6(x, inplace=True))),
    "nn.Hardtanh": ("hardtanh", lambda: nn.Hardtanh(-0.5, 0.7)),
    "F.hardtanh": ("hardtanh", lambda: (lambda x: F.hardtanh(x, -0.5, 0.7))),
    "F.hardtanh_": ("hardtanh", lambda: (lambda x: F.hardtanh_(x, -0.5, 0.7))),
    "nn.LeakyReLU": ("leaky_relu", lambda: nn.LeakyReLU(0.1)),
    "F.leaky_relu(inplace)": ("leaky_relu", lambda: (lambda x: F.leaky_relu(x, 0.2, inplace=True))),
    "F.leaky_relu_": ("leaky_relu", lambda: (lambda x: F.leaky_relu_(x, 0.05))),
    "nn.PReLU": ("prelu", lambda: _prelu_module()),
    "F.prelu": ("prelu", lambda: (lambda x: F.prelu(x, torch.tensor([0.25])))),
    "nn.ELU": ("elu", lambda: nn.ELU(alpha=0.8)),
    "F.elu(inplace)": ("elu", lambda: (lambda x: F.elu(x, inplace=True))),
    "F.elu_": ("elu", lambda: F.elu_),
    "nn.SELU": ("selu", lambda: nn.SELU()),
    "torch.selu": ("selu", lambda: torch.selu),
    "torch.selu_": ("selu", lambda: torch.selu_),
    "nn.CELU": ("celu", lambda: nn.CELU(alpha=0.5)),
    "F.celu_": ("celu", lambda: F.celu_),
    "nn.GELU": ("gelu", lambda: nn.GELU()),
    "nn.GELU(tanh)": ("gelu", lambda: nn.GELU(approximate="tanh")),
    "F.gelu": ("gelu", lambda: F.gelu),
    "F.gelu(tanh)": ("gelu", lambda: (lambda x: F.gelu(x, approximate="tanh"))),
    "nn.SiLU": ("silu", lambda: nn.SiLU()),
    "nn.SiLU(inplace)": ("silu", lambda: nn.SiLU(inplace=True)),
    "F.silu": ("silu", lambda: F.silu),
    "nn.Mish": ("mish", lambda: nn.Mish()),
    "F.mish(inplace)": ("mish", lambda: (lambda x: F.mish(x, inplace=True))),
    "nn.Hardswish": ("hardswish", lambda: nn.Hardswish()),
    "nn.Hardswish(inplace)": ("hardswish", lambda: nn.Hardswish(inplace=True)),
    "F.hardswish": ("hardswish", lambda: F.hardswish),
    "nn.Softplus": ("softplus", lambda: nn.Softplus(beta=2.0)),
    "F.softplus": ("softplus", lambda: F.softplus),
}


def _prelu_module() -> nn.PReLU:
    module = nn.PReLU(6)
    with torch.no_grad():
        module.weight.copy_(torch.linspace(-0.3, 0.6, 6))
    return module


def _gated_tail(x: torch.Tensor) -> torch.Tensor:
    """Gates whose plain gradient every rule keeps: a sigmoid and a hard-sigmoid channel gate,
    tanh, and a softmax over positions."""
    gate = torch.sigmoid(x.mean(dim=(2, 3), keepdim=True)) + F.hardsigmoid(x.amax(dim=(2, 3), keepdim=True))
    x = torch.tanh(x * gate)
    weights = torch.softmax(x.flatten(2), dim=-1).view_as(x)
    return x * weights + 0.1 * x


class OneActivationNet(nn.Module):
    """conv -> the activation (at a fresh conv output, so in-place forms are legal) -> conv -> gates -> linear."""

    def __init__(self, form: str, classes: int = 5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.activation = ACTIVATION_FORMS[form][1]()   # a module is registered, a function kept as is
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 4, classes)

    def head(self, x):
        # The activation right after an affine prefix: integrated gradients splits there.
        return self.conv1(x)

    def tail(self, x):
        x = _gated_tail(self.conv2(x))
        return self.fc(F.adaptive_avg_pool2d(x, 2).flatten(1))

    def forward(self, x):
        return self.tail(self.activation(self.head(x)))


class EveryActivationNet(nn.Module):
    """Every form of :data:`ACTIVATION_FORMS` in one forward, each after its own 1x1 conv, with
    skips that read activation inputs again (so the rule must touch only the activation's own
    gradient path)."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.forms = list(ACTIVATION_FORMS)
        self.mixers = nn.ModuleList(nn.Conv2d(6, 6, 1) for _ in self.forms)
        self.activations = nn.ModuleDict()
        self._functions = {}
        for index, form in enumerate(self.forms):
            activation = ACTIVATION_FORMS[form][1]()
            if isinstance(activation, nn.Module):
                self.activations[str(index)] = activation
            else:
                self._functions[index] = activation
        self.fc = nn.Linear(6 * 4, classes)

    def forward(self, x):
        x = self.stem(x)
        for index, mixer in enumerate(self.mixers):
            pre = mixer(x) * 1.5
            skip = 0.3 * pre if index % 3 == 0 else 0.0   # the activation's input read again afterwards
            activation = self.activations[str(index)] if str(index) in self.activations else self._functions[index]
            # A residual chain, rescaled at each step, so neither signal nor gradient fades over 40 sites.
            x = x + activation(pre) + skip
            x = F.group_norm(x, 1)
        x = _gated_tail(x)
        return self.fc(F.adaptive_avg_pool2d(x, 2).flatten(1))


def expected_sites(forms) -> dict[str, int]:
    return dict(collections.Counter(ACTIVATION_FORMS[form][0] for form in forms))


def seeded_net(model: nn.Module, seed: int = 0) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    slopes = {id(module.weight) for module in model.modules() if isinstance(module, nn.PReLU)}
    with torch.no_grad():
        for parameter in model.parameters():
            if id(parameter) in slopes:
                continue   # PReLU slopes keep their chosen values
            fan_in = parameter[0].numel() if parameter.dim() > 1 else 1
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 2.0 / fan_in ** 0.5)
    return model.eval()
