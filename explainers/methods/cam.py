"""The CAM family's shared machinery, Grad-CAM and Guided Grad-CAM.

Every CAM method weighs the activation ``A`` of one layer, captured in the request's shared
forward pass, seen as a feature map ``[B, K, h, w]`` (convolutional maps, channels-last maps and
transformer token grids alike, see ``feature_maps``). The gradient CAMs also read ``G = dS/dA``
from one backward that stops at the layer; :meth:`ForwardRecord.layer_gradient` memoises it per
(layer, targets), so Grad-CAM, Grad-CAM++, XGrad-CAM, HiResCAM, LayerCAM, NormGrad and Guided
Grad-CAM's CAM part requested together pay that backward once. A gradient CAM is then only its
:meth:`GradientCam.weigh` of ``(A, G)``.
"""

from __future__ import annotations

import abc

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


def weighted_channels(weights: torch.Tensor, activation: torch.Tensor) -> torch.Tensor:
    """``ReLU(Σ_k w_k A_k)`` of channel weights ``[B, K]`` and a feature map ``[B, K, h, w]``."""
    return torch.relu((weights[:, :, None, None] * activation).sum(dim=1, keepdim=True))


class CamExplainer(GradientRuleExplainer):
    """A map from one layer's activation in the shared forward pass (the CAM family's base).

    Options (every CAM method takes them):
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

    def grid(self, tensor: torch.Tensor, record: ForwardRecord, layer: str | None = None) -> torch.Tensor:
        """``tensor`` (the layer's output or its gradient) as a feature map ``[B, K, h, w]``.

        Raises:
            UnsupportedModelError: the layer's output has no spatial grid in the chosen layout.
        """
        layer = layer or self._resolved
        grid = as_feature_map(tensor, tuple(record.inputs.shape[-2:]), self.reshape, self.prefix_tokens) \
            if isinstance(tensor, torch.Tensor) else None
        if grid is None:
            shape = list(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise UnsupportedModelError(
                f"layer {layer!r} outputs {shape}, not a feature map [B, K, h, w], a channels-last map "
                f"or a token sequence with a patch grid: name another layer, or set reshape/prefix_tokens")
        return grid

    def activation(self, record: ForwardRecord, layer: str | None = None) -> torch.Tensor:
        """The layer's activation in the shared forward, detached, as ``[B, K, h, w]``."""
        layer = layer or self._resolved
        return self.grid(record.activations[layer], record, layer).detach()

    @abc.abstractmethod
    def layer_map(self, record: ForwardRecord, targets: torch.Tensor) -> torch.Tensor:
        """The map at the layer's own resolution, ``[B, 1, h, w]``."""

    def attribute_from_record(self, record: ForwardRecord, targets: torch.Tensor) -> torch.Tensor:
        return upsample_to(self.layer_map(record, targets), record.inputs.shape[-2:])


class GradientCam(CamExplainer):
    """A CAM from the activation ``A`` and the gradient ``G = dS/dA`` of one layer.

    Costs one backward from the target score to the layer (not to the input), shared with every
    other gradient CAM of the same layer and targets in the request.
    """

    def cost(self, height: int, width: int) -> Cost:
        return Cost(evaluations=0, backward_passes=1, rows_per_forward=1, backward_to_layer=True)

    @abc.abstractmethod
    def weigh(self, activation: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
        """The map ``[B, 1, h, w]`` from ``A`` and ``G``, both ``[B, K, h, w]``."""

    def layer_map(self, record: ForwardRecord, targets: torch.Tensor) -> torch.Tensor:
        gradient = self.grid(record.layer_gradient(targets, self._resolved), record)
        return self.weigh(self.activation(record), gradient)


@register("grad_cam")
class GradCam(GradientCam):
    """Grad-CAM (Selvaraju et al. 2017): ``ReLU(Σ_k mean_ij(G_k) · A_k)``, upsampled bilinearly.

    Options: ``layer``, ``reshape``, ``prefix_tokens`` (see :class:`CamExplainer`).
    """

    def weigh(self, activation: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
        return weighted_channels(gradient.mean(dim=(2, 3)), activation)


@register("guided_grad_cam")
class GuidedGradCam(GradCam):
    """Guided Grad-CAM: our guided backprop times the bilinearly upsampled Grad-CAM map."""

    applies_rules = True

    def cost(self, height: int, width: int) -> Cost:
        # One backward to the layer (shared with the other CAMs) and one guided backward to the input.
        return Cost(evaluations=0, backward_passes=2, rows_per_forward=1)

    def attribute_from_record(self, record: ForwardRecord, targets: torch.Tensor) -> torch.Tensor:
        require_rule_sites(record, self.name)
        cam = super().attribute_from_record(record, targets)
        return record.input_gradient(targets, BackwardRule.GUIDED) * cam
