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
from .feature_maps import as_feature_map, check_layout, default_layer
from .gradients import require_rule_sites


def upsample_to(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)


@register("grad_cam")
class GradCam(GradientRuleExplainer):
    """Grad-CAM (Selvaraju et al. 2017): ``ReLU(Σ_k mean(dS/dA_k) · A_k)``, upsampled bilinearly.

    Options:
        layer: dotted name of any module (a container, a block, an activation: ``layer4``,
            ``layer4.1``, ``features.8.2``); default: the last feature map with spatial extent the
            prediction depends on (see ``feature_maps.default_layer``).
        reshape: how the layer's output is a feature map: ``auto`` (default), ``nchw``, ``nhwc``
            (channels-last, Swin) or ``tokens`` (a transformer's ``[B, N, D]`` sequence).
        prefix_tokens: class/distillation tokens before a token sequence's patch grid (default:
            the fewest that leave a grid in the input's proportions).
    """

    def __init__(self, model: nn.Module, *, layer: str | None = None, reshape: str = "auto",
                 prefix_tokens: int | None = None):
        super().__init__(model)
        if layer is not None and (not isinstance(layer, str) or not layer):
            raise InvalidOptionError(f"layer must be a module name, got {layer!r}")
        check_layout(reshape, prefix_tokens)
        self.layer, self.reshape, self.prefix_tokens = layer, reshape, prefix_tokens
        self._resolved: str | None = layer

    def layers(self, inputs: torch.Tensor) -> list[str]:
        if self._resolved is None:
            self._resolved = default_layer(self.model, inputs)
        return [self._resolved]

    @property
    def explained_layer(self) -> str | None:
        return self._resolved

    def layer_map(self, record: ForwardRecord, targets: torch.Tensor) -> torch.Tensor:
        """The Grad-CAM map at the layer's own resolution, ``[B, 1, h, w]``."""
        size = tuple(record.inputs.shape[-2:])
        activation = record.activations[self._resolved]
        grid = as_feature_map(activation, size, self.reshape, self.prefix_tokens) \
            if isinstance(activation, torch.Tensor) else None
        if grid is None:
            shape = list(activation.shape) if isinstance(activation, torch.Tensor) else type(activation).__name__
            raise UnsupportedModelError(
                f"layer {self._resolved!r} outputs {shape}, not a feature map [B, K, h, w], a channels-last map "
                f"or a token sequence with a patch grid: name another layer, or set reshape/prefix_tokens")
        gradient = as_feature_map(record.layer_gradient(targets, self._resolved), size, self.reshape,
                                  self.prefix_tokens)
        weights = gradient.mean(dim=(2, 3), keepdim=True)
        return torch.relu((weights * grid.detach()).sum(dim=1, keepdim=True))

    def attribute_from_record(self, record: ForwardRecord, targets: torch.Tensor) -> torch.Tensor:
        return upsample_to(self.layer_map(record, targets), record.inputs.shape[-2:])


@register("guided_grad_cam")
class GuidedGradCam(GradCam):
    """Guided Grad-CAM: our guided backprop times the bilinearly upsampled Grad-CAM map."""

    applies_rules = True

    def cost(self, height: int, width: int) -> Cost:
        return Cost(evaluations=0, backward_passes=2, rows_per_forward=1)

    def attribute_from_record(self, record: ForwardRecord, targets: torch.Tensor) -> torch.Tensor:
        require_rule_sites(record, self.name)
        cam = super().attribute_from_record(record, targets)
        return record.input_gradient(targets, BackwardRule.GUIDED) * cam
