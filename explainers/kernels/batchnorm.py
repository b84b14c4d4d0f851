"""Eval-mode batch norms run as the affine map they are, in explained forwards."""

from __future__ import annotations

import weakref

import torch
from torch import nn

BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def eval_batch_norm(module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """An eval-mode batch norm as the affine map it is: ``x · scale + shift``, per channel.

    Equal to the module's own forward (up to rounding), but its backward is one multiplication:
    ATen's batch-norm backward costs 5-8x more (measured 18 ms against 2.4 ms on [8, 256, 56, 56]),
    about 5 % of a ResNet-50 input gradient. Scale and shift come from the module's current
    statistics (cached until one changes), outside autograd: explanations differentiate with
    respect to inputs and activations, never weights. Anything else (training mode, batch statistics,
    hooks on the module, another dtype) runs the module itself.
    """
    if (module.training or module.running_mean is None or module.running_var is None
            or inputs.dtype != module.running_var.dtype or inputs.dim() < 2
            or module._forward_hooks or module._forward_pre_hooks
            or nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks):
        return module(inputs)
    scale, shift = _batch_norm_affine(module)
    shape = (1, -1) + (1,) * (inputs.dim() - 2)
    return torch.addcmul(shift.view(shape), inputs, scale.view(shape))


# module -> (source tensors, their versions, eps, scale, shift): computing scale and shift costs
# five small kernels per batch norm and forward (about 8 ms of a ResNet-50 forward).
_affine_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _batch_norm_affine(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, shift)`` of an eval batch norm, recomputed whenever a statistic or weight changed.

    A tensor's ``_version`` counts its in-place changes (``load_state_dict``, optimiser steps,
    running-statistic updates), and a replaced tensor is another object: either invalidates.
    """
    sources = (module.running_var, module.running_mean, module.weight, module.bias)
    versions = tuple(-1 if tensor is None else tensor._version for tensor in sources)
    cached = _affine_cache.get(module)
    if (cached is not None and cached[1] == versions and cached[2] == module.eps
            and all(a is b for a, b in zip(cached[0], sources))):
        return cached[3], cached[4]
    with torch.inference_mode(False), torch.no_grad():
        scale = torch.rsqrt(module.running_var + module.eps)
        if module.weight is not None:
            scale = scale * module.weight
        shift = -module.running_mean * scale
        if module.bias is not None:
            shift = shift + module.bias
    _affine_cache[module] = (sources, versions, module.eps, scale, shift)
    return scale, shift
