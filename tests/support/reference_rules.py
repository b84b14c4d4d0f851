"""Slow, plain backward rules written straight from the papers, for comparison with our kernels.

With R the gradient arriving at an activation's output, f its input and phi' its derivative:

* saliency (the plain gradient):  ``phi'(f) * R``
* guided backprop:                ``phi'(f) * max(R, 0)``
* deconvnet:                      ``max(R, 0)``

Two ways in:

* :func:`reference_attribution` runs a test model's ``reference_forward``, which calls the explicit
  ReLU it is handed at every ReLU (the small nets of ``support.models``).
* :func:`explicit_rule_attribution` runs any model's own ``forward`` under
  :class:`ExplicitRuleMode`, a ``TorchFunctionMode`` that replaces every elementwise activation
  call (module, functional, tensor method, in-place) by an ``autograd.Function`` whose backward
  carries the rule, with ``phi'`` taken by autograd from the activation itself. Gates and
  normalisers (sigmoid, hard-sigmoid, tanh, softmax) are left alone. The mode also counts the call
  sites per activation kind, to compare with ``Explanation.rule_sites``.

Nothing here imports the product's kernels: the point is an independent second implementation.
"""

from __future__ import annotations

import collections
import copy

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

RULES = ("saliency", "guided_backprop", "deconvnet")

ACTIVATION_KINDS = ("relu", "relu6", "hardtanh", "leaky_relu", "prelu", "elu", "selu", "celu",
                    "gelu", "silu", "mish", "hardswish", "softplus")


def _apply_rule(rule: str, slope: torch.Tensor | None, incoming: torch.Tensor) -> torch.Tensor:
    if rule == "saliency":
        return slope * incoming
    if rule == "guided_backprop":
        return slope * incoming.clamp(min=0)
    if rule == "deconvnet":
        return incoming.clamp(min=0)
    raise ValueError(f"unknown rule {rule!r}")


class ExplicitRule(torch.autograd.Function):
    """``phi`` forward; backward: the rule, with ``phi'(f)`` from autograd on ``phi`` itself."""

    @staticmethod
    def forward(ctx, f, phi, rule):
        ctx.save_for_backward(f)
        ctx.phi = phi
        ctx.rule = rule
        return phi(f)

    @staticmethod
    def backward(ctx, incoming):
        (f,) = ctx.saved_tensors
        slope = None
        if ctx.rule != "deconvnet":
            with torch.enable_grad():
                point = f.detach().requires_grad_(True)
                value = ctx.phi(point)
                # Elementwise: the vector-Jacobian product with ones is the derivative itself.
                (slope,) = torch.autograd.grad(value, point, torch.ones_like(value))
        return _apply_rule(ctx.rule, slope, incoming), None, None


def _rule_relu(name: str):
    def relu(f):
        return ExplicitRule.apply(f, torch.relu, name)

    return relu


def reference_attribution(model, inputs: torch.Tensor, targets: torch.Tensor, rule: str) -> torch.Tensor:
    """d logit[target] / d input through ``model.reference_forward`` with the explicit rule at each ReLU."""
    x = inputs.detach().clone().requires_grad_(True)
    logits = model.reference_forward(x, _rule_relu(rule))
    picked = logits[torch.arange(len(targets)), targets]
    (gradient,) = torch.autograd.grad(picked.sum(), x)
    return gradient


# --- every activation, intercepted in the model's own forward --------------------------------------

def _bind_relu(input=None, inplace=False, *, self=None):
    return (input if input is not None else self), torch.relu, inplace


def _hardtanh_kind(min_val, max_val):
    return "relu6" if (float(min_val), float(max_val)) == (0.0, 6.0) else "hardtanh"


def _bind_hardtanh(input=None, min_val=-1.0, max_val=1.0, inplace=False, *, self=None):
    x = input if input is not None else self
    return x, (lambda f: F.hardtanh(f, min_val, max_val)), inplace, _hardtanh_kind(min_val, max_val)


def _bind_relu6(input=None, inplace=False, *, self=None):
    x = input if input is not None else self
    return x, (lambda f: F.hardtanh(f, 0.0, 6.0)), inplace


def _bind_leaky_relu(input=None, negative_slope=0.01, inplace=False, *, self=None):
    x = input if input is not None else self
    return x, (lambda f: F.leaky_relu(f, negative_slope)), inplace


def _bind_prelu(input=None, weight=None, *, self=None):
    x = input if input is not None else self
    fixed = weight.detach()
    return x, (lambda f: F.prelu(f, fixed)), False


def _bind_elu(input=None, alpha=1.0, inplace=False, *, self=None):
    x = input if input is not None else self
    return x, (lambda f: F.elu(f, alpha)), inplace


def _bind_selu(input=None, inplace=False, *, self=None):
    x = input if input is not None else self
    return x, F.selu, inplace


