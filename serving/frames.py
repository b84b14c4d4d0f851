"""Where the model's input came from in the client's image, and maps carried back there.

Preprocessing resizes the image (its shorter side, or straight to the input size) and takes a
centre crop; :class:`FrameGeometry` records both steps for one request so that a map computed at
the model's input ("input" frame) can be drawn over the picture the client sent ("image" frame).

The inverse is a resampling, not a second resize: every pixel of the image frame asks where its
centre lands in the model's input (the half-pixel convention of Pillow and of
``F.interpolate(align_corners=False)``) and reads the map there, bilinearly (or, for a coarse grid,
the cell it falls in). A pixel whose centre lies outside the crop holds 0: the model never saw it,
so it carries no attribution, which every encoding shows as "nothing" (palette index 0 or the
diverging midpoint, fully transparent over an overlay).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["FrameGeometry", "ImageFrame"]


@dataclass(frozen=True)
class FrameGeometry:
    """One image's way to the model input, all sizes ``(height, width)`` in pixels.

    Attributes:
        original_size: the decoded image.
        resized_size: after the resize step (the input size itself when there is no crop).
        crop_box: ``(top, left, height, width)`` of the crop in the resized image; its height and
            width are the model's input size.
    """

    original_size: tuple[int, int]
    resized_size: tuple[int, int]
    crop_box: tuple[int, int, int, int]

    @property
    def input_size(self) -> tuple[int, int]:
        return self.crop_box[2], self.crop_box[3]

    def image_frame_size(self, max_pixels: int) -> tuple[int, int]:
        """The original size, or, when it has more than ``max_pixels`` pixels, the largest size of
        the same aspect ratio that has at most that many (each side at least 1)."""
        height, width = self.original_size
        if height * width <= max_pixels:
            return height, width
        factor = math.sqrt(max_pixels / (height * width))
        return max(1, int(height * factor)), max(1, int(width * factor))

    def to_image_frame(self, values: torch.Tensor, size: tuple[int, int], *, cells: bool = False) -> torch.Tensor:
        """``values [..., h, w]`` laid over the model input, resampled to the image frame ``[..., *size]``.

        ``h, w`` may be the input size or a coarser grid covering it (``cells=True`` then keeps each
        cell a flat block, as the overlay of a coarse map shows it). Outside the crop: 0.
        """
        rows, row_inside = self._source_positions(0, size[0], values.shape[-2], cells)
        columns, column_inside = self._source_positions(1, size[1], values.shape[-1], cells)
        along_rows = _sample(values, rows, dim=-2)
        resampled = _sample(along_rows, columns, dim=-1)
        inside = row_inside[:, None] & column_inside[None, :]
        return resampled * inside.to(resampled.dtype)

    def _source_positions(self, axis: int, out_length: int, grid_length: int, cells: bool):
        """Per output pixel along ``axis``: where to read in a grid of ``grid_length`` covering the
        crop, and whether the pixel's centre is inside the crop."""
        resized_length = self.resized_size[axis]
        crop_start, crop_length = self.crop_box[axis], self.crop_box[2 + axis]
        centres = (torch.arange(out_length, dtype=torch.float64) + 0.5) * (resized_length / out_length)
        in_crop = centres - crop_start  # 0 .. crop_length inside the crop
        inside = (in_crop >= 0) & (in_crop < crop_length)
        in_grid = in_crop * (grid_length / crop_length)  # still a centre: 0 .. grid_length
        if cells:
            return _Positions.nearest(in_grid, grid_length), inside
        return _Positions.linear(in_grid - 0.5, grid_length), inside


@dataclass(frozen=True)
class _Positions:
    """Two neighbours and the weight of the second, per output pixel (nearest: weight 0)."""

    first: torch.Tensor
    second: torch.Tensor
    weight: torch.Tensor

    @classmethod
    def linear(cls, coordinates: torch.Tensor, length: int) -> "_Positions":
        # Border-clamped, as F.interpolate(align_corners=False): the edge pixel extends to the edge.
        clamped = coordinates.clamp(0, length - 1)
        first = clamped.floor().long()
        second = (first + 1).clamp(max=length - 1)
        return cls(first, second, clamped - first)

    @classmethod
    def nearest(cls, centres: torch.Tensor, length: int) -> "_Positions":
        index = centres.floor().long().clamp(0, length - 1)
        return cls(index, index, torch.zeros_like(centres))


def _sample(values: torch.Tensor, positions: _Positions, dim: int) -> torch.Tensor:
    weight = positions.weight.to(values.dtype)
    shape = [1] * values.dim()
    shape[dim] = -1
    weight = weight.view(shape)
    first = values.index_select(dim, positions.first)
    if not bool(weight.any()):
        return first
    return first * (1 - weight) + values.index_select(dim, positions.second) * weight


@dataclass(frozen=True)
class ImageFrame:
    """Where one request's maps are drawn in the image frame: its geometry and the output size
    (the original size, or smaller under ``caps.max_frame_pixels``)."""

    geometry: FrameGeometry
    size: tuple[int, int]

    def carry(self, values: torch.Tensor, *, cells: bool = False) -> torch.Tensor:
        return self.geometry.to_image_frame(values, self.size, cells=cells)
