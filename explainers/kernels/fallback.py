"""The rule model of a model fx cannot trace: its own forward, every ReLU call intercepted."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .rules import rule_relu

_OUT_OF_PLACE_RELUS = {F.relu, torch.relu, torch.Tensor.relu}
_IN_PLACE_RELUS = {torch.relu_, F.relu_, torch.Tensor.relu_}


class ReluRuleMode(TorchFunctionMode):
    """Sends every ReLU call made during a forward to :func:`rule_relu` (this thread only)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _OUT_OF_PLACE_RELUS or func in _IN_PLACE_RELUS:
            inputs = args[0] if args else kwargs["input"]
            inplace = func in _IN_PLACE_RELUS or kwargs.get("inplace", args[1] if len(args) > 1 else False)
            output = rule_relu(inputs)
            if not inplace:
                return output
            # Keep in-place semantics: the caller's tensor now holds the output, with its history.
            return inputs.copy_(output)
        return func(*args, **kwargs)


class ModeRuleModel(nn.Module):
    """Runs the model's own forward with every ReLU call intercepted (and so recorded)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        # Not registered as a submodule: this wrapper must never own or move the model.
        object.__setattr__(self, "wrapped", model)

    def forward(self, *args, **kwargs):
        with ReluRuleMode():
            return self.wrapped(*args, **kwargs)