def _bind_celu(input=None, alpha=1.0, inplace=False, *, self=None):
    x = input if input is not None else self
    return x, (lambda f: F.celu(f, alpha)), inplace


def _bind_gelu(input=None, approximate="none", *, self=None):
    x = input if input is not None else self
    return x, (lambda f: F.gelu(f, approximate=approximate)), False


def _bind_silu(input=None, inplace=False, *, self=None):
    x = input if input is not None else self
    return x, F.silu, inplace


def _bind_mish(input=None, inplace=False, *, self=None):
    x = input if input is not None else self
    return x, F.mish, inplace


def _bind_hardswish(input=None, inplace=False, *, self=None):
    x = input if input is not None else self
    return x, F.hardswish, inplace


def _bind_softplus(input=None, beta=1.0, threshold=20.0, *, self=None):
    x = input if input is not None else self
    return x, (lambda f: F.softplus(f, beta, threshold)), False


# kind, binder, names of the callables per namespace; the trailing "_" forms are in place.
_FORMS = (
    ("relu", _bind_relu, ["relu", "relu_"]),
    ("relu6", _bind_relu6, ["relu6", "relu6_"]),
    (None, _bind_hardtanh, ["hardtanh", "hardtanh_"]),
    ("leaky_relu", _bind_leaky_relu, ["leaky_relu", "leaky_relu_"]),
    ("prelu", _bind_prelu, ["prelu"]),
    ("elu", _bind_elu, ["elu", "elu_"]),
    ("selu", _bind_selu, ["selu", "selu_"]),
    ("celu", _bind_celu, ["celu", "celu_"]),
    ("gelu", _bind_gelu, ["gelu", "gelu_"]),
    ("silu", _bind_silu, ["silu", "silu_"]),
    ("mish", _bind_mish, ["mish", "mish_"]),
    ("hardswish", _bind_hardswish, ["hardswish", "hardswish_"]),
    ("softplus", _bind_softplus, ["softplus"]),
)


def _activation_table() -> dict:
    """callable -> (kind or None for hardtanh, binder, in place by name)."""
    table = {}
    for kind, binder, names in _FORMS:
        for name in names:
            for namespace in (F, torch, torch.Tensor, torch._C._nn):
                function = getattr(namespace, name, None)
                if function is not None and function not in table:
                    table[function] = (kind, binder, name.endswith("_"))
    return table


_ACTIVATIONS = _activation_table()


class ExplicitRuleMode(TorchFunctionMode):
    """Every elementwise activation call of a forward replaced by :class:`ExplicitRule` (this
    thread only); ``sites`` counts the calls per kind. In-place forms keep their semantics: the
    caller's tensor receives the result, with the rule's history."""

    def __init__(self, rule: str):
        super().__init__()
        if rule not in RULES:
            raise ValueError(f"unknown rule {rule!r}")
        self.rule = rule
        self.sites: collections.Counter = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        entry = _ACTIVATIONS.get(func)
        if entry is None:
            return func(*args, **kwargs)
        kind, binder, inplace_by_name = entry
        bound = binder(*args, **kwargs)
        if kind is None:
            inputs, phi, inplace, kind = bound
        else:
            inputs, phi, inplace = bound
        inplace = bool(inplace) or inplace_by_name
        self.sites[kind] += 1
        if not inplace:
            return ExplicitRule.apply(inputs, phi, self.rule)
        # The rule's node saves its own copy of f: the caller's tensor is overwritten just below.
        output = ExplicitRule.apply(inputs.clone(), phi, self.rule)
        return inputs.copy_(output)


def logits_from(output):
    """The logits of a classifier's output: the tensor itself, or the first tensor of a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find logits in a {type(output).__name__}")


def explicit_rule_attribution(model, inputs: torch.Tensor, targets: torch.Tensor, rule: str,
                              *, copy_model: bool = True) -> tuple[torch.Tensor, dict[str, int]]:
    """``(d logit[target] / d input, sites per kind)`` with the explicit rule at every activation.

    Runs on a deep copy of ``model`` in eval mode (``copy_model=False`` runs on the model itself,
    for models too big to copy; the mode changes nothing on the model either way).
    """
    subject = copy.deepcopy(model) if copy_model else model
    training = {module: module.training for module in subject.modules()}
    subject.eval()
    try:
        x = inputs.detach().clone().requires_grad_(True)
        mode = ExplicitRuleMode(rule)
        with torch.enable_grad():
            with mode:
                logits = logits_from(subject(x))
            picked = logits[torch.arange(len(targets)), targets]
            (gradient,) = torch.autograd.grad(picked.sum(), x)
    finally:
        for module, flag in training.items():
            module.training = flag
    return gradient, dict(mode.sites)
