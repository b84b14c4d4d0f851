"""LRP rules at layer sites: epsilon, z+, gamma, flat, w^2 and z^B, on batch-norm-merged layers.

Each rule gets a :class:`~.layer_sites.SiteCall`, the layer's input ``x``, its output ``z`` (after
the merged batch norm) and the gradient ``g`` arriving at ``z``, whose relevance is ``R = z * g``
(``layer_sites.py``). It returns the gradient for ``x`` (``x * g_x = R_x``), a rescaled gradient for
``z`` that the layer's own backward carries on (epsilon), or the relevance ``R_x`` itself (rules
that do not multiply by the input: flat, w^2, z^B). Definitions follow zennit's rules
(``zennit.rules``: Epsilon, ZPlus, Gamma, Flat, WSquare, ZBox), with its stabiliser
``z + (1[z=0] + sign(z)) * eps``; the modified layers run locally on the saved input, under autograd
for their transposed product. Only the merged parameters (``W·s``, ``b·s + t`` for a batch norm
``y·s + t``) are ever modified, as copies cached per layer until a weight or statistic changes.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedModelError
from .batchnorm import _batch_norm_affine
from .layer_sites import BATCH_NORM, LINEAR, SiteCall

DEFAULT_STABILIZER = 1e-6  # zennit's default for every rule


def stabilize(value: torch.Tensor, epsilon: float = DEFAULT_STABILIZER) -> torch.Tensor:
    """``value + (1[value=0] + sign(value)) * epsilon``: away from zero, keeping the sign (zero -> +)."""
    return value + ((value == 0).to(value.dtype) + value.sign()) * epsilon


class _Merged:
    """A layer's merged parameters and their modified copies (cached; holds no module)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.weight, self.bias = weight, bias
        self.modified: dict[str, torch.Tensor | None] = {}


