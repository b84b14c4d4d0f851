"""The stock pattern TorchServe users follow: a no-grad prediction, then Captum's attribute() per method."""

from __future__ import annotations

import warnings

import torch
from captum.attr import (Deconvolution, GuidedBackprop, GuidedGradCam, IntegratedGradients, LayerAttribution,
                         LayerGradCam, Saliency)
from torch import nn

warnings.filterwarnings("ignore", module="captum")


def predict(model: nn.Module, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        logits = model(inputs)
    return logits, logits.argmax(dim=1)


def captum_attribution(method: str, model: nn.Module, layer: nn.Module, inputs: torch.Tensor, targets: torch.Tensor):
    x = inputs.clone()
    if method == "saliency":
        return Saliency(model).attribute(x, target=targets, abs=False)
    if method == "guided_backprop":
        return GuidedBackprop(model).attribute(x, target=targets)
    if method == "deconvnet":
        return Deconvolution(model).attribute(x, target=targets)
    if method == "grad_cam":
        cam = LayerGradCam(model, layer).attribute(x, target=targets, relu_attributions=True)
        return LayerAttribution.interpolate(cam, tuple(x.shape[-2:]), interpolate_mode="bilinear")
    if method == "guided_grad_cam":
        return GuidedGradCam(model, layer).attribute(x, target=targets, interpolate_mode="bilinear")
    raise ValueError(method)


def stock_explain(model: nn.Module, layer: nn.Module, inputs: torch.Tensor, methods: list[str]):
    """Prediction, then one Captum attribute() call per method (each pays its own forward)."""
    logits, targets = predict(model, inputs)
    return logits, {method: captum_attribution(method, model, layer, inputs, targets).detach() for method in methods}


def captum_integrated_gradients(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, n_steps: int,
                                internal_batch_size: int | None, baseline: float = 0.0):
    return IntegratedGradients(model).attribute(inputs.clone(), baselines=baseline, target=targets, n_steps=n_steps,
                                                internal_batch_size=internal_batch_size, method="riemann_middle")
