"""The report's picture: inputs, masks, and each method's maps for the trained and the randomised model.

Pillow and numpy only, so the product does not depend on a plotting library. Each map is scaled
on its own to its 99.5th percentile (a few extreme pixels would otherwise wash it out) and drawn
with the sequential ``inferno`` colour map the server uses; an all-zero map is black.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from serving.rendering.colormaps import colormap_lut

TILE = 72  # pixels per image tile
GAP = 3
EXAMPLE_GAP = 14
LABEL_WIDTH = 140
HEADER_HEIGHT = 50
CLIP_PERCENTILE = 99.5


@dataclass(frozen=True)
class MethodMaps:
    """One row of the grid: a method's ``[E, H, W]`` importance maps, one array per column."""

    name: str
    columns: Sequence[np.ndarray]


def colour_map(importance: np.ndarray) -> np.ndarray:
    """``[H, W]`` non-negative map -> ``[H, W, 3]`` uint8 inferno picture (all black if the map is 0)."""
    top = float(np.percentile(importance, CLIP_PERCENTILE))
    if not top > 0:
        top = float(importance.max())
    scaled = np.clip(importance / top, 0, 1) if top > 0 else np.zeros_like(importance)
    return colormap_lut("inferno", diverging=False)[np.round(scaled * 255).astype(np.uint8)]


def quality_grid(images: np.ndarray, masks: np.ndarray, rows: Sequence[MethodMaps], column_titles: Sequence[str],
                 captions: Sequence[str] = ()) -> Image.Image:
    """The grid: a header row (each example's input, then its object mask), then one row per method
    with, for each example, one tile per column (e.g. trained, top layer randomised, all randomised).

    Args:
        images: ``[E, 3, H, W]`` inputs in [0, 1], as shown to a person.
        masks: ``[E, H, W]`` boolean object masks.
        rows: one :class:`MethodMaps` per method, each column with maps of the same E examples.
        column_titles: a title per column of every example (at least two: input and mask go there).
        captions: optional text above each example (e.g. its class).
    """
    examples, columns = len(images), len(column_titles)
    font, small = _font(13), _font(10)
    block = columns * TILE + (columns - 1) * GAP
    width = LABEL_WIDTH + examples * block + (examples - 1) * EXAMPLE_GAP + GAP
    height = HEADER_HEIGHT + (len(rows) + 1) * (TILE + GAP)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)

    def left(example: int, column: int) -> int:
        return LABEL_WIDTH + example * (block + EXAMPLE_GAP) + column * (TILE + GAP)

    for example in range(examples):
        caption = captions[example] if example < len(captions) else f"example {example + 1}"
        draw.text((left(example, 0), 4), caption, fill="black", font=font)
        for column, title in enumerate(column_titles):
            for line, text in enumerate(title.split("\n")):
                draw.text((left(example, column), 22 + 11 * line), text, fill="dimgray", font=small)
    draw.text((4, HEADER_HEIGHT + TILE // 2 - 8), "input, mask", fill="black", font=font)
    for example in range(examples):
        picture = (np.clip(images[example].transpose(1, 2, 0), 0, 1) * 255).round().astype(np.uint8)
        canvas.paste(_tile(picture), (left(example, 0), HEADER_HEIGHT))
        mask = np.repeat(masks[example].astype(np.uint8)[:, :, None] * 255, 3, axis=2)
        canvas.paste(_tile(mask), (left(example, 1), HEADER_HEIGHT))
    for index, row in enumerate(rows, start=1):
        top = HEADER_HEIGHT + index * (TILE + GAP)
        draw.text((4, top + TILE // 2 - 8), row.name, fill="black", font=font)
        for example in range(examples):
            for column, maps in enumerate(row.columns):
                canvas.paste(_tile(colour_map(maps[example])), (left(example, column), top))
    return canvas


def _tile(pixels: np.ndarray) -> Image.Image:
    # Nearest neighbour keeps single-pixel detail (guided backprop's edges) visible.
    return Image.fromarray(pixels).resize((TILE, TILE), Image.NEAREST)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow's bundled scalable font (needs FreeType)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()
