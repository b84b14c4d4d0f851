"""Colour maps as 256-entry lookup tables, built with numpy from a few anchor colours.

No plotting library is needed at serving time: each map is a short list of evenly spaced anchor
colours, linearly interpolated to 256 RGB entries. Index 0 is the low end of the map, 255 the high
end; for a diverging map, index 127.5 (between 127 and 128) is the centre.

The anchors approximate the well-known maps closely enough for display (they are not bit-exact
copies of matplotlib's tables, which are not needed to read a heat map).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

LUT_SIZE = 256

RGB = tuple[int, int, int]

# Evenly spaced samples of matplotlib's "inferno" (perceptually uniform, black -> pale yellow).
_INFERNO_ANCHORS: tuple[RGB, ...] = (
    (0, 0, 4),
    (27, 12, 66),
    (75, 12, 107),
    (120, 28, 109),
    (165, 44, 96),
    (207, 68, 70),
    (237, 105, 37),
    (251, 154, 6),
    (247, 208, 60),
    (252, 255, 164),
)

# matplotlib's "hot" ramps red, then green, then blue; nine even samples keep its kinks close.
_HOT_ANCHORS: tuple[RGB, ...] = (
    (11, 0, 0),
    (94, 0, 0),
    (178, 0, 0),
    (255, 7, 0),
    (255, 90, 0),
    (255, 174, 0),
    (255, 255, 4),
    (255, 255, 129),
    (255, 255, 255),
)

_GRAY_ANCHORS: tuple[RGB, ...] = ((0, 0, 0), (255, 255, 255))

# Moreland's "coolwarm": blue -> light grey -> red, the diverging default.
_COOLWARM_ANCHORS: tuple[RGB, ...] = (
    (59, 76, 192),
    (98, 130, 234),
    (141, 176, 254),
    (184, 208, 249),
    (221, 221, 221),
    (245, 196, 173),
    (244, 154, 123),
    (222, 96, 77),
    (180, 4, 38),
)

# "bwr": pure blue -> white -> pure red.
_BWR_ANCHORS: tuple[RGB, ...] = ((0, 0, 255), (255, 255, 255), (255, 0, 0))


def build_lut(anchors: Sequence[RGB], size: int = LUT_SIZE) -> np.ndarray:
    """Interpolate evenly spaced anchor colours linearly into a ``[size, 3]`` uint8 table.

    Raises:
        ValueError: fewer than two anchors, or an anchor that is not three values in 0..255.
    """
    anchor_array = np.asarray(anchors, dtype=np.float64)
    if anchor_array.ndim != 2 or anchor_array.shape[0] < 2 or anchor_array.shape[1] != 3:
        raise ValueError(f"a colour map needs at least two RGB anchors, got shape {anchor_array.shape}")
    if anchor_array.min() < 0 or anchor_array.max() > 255:
        raise ValueError("anchor colours must lie in 0..255")
    anchor_positions = np.linspace(0.0, 1.0, anchor_array.shape[0])
    entry_positions = np.linspace(0.0, 1.0, size)
    channels = [np.interp(entry_positions, anchor_positions, anchor_array[:, c]) for c in range(3)]
    return np.rint(np.stack(channels, axis=1)).astype(np.uint8)


# "gray" is in both families: it is the plain 8-bit map, meaningful for any polarity.
SEQUENTIAL_COLORMAPS: dict[str, np.ndarray] = {
    "inferno": build_lut(_INFERNO_ANCHORS),
    "hot": build_lut(_HOT_ANCHORS),
    "gray": build_lut(_GRAY_ANCHORS),
}
DIVERGING_COLORMAPS: dict[str, np.ndarray] = {
    "coolwarm": build_lut(_COOLWARM_ANCHORS),
    "bwr": build_lut(_BWR_ANCHORS),
    "gray": SEQUENTIAL_COLORMAPS["gray"],
}

for _lut in (*SEQUENTIAL_COLORMAPS.values(), *DIVERGING_COLORMAPS.values()):
    _lut.setflags(write=False)  # shared module-level tables: nobody may recolour them in place


def colormap_lut(name: str, *, diverging: bool) -> np.ndarray:
    """The read-only ``[256, 3]`` uint8 table of a named map from the requested family.

    Raises:
        KeyError: no map of that name in that family.
    """
    family = DIVERGING_COLORMAPS if diverging else SEQUENTIAL_COLORMAPS
    return family[name]
