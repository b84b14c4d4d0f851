"""The rule model of a model fx cannot trace: its own forward, every activation call intercepted."""

from __future__ import annotations

from torch import nn
from torch.overrides import TorchFunctionMode

from .activations import FUNCTION_KINDS, TENSOR_METHODS, refine_kind, split_inplace
from .rules import rule_activation

_INTERCEPTED = {**FUNCTION_KINDS, **TENSOR_METHODS}


class ActivationRuleMode(TorchFunctionMode):
    """Sends every activation call made during a forward to :func:`rule_activation` (this thread only).

    ``nn`` activation modules call the functions in ``torch.nn.functional``, so they are caught
    here too. While a mode handles a call it is switched off, so the call's own insides are not
    seen twice.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        entry = _INTERCEPTED.get(func)
        if entry is None:
            return func(*args, **kwargs)
        function, inplace = entry
        args, call_kwargs, inplace_flag = split_inplace(func, tuple(args), kwargs)
        kind = refine_kind(function, args, call_kwargs)
        if not (inplace or inplace_flag):
            return rule_activation(kind, function, *args, **call_kwargs)
        # Keep in-place semantics: the caller's tensor then holds the output, with its history. The
        # activation reads a copy: most activations' backward needs their input, which copy_ overwrites
        # (ReLU's needs only its output).
        inputs, rest = (args[0], args[1:]) if args else (call_kwargs.pop("input"), ())
        source = inputs if kind == "relu" else inputs.clone()
        return inputs.copy_(rule_activation(kind, function, source, *rest, **call_kwargs))


class ModeRuleModel(nn.Module):
    """Runs the model's own forward with every activation call intercepted (and so recorded)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        # Not registered as a submodule: this wrapper must never own or move the model.
        object.__setattr__(self, "wrapped", model)

    def forward(self, *args, **kwargs):
        with ActivationRuleMode():
            return self.wrapped(*args, **kwargs)
