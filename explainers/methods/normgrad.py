"""NormGrad (Rebuffi et al. 2020, "There and Back Again: Revisiting Backpropagation Saliency Methods")."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import InvalidOptionError
from ..kernels.forward_record import ForwardRecord
from ..registry import register
from .cam import GradientCam, upsample_to

COMBINATIONS = ("product", "sum")
MAX_LAYERS = 16


@register("normgrad")
class NormGrad(GradientCam):
    """NormGrad: at each position ``ij`` of a layer, ``‖A_ij‖ · ‖G_ij‖`` (L2 norms over channels of
    the activation and of its gradient), the norm of that position's contribution ``G_ij A_ijᵀ`` to
    the gradient of a 1x1 convolution's weights after the layer. Upsampled bilinearly.

    Options: Grad-CAM's (``layer``, ``reshape``, ``prefix_tokens``, see :class:`~.cam.CamExplainer`), and
        layers: several layers instead of ``layer`` (the paper's multi-layer combination). Each
            layer's map is upsampled to the input and divided by its maximum over positions (so
            each layer counts alike whatever its scale), then the maps are combined by
        combine: ``product`` (default: a position must matter at every layer, the combination
            that keeps the coarse layers' class selectivity and the fine layers' resolution) or
            ``sum`` (their mean). The paper combines layers to trade resolution for selectivity;
            its exact weighting is not reproduced here.

    Every layer's gradient comes from the same one backward, shared with the other gradient CAMs.
    """

    def __init__(self, model: nn.Module, *, layer: str | None = None, layers: list[str] | None = None,
                 combine: str = "product", reshape: str = "auto", prefix_tokens: int | None = None):
        super().__init__(model, layer=layer, reshape=reshape, prefix_tokens=prefix_tokens)
        if layers is not None:
            if layer is not None:
                raise InvalidOptionError("give either layer or layers, not both")
            if (not isinstance(layers, (list, tuple)) or not layers or len(layers) > MAX_LAYERS
                    or not all(isinstance(name, str) and name for name in layers)):
                raise InvalidOptionError(f"layers must be a list of 1 to {MAX_LAYERS} module names, got {layers!r}")
            if len(set(layers)) != len(layers):
                raise InvalidOptionError(f"layers names a layer twice: {layers!r}")
        if combine not in COMBINATIONS:
            raise InvalidOptionError(f"combine must be one of {list(COMBINATIONS)}, got {combine!r}")
        self.layer_names = list(layers) if layers is not None else None
        self.combine = combine

    def layers(self, inputs: torch.Tensor) -> list[str]:
        return list(self.layer_names) if self.layer_names else super().layers(inputs)

    @property
    def explained_layer(self) -> str | None:
        return ",".join(self.layer_names) if self.layer_names else super().explained_layer

    def weigh(self, activation: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
        return activation.norm(dim=1, keepdim=True) * gradient.norm(dim=1, keepdim=True)

    def attribute_from_record(self, record: ForwardRecord, targets: torch.Tensor) -> torch.Tensor:
        if not self.layer_names:
            return super().attribute_from_record(record, targets)
        size = tuple(record.inputs.shape[-2:])
        gradients = record.layer_gradients(targets, self.layer_names)
        combined = None
        for name, gradient in zip(self.layer_names, gradients):
            layer_map = upsample_to(self.weigh(self.activation(record, name), self.grid(gradient, record, name)), size)
            peak = layer_map.amax(dim=(2, 3), keepdim=True)
            layer_map = torch.where(peak > 0, layer_map / torch.where(peak > 0, peak, torch.ones_like(peak)), layer_map)
            if combined is None:
                combined = layer_map
            elif self.combine == "product":
                combined = combined * layer_map
            else:
                combined = combined + layer_map
        return combined / len(self.layer_names) if self.combine == "sum" else combined
