"""Synthetic "shapes" dataset: one filled shape per image, random colours, size, pose and noise.

Every shape is rasterised analytically from per-pixel coordinates, so a whole batch is a handful of
numpy array operations and the object mask is exact. Sizes are given at the 64-px reference and
scale with the image size, so a 300-px drawing looks like an upsampled 64-px one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

CLASS_NAMES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "star")

REFERENCE_SIZE = 64
# Circumscribed diameter of the shape, in pixels of the 64-px reference image.
MIN_DIAMETER, MAX_DIAMETER = 12.0, 48.0
# Euclidean RGB distance between foreground and background; below this a shape can vanish in noise.
MIN_COLOUR_DISTANCE = 0.45
MAX_NOISE_STD = 0.08
# Peak-to-peak amplitude of the linear background ramp ("mild": well under the colour contrast).
MAX_GRADIENT_AMPLITUDE = 0.15

STAR_INNER_RATIO = 0.45  # fatter than the regular {5/2} star (0.382) so small stars keep their arms
CROSS_ARM_WIDTH_RATIO = 0.3  # half-width of an arm over its half-length


@dataclass(frozen=True)
class ShapesBatch:
    images: np.ndarray  # float32 [N, 3, H, W] in [0, 1]
    labels: np.ndarray  # int64 [N], indices into CLASS_NAMES
    masks: np.ndarray  # bool [N, H, W], True on the shape
    foregrounds: np.ndarray  # float32 [N, 3], shape colour before noise
    backgrounds: np.ndarray  # float32 [N, 3], background colour at the image centre, before ramp and noise

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class TensorShapesBatch:
    images: torch.Tensor  # float32 [N, 3, H, W] in [0, 1]
    labels: torch.Tensor  # int64 [N]
    masks: torch.Tensor  # bool [N, H, W]


def class_index(name: str) -> int:
    try:
        return CLASS_NAMES.index(name)
    except ValueError:
        raise ValueError(f"unknown shape class {name!r}; known: {', '.join(CLASS_NAMES)}") from None


def generate(n: int, seed: int | np.random.Generator, size: int = REFERENCE_SIZE) -> ShapesBatch:
    """Draws n random images; the same seed always gives the same batch."""
    rng = np.random.default_rng(seed)
    scale = size / REFERENCE_SIZE
    labels = rng.integers(0, len(CLASS_NAMES), size=n)
    radii = rng.uniform(MIN_DIAMETER / 2, MAX_DIAMETER / 2, size=n) * scale
    # Centres keep the circumscribed circle inside the image, so every shape is whole.
    centres = rng.uniform(radii[:, None], size - radii[:, None], size=(n, 2))
    rotations = rng.uniform(0.0, 2 * math.pi, size=n)
    foregrounds, backgrounds = _contrasting_colours(n, rng)
    gradient_angles = rng.uniform(0.0, 2 * math.pi, size=n)
    gradient_amplitudes = rng.uniform(0.0, MAX_GRADIENT_AMPLITUDE, size=n)
    # A quarter of the images are noise-free so that clean drawings are in-distribution too.
    noise_stds = rng.uniform(0.0, MAX_NOISE_STD, size=n) * (rng.random(n) >= 0.25)

    masks = rasterise(labels, centres, radii, rotations, size)
    images = _paint(masks, foregrounds, backgrounds, gradient_angles, gradient_amplitudes, noise_stds, rng)
    return ShapesBatch(images, labels.astype(np.int64), masks, foregrounds, backgrounds)


def generate_torch(n: int, seed: int | np.random.Generator, size: int = REFERENCE_SIZE) -> TensorShapesBatch:
    batch = generate(n, seed, size)
    return TensorShapesBatch(
        torch.from_numpy(batch.images), torch.from_numpy(batch.labels), torch.from_numpy(batch.masks)
    )


def draw_shape(
    name: str,
    *,
    size: int = REFERENCE_SIZE,
    foreground: tuple[float, float, float] = (0.9, 0.1, 0.1),
    background: tuple[float, float, float] = (0.1, 0.1, 0.15),
    diameter: float = 36.0,
    rotation: float = 0.0,
    noise_std: float = 0.0,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """One centred shape, flat background; returns (image float32 [3,H,W], mask bool [H,W]).

    `diameter` is in reference (64-px) pixels. With rotation 0 the triangle and star point up
    and the square and cross are axis-aligned.
    """
    scale = size / REFERENCE_SIZE
    labels = np.array([class_index(name)])
    centres = np.full((1, 2), size / 2)
    masks = rasterise(labels, centres, np.array([diameter / 2 * scale]), np.array([rotation]), size)
    images = _paint(
        masks,
        np.array([foreground], dtype=np.float32),
        np.array([background], dtype=np.float32),
        gradient_angles=np.zeros(1),
        gradient_amplitudes=np.zeros(1),
        noise_stds=np.array([noise_std]),
        rng=np.random.default_rng(seed),
    )
    return images[0], masks[0]


def rasterise(
    labels: np.ndarray, centres: np.ndarray, radii: np.ndarray, rotations: np.ndarray, size: int
) -> np.ndarray:
    """Boolean masks [N, size, size]; centres are (x, y) in pixels, radii circumscribe the shape."""
    n = len(labels)
    # Pixel centres sit at half-integers, so a shape centred at size/2 is symmetric on the grid.
    grid = np.arange(size, dtype=np.float32) + 0.5
    dx = grid[None, None, :] - centres[:, 0, None, None].astype(np.float32)
    dy = grid[None, :, None] - centres[:, 1, None, None].astype(np.float32)
    # Image y grows downwards; flipping it makes rotation 0 mean "pointing up" for triangle and star.
    dy = -dy
    cos = np.cos(rotations).astype(np.float32)[:, None, None]
    sin = np.sin(rotations).astype(np.float32)[:, None, None]
    # Coordinates in the shape's own frame (rotate the pixel by -rotation).
    u = cos * dx + sin * dy
    v = -sin * dx + cos * dy
    r = radii.astype(np.float32)[:, None, None]

    masks = np.zeros((n, size, size), dtype=bool)
    for index, name in enumerate(CLASS_NAMES):
        rows = np.flatnonzero(labels == index)
        if rows.size:
            masks[rows] = _INSIDE[name](u[rows], v[rows], r[rows])
    return masks


def _inside_circle(u: np.ndarray, v: np.ndarray, r: np.ndarray) -> np.ndarray:
    return u * u + v * v <= r * r


def _inside_regular_polygon(
    u: np.ndarray, v: np.ndarray, r: np.ndarray, sides: int, first_vertex: float
) -> np.ndarray:
    # Inside a convex regular polygon = on the inner side of every edge: the projection on each
    # edge normal is at most the inradius.
    inradius = r * math.cos(math.pi / sides)
    inside = np.ones(u.shape, dtype=bool)
    for k in range(sides):
        normal_angle = first_vertex + math.pi / sides + 2 * math.pi * k / sides
        inside &= u * math.cos(normal_angle) + v * math.sin(normal_angle) <= inradius
    return inside


def _inside_square(u: np.ndarray, v: np.ndarray, r: np.ndarray) -> np.ndarray:
    return _inside_regular_polygon(u, v, r, sides=4, first_vertex=math.pi / 4)


def _inside_triangle(u: np.ndarray, v: np.ndarray, r: np.ndarray) -> np.ndarray:
    return _inside_regular_polygon(u, v, r, sides=3, first_vertex=math.pi / 2)


def _inside_cross(u: np.ndarray, v: np.ndarray, r: np.ndarray) -> np.ndarray:
    # r is the distance to an arm's outer corner (half_length, half_width).
    half_length = r / math.sqrt(1 + CROSS_ARM_WIDTH_RATIO**2)
    half_width = CROSS_ARM_WIDTH_RATIO * half_length
    au, av = np.abs(u), np.abs(v)
    return ((au <= half_length) & (av <= half_width)) | ((av <= half_length) & (au <= half_width))


def _inside_star(u: np.ndarray, v: np.ndarray, r: np.ndarray) -> np.ndarray:
    # Fold the plane into one half-sector, from a tip (angle 0) to the next inner vertex
    # (angle pi/5): the star is then the region on the origin's side of the tip-to-inner-vertex edge.
    half_sector = math.pi / 5
    angle = np.mod(np.arctan2(v, u) - math.pi / 2, 2 * half_sector)
    folded = half_sector - np.abs(angle - half_sector)  # 0 at a tip, pi/5 at an inner vertex
    rho = np.sqrt(u * u + v * v)
    px, py = rho * np.cos(folded), rho * np.sin(folded)
    tip_x = r
    inner_x = STAR_INNER_RATIO * r * math.cos(half_sector)
    inner_y = STAR_INNER_RATIO * r * math.sin(half_sector)
    # Sign of the cross product (inner - tip) x (p - tip); the origin gives a positive value.
    cross = (inner_x - tip_x) * py - inner_y * (px - tip_x)
    return cross >= 0


_INSIDE = {
    "circle": _inside_circle,
    "square": _inside_square,
    "triangle": _inside_triangle,
    "cross": _inside_cross,
    "star": _inside_star,
}
assert tuple(_INSIDE) == CLASS_NAMES


def _contrasting_colours(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    foregrounds = rng.random((n, 3), dtype=np.float32)
    backgrounds = rng.random((n, 3), dtype=np.float32)
    # Rejection sampling: redraw only the pairs that are too close; about a third fail each round.
    while True:
        too_close = np.linalg.norm(foregrounds - backgrounds, axis=1) < MIN_COLOUR_DISTANCE
        count = int(too_close.sum())
        if count == 0:
            return foregrounds, backgrounds
        foregrounds[too_close] = rng.random((count, 3), dtype=np.float32)
        backgrounds[too_close] = rng.random((count, 3), dtype=np.float32)


def _paint(
    masks: np.ndarray,
    foregrounds: np.ndarray,
    backgrounds: np.ndarray,
    gradient_angles: np.ndarray,
    gradient_amplitudes: np.ndarray,
    noise_stds: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    n, size, _ = masks.shape
    # The ramp runs along a random direction, zero at the centre, +-amplitude/2 at the far edges;
    # it brightens or darkens all channels alike, like uneven lighting.
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    ramp = (
        np.cos(gradient_angles).astype(np.float32)[:, None, None] * coords[None, None, :]
        + np.sin(gradient_angles).astype(np.float32)[:, None, None] * coords[None, :, None]
    ) * (gradient_amplitudes.astype(np.float32) / math.sqrt(2))[:, None, None]
    background = backgrounds[:, :, None, None] + ramp[:, None]
    images = np.where(masks[:, None], foregrounds[:, :, None, None], background)
    # Drawing normals is the slowest step, so noise-free images get none.
    noisy = np.flatnonzero(noise_stds > 0)
    if noisy.size:
        noise = rng.standard_normal((noisy.size, *images.shape[1:]), dtype=np.float32)
        images[noisy] += noise * noise_stds[noisy].astype(np.float32)[:, None, None, None]
    return np.clip(images, 0.0, 1.0, out=images)
