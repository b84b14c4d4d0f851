"""Every elementwise activation our rules apply at, however a model writes it.

A call site is one of: an ``nn`` activation module, a function of ``torch.nn.functional`` or
``torch``, or the tensor method ``relu``/``relu_``, in place or not. Each is run out of place
(the in-place forms too: a rule needs the activation's own autograd node, and overwriting a
tensor another op saved would break autograd) and named by its kind:

    relu, relu6, hardtanh, leaky_relu, prelu, elu, selu, celu, gelu, silu, mish, hardswish, softplus

Every one of them is a single autograd node of ATen's (``GeluBackward0``, ``HardtanhBackward0``...),
whose backward is ``phi'(f) · R``. The rules are hooks on that node (``rules.py``). Gates and
normalisers (sigmoid and hard-sigmoid gates, softmax, tanh) are not here on purpose: they keep
their plain gradient.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

KINDS = ("relu", "relu6", "hardtanh", "leaky_relu", "prelu", "elu", "selu", "celu", "gelu", "silu", "mish",
         "hardswish", "softplus")


def _module_call(module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """An activation module's function, out of place, with the module's current parameters."""
    kind = type(module)
    if kind is nn.ReLU:
        return torch.relu(inputs)
    if kind is nn.ReLU6:
        return F.hardtanh(inputs, 0.0, 6.0)
    if kind is nn.Hardtanh:
        return F.hardtanh(inputs, module.min_val, module.max_val)
    if kind is nn.LeakyReLU:
        return F.leaky_relu(inputs, module.negative_slope)
    if kind is nn.PReLU:
        return F.prelu(inputs, module.weight)
    if kind is nn.ELU:
        return F.elu(inputs, module.alpha)
    if kind is nn.SELU:
        return F.selu(inputs)
    if kind is nn.CELU:
        return F.celu(inputs, module.alpha)
    if kind is nn.GELU:
        return F.gelu(inputs, approximate=module.approximate)
    if kind is nn.SiLU:
        return F.silu(inputs)
    if kind is nn.Mish:
        return F.mish(inputs)
    if kind is nn.Hardswish:
        return F.hardswish(inputs)
    return F.softplus(inputs, module.beta, module.threshold)


# Exact types only: a subclass may have a forward of its own (fx then traces into it anyway).
MODULE_KINDS: dict[type, str] = {
    nn.ReLU: "relu", nn.ReLU6: "relu6", nn.Hardtanh: "hardtanh", nn.LeakyReLU: "leaky_relu", nn.PReLU: "prelu",
    nn.ELU: "elu", nn.SELU: "selu", nn.CELU: "celu", nn.GELU: "gelu", nn.SiLU: "silu", nn.Mish: "mish",
    nn.Hardswish: "hardswish", nn.Softplus: "softplus",
}

# The out-of-place function of each kind, as calls name it after their ``inplace`` flag is dropped.
OUT_OF_PLACE: dict[str, Callable] = {
    "relu": torch.relu, "relu6": F.relu6, "hardtanh": F.hardtanh, "leaky_relu": F.leaky_relu, "prelu": F.prelu,
    "elu": F.elu, "selu": torch.selu, "celu": torch.celu, "gelu": F.gelu, "silu": F.silu, "mish": F.mish,
    "hardswish": F.hardswish, "softplus": F.softplus,
}

# function -> (kind, whether the call itself is in place)
FUNCTION_KINDS: dict[Callable, tuple[str, bool]] = {
    F.relu: ("relu", False), torch.relu: ("relu", False), F.relu_: ("relu", True), torch.relu_: ("relu", True),
    F.relu6: ("relu6", False),
    F.hardtanh: ("hardtanh", False), F.hardtanh_: ("hardtanh", True),
    F.leaky_relu: ("leaky_relu", False), F.leaky_relu_: ("leaky_relu", True),
    F.prelu: ("prelu", False),
    F.elu: ("elu", False), F.elu_: ("elu", True),
    F.selu: ("selu", False), torch.selu: ("selu", False), torch.selu_: ("selu", True),
    F.celu: ("celu", False), torch.celu: ("celu", False), torch.celu_: ("celu", True),
    F.gelu: ("gelu", False),
    F.silu: ("silu", False),
    F.mish: ("mish", False),
    F.hardswish: ("hardswish", False),
    F.softplus: ("softplus", False),
}
METHOD_KINDS: dict[str, tuple[str, bool]] = {"relu": ("relu", False), "relu_": ("relu", True)}
TENSOR_METHODS = {torch.Tensor.relu: METHOD_KINDS["relu"], torch.Tensor.relu_: METHOD_KINDS["relu_"]}


def _inplace_position(function: Callable) -> int | None:
    try:
        parameters = list(inspect.signature(function).parameters)
    except (TypeError, ValueError):  # builtins without a signature take no inplace flag
        return None
    return parameters.index("inplace") if "inplace" in parameters else None


_INPLACE_POSITIONS = {function: _inplace_position(function) for function in FUNCTION_KINDS}


def split_inplace(function: Callable, args: tuple, kwargs: dict) -> tuple[tuple, dict, bool]:
    """``args`` and ``kwargs`` of a call of ``function`` without its ``inplace`` flag, and the flag."""
    kwargs = dict(kwargs)
    inplace = bool(kwargs.pop("inplace", False))
    position = _INPLACE_POSITIONS.get(function)
    if position is not None and len(args) > position:
        inplace = inplace or bool(args[position])
        args = args[:position] + args[position + 1:]
    return args, kwargs, inplace


def refine_kind(kind: str, args: tuple, kwargs: dict) -> str:
    """``hardtanh`` clamped to [0, 6] is ReLU6 (``nn.ReLU6`` calls it so)."""
    if kind == "hardtanh":
        low = args[1] if len(args) > 1 else kwargs.get("min_val", -1.0)
        high = args[2] if len(args) > 2 else kwargs.get("max_val", 1.0)
        if low == 0 and high == 6:
            return "relu6"
    return kind


def module_activation(module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """The activation ``module`` computes, out of place."""
    return _module_call(module, inputs)
