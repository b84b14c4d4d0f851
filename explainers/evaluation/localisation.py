"""Does the map point at the object? Pointing game and mask energy, against ground-truth masks.

Both read the :func:`~explainers.evaluation.maps.importance_map` (``Σ_c |a_c|``, non-negative), so
"positive attribution" below is that importance. A map that knows nothing scores about the share
of the image the object covers: compare with ``masks.float().mean()``, the chance level.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import InvalidInputError, InvalidOptionError


def pointing_game(importance: torch.Tensor, masks: torch.Tensor, tolerance: float = 0.0) -> torch.Tensor:
    """``[B]`` hit scores: is the map's maximum on the object (Zhang et al. 2016)?

    A hit is a maximum within ``tolerance`` pixels (Euclidean) of the mask; gradient maps peak on
    the object's edge, so a pixel or two of tolerance forgives a maximum just outside it. When
    several pixels share the maximum, the row scores the share of them that hit: 1 or 0 for a
    unique maximum, and a constant map scores the (dilated) mask's area, the chance level.

    Raises:
        InvalidInputError: ``importance`` and ``masks`` are not matching ``[B, H, W]`` tensors.
        InvalidOptionError: a negative or non-numeric tolerance.
    """
    _check(importance, masks)
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not tolerance >= 0:
        raise InvalidOptionError(f"tolerance must be a non-negative number of pixels, got {tolerance!r}")
    target = dilate(masks.cpu(), tolerance)
    flat = importance.detach().cpu().flatten(1).float()
    maxima = flat == flat.max(dim=1, keepdim=True).values
    hits = (maxima & target.flatten(1)).sum(dim=1)
    return hits.double() / maxima.sum(dim=1).double()


def mask_energy(importance: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """``[B]`` share of the map's positive mass that lies on the object (energy-based pointing game).

    NaN for a row whose map has no positive value at all (nothing to share); callers leave such
    rows out of their means and count them.

    Raises:
        InvalidInputError: ``importance`` and ``masks`` are not matching ``[B, H, W]`` tensors.
    """
    _check(importance, masks)
    positive = importance.detach().cpu().clamp(min=0).flatten(1).double()
    total = positive.sum(dim=1)
    inside = (positive * masks.cpu().flatten(1).to(positive.dtype)).sum(dim=1)
    return torch.where(total > 0, inside / total.clamp(min=torch.finfo(torch.float64).tiny), torch.nan)


def dilate(masks: torch.Tensor, radius: float) -> torch.Tensor:
    """Boolean ``[B, H, W]`` masks grown by every pixel within ``radius`` (Euclidean) of them."""
    masks = masks.bool()
    reach = math.floor(radius)
    if reach < 1:
        return masks
    offsets = torch.arange(-reach, reach + 1, dtype=torch.float32)
    disk = (offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius * radius).float()
    grown = F.conv2d(masks[:, None].float(), disk[None, None].to(masks.device), padding=reach)
    return grown[:, 0] > 0.5


def _check(importance: torch.Tensor, masks: torch.Tensor) -> None:
    if not isinstance(importance, torch.Tensor) or importance.dim() != 3:
        raise InvalidInputError("importance must be a [B, H, W] tensor")
    if not isinstance(masks, torch.Tensor) or tuple(masks.shape) != tuple(importance.shape):
        raise InvalidInputError(f"masks must be [B, H, W] = {list(importance.shape)} like the importance map")
