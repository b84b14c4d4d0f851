"""Grad-CAM's relatives: the gradient CAMs (each one ``weigh`` of the layer's ``A`` and ``G``) and Eigen-CAM.

Every method takes Grad-CAM's options (``layer``, ``reshape``, ``prefix_tokens``, see
:class:`~.cam.CamExplainer`) and works on convolutional maps, channels-last maps and transformer
token grids alike. ``A`` and ``G = dS/dA`` are ``[B, K, h, w]`` below; sums run over positions
``ij`` unless said otherwise. The gradient CAMs share the request's one backward to the layer.
"""

from __future__ import annotations

import torch

from ..base import Cost
from ..kernels.forward_record import ForwardRecord
from ..registry import register
from .cam import CamExplainer, GradientCam, weighted_channels


def _safe_divide(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """``numerator / denominator``, 0 where the denominator is 0."""
    zero = denominator == 0
    return torch.where(zero, torch.zeros_like(numerator), numerator / torch.where(zero, torch.ones_like(denominator),
                                                                                   denominator))


@register("grad_cam_plus_plus")
class GradCamPlusPlus(GradientCam):
    """Grad-CAM++ (Chattopadhay et al. 2018), with the paper's exponential-score closed form:
    ``w_k = Σ_ij ReLU(G_ij) · a_ij``, ``a = G² / (2 G² + Σ_ij(A) · G³)`` (``a = 0`` where ``G`` or
    the denominator is 0); the map is ``ReLU(Σ_k w_k A_k)``.

    pytorch-grad-cam adds 1e-6 to the denominator instead of guarding it; that changes the
    weights of positions where ``|G|`` is near 1e-3 or below.
    """

    def weigh(self, activation: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
        squared = gradient.pow(2)
        denominator = 2 * squared + activation.sum(dim=(2, 3), keepdim=True) * squared * gradient
        alpha = _safe_divide(squared, denominator)  # G = 0 gives 0 / 0: guarded to 0 too
        return weighted_channels((torch.relu(gradient) * alpha).sum(dim=(2, 3)), activation)


@register("xgrad_cam")
class XGradCam(GradientCam):
    """XGrad-CAM (Fu et al. 2020): ``w_k = Σ_ij (A_ij / Σ_ij A) · G_ij`` (0 for a channel whose
    activations sum to 0); the map is ``ReLU(Σ_k w_k A_k)``."""

    def weigh(self, activation: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
        total = activation.sum(dim=(2, 3))
        weights = _safe_divide((activation * gradient).sum(dim=(2, 3)), total)
        return weighted_channels(weights, activation)


@register("hires_cam")
class HiResCam(GradientCam):
    """HiResCAM (Draelos & Carin 2020): ``ReLU(Σ_k G_k ⊙ A_k)``, element-wise, no averaging of ``G``."""

    def weigh(self, activation: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
        return torch.relu((gradient * activation).sum(dim=1, keepdim=True))


@register("layer_cam")
class LayerCam(GradientCam):
    """LayerCAM (Jiang et al. 2021): ``ReLU(Σ_k ReLU(G_k) ⊙ A_k)``; meaningful at early layers too."""

    def weigh(self, activation: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
        return torch.relu((torch.relu(gradient) * activation).sum(dim=1, keepdim=True))


def principal_projection(activation: torch.Tensor) -> torch.Tensor:
    """Each row's positions projected on the first principal component of its activations, ``[B, 1, h, w]``.

    Positions are the samples, channels the features, centred over positions. An SVD's sign is
    arbitrary; ours is chosen so the projection correlates positively with the activation's norm over
    channels at each position (the lobe where the layer responds strongly is positive, whatever the
    sign of its channels: a signed layer such as a classifier's logit map has its strongest, not its
    most positive, responses on the evidence), and where that correlation is 0, so the entry of
    largest magnitude is positive.
    """
    batch, channels, height, width = activation.shape
    samples = activation.reshape(batch, channels, height * width).transpose(1, 2).double()  # [B, hw, K]
    centred = samples - samples.mean(dim=1, keepdim=True)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    projection = centred @ vh[:, 0, :, None]  # [B, hw, 1]
    projection = projection[..., 0]
    energy = samples.norm(dim=2)
    energy = energy - energy.mean(dim=1, keepdim=True)
    correlation = (projection * energy).sum(dim=1)
    # A correlation at rounding level is no evidence: then the entry of largest magnitude decides.
    decided = correlation.abs() > 1e-9 * projection.norm(dim=1) * energy.norm(dim=1)
    largest = projection.gather(1, projection.abs().argmax(dim=1, keepdim=True))[:, 0]
    sign = torch.where(decided, torch.sign(correlation), torch.sign(largest))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return (projection * sign[:, None]).reshape(batch, 1, height, width).to(activation.dtype)


@register("eigen_cam")
class EigenCam(CamExplainer):
    """Eigen-CAM (Muhammad & Yeasin 2020): the positive part of the layer's activations projected
    on their first principal component (see :func:`principal_projection` for the sign).

    Not class-specific: the map is the same for every target class. No backward pass: it reads the
    layer captured in the request's shared forward. pytorch-grad-cam's ``EigenCAM`` computes the
    same projection but leaves the SVD's sign as it comes (its map may be the other lobe), then
    applies the same ReLU.
    """

    def cost(self, height: int, width: int) -> Cost:
        return Cost(evaluations=0, backward_passes=0, rows_per_forward=1)

    def layer_map(self, record: ForwardRecord, targets: torch.Tensor) -> torch.Tensor:
        return torch.relu(principal_projection(self.activation(record)))