class _MergedLayer:
    """A site's layer with its batch norm merged in: ``z = forward(x, W, b)``, and modified copies."""

    def __init__(self, call: SiteCall, merged: _Merged):
        self.call, self._merged = call, merged
        self.weight, self.bias = merged.weight, merged.bias

    def forward(self, inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        kind = self.call.kind
        if kind == BATCH_NORM:
            shape = (1, -1) + (1,) * (inputs.dim() - 2)
            out = inputs * weight.view(shape)
            return out if bias is None else out + bias.view(shape)
        if kind == LINEAR:
            return F.linear(inputs, weight, bias)
        return self.call.layer._conv_forward(inputs, weight, bias)

    def parameter(self, name: str, make: Callable[[], torch.Tensor | None]) -> torch.Tensor | None:
        modified = self._merged.modified
        if name not in modified:
            modified[name] = make()
        return modified[name]


_lock = threading.Lock()
# owner module (the layer, or a lone batch norm) -> (identities and versions of the sources, merged
# parameters); the values hold no module, so the cache never keeps a model alive
_merged_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def merged_layer(call: SiteCall) -> _MergedLayer:
    """The site's layer with its batch norm merged in (cached while no weight or statistic changes).

    Raises:
        UnsupportedModelError: a batch norm without running statistics, or one after a linear layer
            whose output is not ``[N, features]``.
    """
    layer, norm = call.layer, call.batch_norm
    owner = layer if layer is not None else norm
    sources = [getattr(layer, "weight", None), getattr(layer, "bias", None)]
    if norm is not None:
        if norm.running_mean is None or norm.running_var is None:
            raise UnsupportedModelError("lrp merges batch norms into the layer before them and needs their running "
                                        "statistics (track_running_stats=False has none)")
        sources += [norm.running_mean, norm.running_var, norm.weight, norm.bias]
    key = (tuple(id(t) for t in sources), tuple(-1 if t is None else t._version for t in sources),
           None if norm is None else norm.eps)
    cached = _merged_cache.get(owner)
    if cached is not None and cached[0] == key:
        return _MergedLayer(call, cached[1])
    with torch.no_grad():
        if layer is None:  # a lone batch norm: a diagonal linear layer
            weight, bias = _batch_norm_affine(norm)
        else:
            weight = layer.weight.detach()
            bias = None if layer.bias is None else layer.bias.detach()
            if norm is not None:
                scale, shift = _batch_norm_affine(norm)
                weight = weight * scale.view((-1,) + (1,) * (weight.dim() - 1))
                bias = shift if bias is None else bias * scale + shift
    merged = _Merged(weight, bias)
    with _lock:
        _merged_cache[owner] = (key, merged)
    return _MergedLayer(call, merged)


def _leaf(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().requires_grad_(True)


def _clamp(tensor: torch.Tensor | None, minimum=None, maximum=None) -> torch.Tensor | None:
    return None if tensor is None else tensor.clamp(min=minimum, max=maximum)


def _gamma_mod(tensor: torch.Tensor | None, gamma: float, minimum=None, maximum=None) -> torch.Tensor | None:
    return None if tensor is None else tensor + gamma * tensor.clamp(min=minimum, max=maximum)


def epsilon_rule(epsilon: float):
    """LRP-epsilon: ``R_x = x * W^T (R_z / stab(z))``, i.e. the gradient at ``z`` times ``z / stab(z)``,
    carried on by the layer's own backward. ``z / stab(z) = |z| / (|z| + eps)`` (zero at ``z = 0``)."""
    def rule(call, x, z, g):
        magnitude = z.abs()
        return "output_gradient", g * magnitude.div_(magnitude + epsilon)
    return rule


def _non_negative(x: torch.Tensor) -> bool:
    return x.numel() == 0 or bool(x.min() >= 0)


def z_plus_rule(call: SiteCall, x: torch.Tensor, z: torch.Tensor, g: torch.Tensor):
    """z+ (alpha1-beta0, zennit's ZPlus): ``z+ = W+ x+ + b+ + W- x-``,
    ``R_x = x+ * W+^T s + x- * W-^T s`` with ``s = R_z / stab(z+)``."""
    layer = merged_layer(call)
    w_pos = layer.parameter("w+", lambda: layer.weight.clamp(min=0))
    b_pos = layer.parameter("b+", lambda: _clamp(layer.bias, minimum=0))
    relevance = z * g
    with torch.enable_grad():
        if _non_negative(x):  # after a ReLU: the x- half is zero
            # z+ >= 0 here, so stab(z+) = z+ + eps: the stabiliser rides in the bias, for free.
            b_stable = layer.parameter("b+eps", lambda: _shifted(b_pos, layer.weight.shape[0], layer.weight))
            x_pos = _leaf(x)
            z_pos = layer.forward(x_pos, w_pos, b_stable)
            (gradient,) = torch.autograd.grad(z_pos, x_pos, relevance.div_(z_pos.detach()))
            return "gradient", gradient
        w_neg = layer.parameter("w-", lambda: layer.weight.clamp(max=0))
        x_pos, x_neg = _leaf(x.clamp(min=0)), _leaf(x.clamp(max=0))
        z_pos = layer.forward(x_pos, w_pos, b_pos) + layer.forward(x_neg, w_neg, None)
        grad_pos, grad_neg = torch.autograd.grad(z_pos, (x_pos, x_neg), relevance / stabilize(z_pos.detach()))
    return "gradient", torch.where(x > 0, grad_pos, grad_neg)


def _shifted(bias: torch.Tensor | None, channels: int, like: torch.Tensor) -> torch.Tensor:
    base = torch.zeros(channels, dtype=like.dtype, device=like.device) if bias is None else bias
    return base + DEFAULT_STABILIZER


def gamma_rule(gamma: float):
    """Generalised gamma (zennit's Gamma; Montavon et al. 2019 for non-negative inputs): where
    ``z > 0`` relevance follows ``(W + γW+) x+ + (b + γb+) + (W + γW-) x-``, where ``z < 0``
    ``(W + γW-) x+ + (b + γb-) + (W + γW+) x-``."""
    def rule(call, x, z, g):
        layer = merged_layer(call)
        w_up = layer.parameter(f"w_up{gamma}", lambda: _gamma_mod(layer.weight, gamma, minimum=0))
        w_down = layer.parameter(f"w_down{gamma}", lambda: _gamma_mod(layer.weight, gamma, maximum=0))
        b_up = layer.parameter(f"b_up{gamma}", lambda: _gamma_mod(layer.bias, gamma, minimum=0))
        b_down = layer.parameter(f"b_down{gamma}", lambda: _gamma_mod(layer.bias, gamma, maximum=0))
        relevance = z * g
        positive = relevance * (z > 0)
        negative = relevance * (z < 0)
        has_negative_inputs = not _non_negative(x)
        with torch.enable_grad():
            x_pos = _leaf(x.clamp(min=0)) if has_negative_inputs else _leaf(x)
            leaves = [x_pos]
            outputs, weights = [], []
            up = layer.forward(x_pos, w_up, b_up)
            if has_negative_inputs:
                x_neg = _leaf(x.clamp(max=0))
                leaves.append(x_neg)
                up = up + layer.forward(x_neg, w_down, None)
            outputs.append(up)
            weights.append(positive / stabilize(up.detach()))
            if bool(negative.any()):
                down = layer.forward(x_pos, w_down, b_down)
                if has_negative_inputs:
                    down = down + layer.forward(x_neg, w_up, None)
                outputs.append(down)
                weights.append(negative / stabilize(down.detach()))
            gradients = torch.autograd.grad(outputs, leaves, weights)
        if has_negative_inputs:
            return "gradient", torch.where(x > 0, gradients[0], gradients[1])
        return "gradient", gradients[0]
    return rule


def _constant_input_rule(call, x, z, g, weight_name: str, make_weight, make_bias):
    layer = merged_layer(call)
    weight = layer.parameter(weight_name, make_weight(layer))
    bias = layer.parameter(weight_name + "_bias", make_bias(layer))
    with torch.enable_grad():
        ones = _leaf(torch.ones_like(x))
        out = layer.forward(ones, weight, bias)
        (relevance,) = torch.autograd.grad(out, ones, z * g / stabilize(out.detach()))
    return "relevance", relevance


def flat_rule(call, x, z, g):
    """Flat (zennit's Flat): inputs and weights taken as ones, no bias: ``R_z`` spread evenly over
    each output's receptive field."""
    return _constant_input_rule(call, x, z, g, "flat", lambda layer: lambda: torch.ones_like(layer.weight),
                                lambda layer: lambda: None)


def w_square_rule(call, x, z, g):
    """w^2 (zennit's WSquare): inputs taken as ones, weights and bias squared."""
    return _constant_input_rule(call, x, z, g, "w2", lambda layer: lambda: layer.weight ** 2,
                                lambda layer: lambda: None if layer.bias is None else layer.bias ** 2)


def box_rule(low: torch.Tensor | Callable[[torch.Tensor], torch.Tensor],
             high: torch.Tensor | Callable[[torch.Tensor], torch.Tensor]):
    """z^B (zennit's ZBox; Montavon et al. 2017) for inputs bounded by ``low <= x <= high``:
    ``z^B = W x - W+ l - W- h`` (biases cancel), ``R_x = x W^T s - l W+^T s - h W-^T s``."""
    def rule(call, x, z, g):
        layer = merged_layer(call)
        w_pos = layer.parameter("w+", lambda: layer.weight.clamp(min=0))
        w_neg = layer.parameter("w-", lambda: layer.weight.clamp(max=0))
        b_pos = layer.parameter("b+", lambda: _clamp(layer.bias, minimum=0))
        b_neg = layer.parameter("b-", lambda: _clamp(layer.bias, maximum=0))
        lows = (low(x) if callable(low) else low).to(x).expand_as(x)
        highs = (high(x) if callable(high) else high).to(x).expand_as(x)
        with torch.enable_grad():
            leaves = (_leaf(x), _leaf(lows), _leaf(highs))
            outputs = (layer.forward(leaves[0], layer.weight, layer.bias), layer.forward(leaves[1], w_pos, b_pos),
                       layer.forward(leaves[2], w_neg, b_neg))
            denominator = outputs[0].detach() - outputs[1].detach() - outputs[2].detach()
            s = z * g / stabilize(denominator)
            gradients = torch.autograd.grad(outputs, leaves, (s, s, s))
        return "relevance", x * gradients[0] - lows * gradients[1] - highs * gradients[2]
    return rule


def pass_rule(call, x, z, g):
    """An elementwise activation passes relevance unchanged, ``R_x = R_z``: ``g_x = g z / x``."""
    safe = torch.where(x == 0, torch.ones_like(x), x)
    return "gradient", torch.where(x == 0, torch.zeros_like(g), g * z / safe)


def constant_scale_normalisation(module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """``module``'s output with its scale (the standard deviation it divides by) held constant:
    ``(x - mean(x)) / stop_gradient(std(x)) * w + b``, a linear map of ``x`` (Ali et al. 2022's
    LN-rule; LXT uses it for layer norms). Instance norms with running statistics in eval mode
    normalise by those: a diagonal affine map, as they really compute it."""
    if isinstance(module, nn.GroupNorm):
        grouped = inputs.reshape(inputs.shape[0], module.num_groups, -1)
        mean = grouped.mean(dim=-1, keepdim=True)
        scale = torch.rsqrt(grouped.detach().var(dim=-1, unbiased=False, keepdim=True) + module.eps)
        normalised = ((grouped - mean) * scale).reshape(inputs.shape)
        shape = (1, -1) + (1,) * (inputs.dim() - 2)
    elif isinstance(module, nn.LayerNorm):
        dims = tuple(range(inputs.dim() - len(module.normalized_shape), inputs.dim()))
        mean = inputs.mean(dim=dims, keepdim=True)
        scale = torch.rsqrt(inputs.detach().var(dim=dims, unbiased=False, keepdim=True) + module.eps)
        normalised = (inputs - mean) * scale
        shape = module.normalized_shape
    else:  # instance norm
        dims = tuple(range(2, inputs.dim()))
        if module.track_running_stats and not module.training and module.running_mean is not None:
            channel = (1, -1) + (1,) * len(dims)
            mean = module.running_mean.view(channel)
            scale = torch.rsqrt(module.running_var + module.eps).view(channel)
        else:
            mean = inputs.mean(dim=dims, keepdim=True)
            scale = torch.rsqrt(inputs.detach().var(dim=dims, unbiased=False, keepdim=True) + module.eps)
        normalised = (inputs - mean) * scale
        shape = (1, -1) + (1,) * len(dims)
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    if weight is not None:
        normalised = normalised * weight.detach().reshape(shape)
    if bias is not None:
        normalised = normalised + bias.detach().reshape(shape)
    return normalised


def normalisation_rule(epsilon: float):
    """Epsilon over a normalisation with its scale held constant (:func:`constant_scale_normalisation`):
    ``R_x = x * A^T (R_z / stab(z))`` with ``A`` that linear map. The module's own backward would also
    differentiate the scale, which takes relevance from nowhere; this backward does not."""
    def rule(call, x, z, g):
        magnitude = z.abs()
        signal = g * magnitude.div_(magnitude + epsilon)
        with torch.enable_grad():
            leaf = _leaf(x)
            (gradient,) = torch.autograd.grad(constant_scale_normalisation(call.layer, leaf), leaf, signal)
        return "gradient", gradient
    return rule
