"""Grad-CAM and Guided Grad-CAM from the same forward pass as every other gradient method."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..base import Cost, GradientRuleExplainer
from ..errors import InvalidOptionError, UnsupportedModelError
from ..kernels.forward_record import ForwardRecord
from ..kernels.rules import BackwardRule
from ..registry import register


def last_conv_layer(model: nn.Module) -> str:
    """Dotted name of the model's last ``nn.Conv2d`` in definition order.

    Raises:
        UnsupportedModelError: the model has no 2-D convolution.
    """
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]
    if not names:
        raise UnsupportedModelError("Grad-CAM needs a convolutional layer and the model has no nn.Conv2d")
    return names[-1]


def upsample_to(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)


@register("grad_cam")
class GradCam(GradientRuleExplainer):
    """Grad-CAM (Selvaraju et al. 2017): ``ReLU(Σ_k mean(dS/dA_k) · A_k)``, upsampled bilinearly.

    Options:
        layer: dotted module name of the layer to explain; default the last ``nn.Conv2d``.
    """

    def __init__(self, model: nn.Module, *, layer: str | None = None):
        super().__init__(model)
        if layer is not None and not isinstance(layer, str):
            raise InvalidOptionError(f"layer must be a module name, got {layer!r}")
        self.layer = layer if layer is not None else last_conv_layer(model)

    def layers(self) -> list[str]:
        return [self.layer]

    def layer_map(self, record: ForwardRecord, targets: torch.Tensor) -> torch.Tensor:
        """The Grad-CAM map at the layer's own resolution, ``[B, 1, h, w]``."""
        activation = record.activations[self.layer]
        if not isinstance(activation, torch.Tensor) or activation.dim() != 4:
            raise UnsupportedModelError(f"layer {self.layer!r} must output a [B, K, h, w] tensor for Grad-CAM")
        weights = record.layer_gradient(targets, self.layer).mean(dim=(2, 3), keepdim=True)
        return torch.relu((weights * activation.detach()).sum(dim=1, keepdim=True))

    def attribute_from_record(self, record: ForwardRecord, targets: torch.Tensor) -> torch.Tensor:
        return upsample_to(self.layer_map(record, targets), record.inputs.shape[-2:])


@register("guided_grad_cam")
class GuidedGradCam(GradCam):
    """Guided Grad-CAM: our guided backprop times the bilinearly upsampled Grad-CAM map."""

    def cost(self, height: int, width: int) -> Cost:
        return Cost(evaluations=0, backward_passes=2, rows_per_forward=1)

    def attribute_from_record(self, record: ForwardRecord, targets: torch.Tensor) -> torch.Tensor:
        cam = super().attribute_from_record(record, targets)
        return record.input_gradient(targets, BackwardRule.GUIDED) * cam
