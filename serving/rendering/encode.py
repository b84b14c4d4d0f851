"""Turn one attribution tensor ``[C, H, W]`` into the ``explanations.<name>`` response payload.

Pipeline (every step is a pure function of the tensor and ``RenderOptions``):

1. **Polarity, then reduction** (``reduce_channels``). The attribution is split per channel into
   its positive part ``a+ = max(a, 0)`` and negative part ``a- = max(-a, 0)``; each part is reduced
   over channels with ``R`` = ``max_abs`` (max), ``sum`` or ``l2`` (Euclidean norm). Then
   ``positive`` is ``R(a+)``, ``negative`` is ``-R(a-)`` and ``both`` is ``R(a+) - R(a-)``.
   One rule covers every pair: a ``negative`` pixel is never hidden because a stronger positive
   channel shares it, the ``both`` map is exactly ``positive`` plus ``negative``, and for ``sum``
   the ``both`` map is the plain signed channel sum. With one channel (CAM methods) every
   reduction gives the attribution itself. Values stay in attribution units and keep their sign
   (``negative`` maps are <= 0); "shown as magnitude" happens at display time.
2. **Coarsening** (``coarse_size``): the map (and, for ``npy-f16``, each raw channel) is
   average-pooled to ``min(coarse_size, H) x min(coarse_size, W)`` cells. Every encoding then
   carries only that grid, never the full-resolution values; only ``overlay`` is drawn at the
   input's size, with each cell repeated (nearest neighbour) so that it lines up with the image.
3. **Clipping to the display range** with percentiles ``(lower, upper)`` of the map's magnitude
   ``|m|``, computed like ``numpy.percentile`` (linear interpolation):
   - ``positive``/``negative``: ``lo, hi = percentile(|m|, lower), percentile(|m|, upper)``;
     ``|m|`` is clipped to ``[lo, hi]`` and ``pixel = round(255 * (|m| - lo) / (hi - lo))``
     (all 0 when ``hi == lo``). ``scale = {"min": s*lo, "max": s*hi}`` with ``s = +1`` for
     ``positive`` and ``-1`` for ``negative``.
   - ``both``: ``floor, M = percentile(|m|, lower), percentile(|m|, upper)``; values with
     ``|m| < floor`` become 0 (a noise floor; none with the default ``lower = 0``), the rest are
     clipped to ``[-M, M]``, and ``pixel = round(127.5 * (m / M + 1))``: ``-M`` -> 0, 0 -> 128,
     ``+M`` -> 255. ``scale = {"min": -M, "max": M}``.

   In every case ``scale.min`` is the attribution value at pixel 0 and ``scale.max`` the value at
   pixel 255, so a client maps a pixel (or palette index) ``p`` back with
   ``value = min + p / 255 * (max - min)``, exact to half a quantisation step
   ``|max - min| / 255`` for values inside the display range. (For ``negative``, ``min`` is
   therefore the larger number: pixel 255 is the most negative value.)
4. **Encoding** (``payload["shape"]`` is always the shape of what ``data`` holds):
   - ``png``: the pixels as an 8-bit PNG, base64. Colour map ``gray`` gives a grayscale (``L``)
     PNG; other maps give an 8-bit palette PNG whose palette is the colour map, which every decoder
     shows in colour at a third of the bytes of RGB, and whose indices are the pixels ``p`` above.
     ``shape = [h, w]`` of the (possibly coarse) map.
   - ``overlay``: RGB PNG of the input size, ``shape = [H, W]``. With ``w`` the pixel's strength
     (``(|m| - lo) / (hi - lo)`` single-sided, ``|m| / M`` for ``both``, so 0 where there is no
     attribution) and ``a = overlay_alpha * w``: ``out = round((1 - a) * base + a * colour)``.
     The base is the input image (``original``), its luminance ``0.299 R + 0.587 G + 0.114 B``
     (``grayscale``, ITU-R 601 as in Pillow's ``convert("L")``) or black (``none``).
   - ``npy-f16``: base64 of ``numpy.save`` of the raw attributions as float16, ``shape = [C, h, w]``
     and ``"dtype": "float16"``; neither polarity nor reduction is applied to the data.
   - ``json``: the reduced map (polarity applied, not clipped) as nested lists of floats,
     ``shape = [h, w]``, for maps of at most ``JSON_MAX_CELLS`` cells.
   ``scale`` is the same display range for every encoding, so a client that colours ``json`` or
   ``npy-f16`` data itself can match the server's images.
5. **Frame** (``frame``): ``input`` is everything above, at the model's input size. ``image``
   carries the (possibly coarse) map, and for ``npy-f16`` each raw channel, back to the image the
   client sent (``serving.frames``: bilinear, or flat cells for a coarse map; 0 outside the centre
   crop) after the display range was taken from the input-frame map, so ``scale`` is the same in
   both frames and the area the model never saw shows "no attribution": palette index 0 (128 for
   ``both``), and the unchanged image under an overlay. ``shape`` is the image's ``[H, W]``
   (smaller, same aspect ratio, when it has more than ``caps.max_frame_pixels`` pixels), the
   overlay is blended over the client's image, and the entry says ``"frame": "image"``.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from serving.frames import ImageFrame
from serving.rendering.colormaps import colormap_lut
from explainers.errors import ExplanationFailedError, InvalidInputError, InvalidOptionError
from serving.rendering.options import Polarity, Reduction, RenderOptions

__all__ = [
    "JSON_MAX_CELLS", "QuantisedMap", "RenderOptions", "display_range", "encode_attribution", "quantise_map",
    "reduce_channels", "require_json_frame_size",
]

# The json encoding spends ~10 bytes per value; beyond a 64x64 map a PNG or npy-f16 is the right tool.
JSON_MAX_CELLS = 4096

_FLOAT16_MAX = float(np.finfo(np.float16).max)
_FLOAT32_MAX = float(np.finfo(np.float32).max)

_REDUCERS = {
    "max_abs": lambda parts: parts.amax(dim=0),
    "sum": lambda parts: parts.sum(dim=0),
    "l2": lambda parts: torch.linalg.vector_norm(parts, dim=0),
}


def reduce_channels(attribution: torch.Tensor, *, reduce: Reduction, polarity: Polarity) -> torch.Tensor:
    """Reduce ``[C, H, W]`` attributions to one signed ``[H, W]`` map (step 1 of the module doc).

    Raises:
        InvalidOptionError: unknown ``reduce`` or ``polarity``.
    """
    if reduce not in _REDUCERS:
        raise InvalidOptionError(f"rendering option 'reduce' must be one of {', '.join(_REDUCERS)}; got {reduce!r}")
    reducer = _REDUCERS[reduce]
    if polarity == "positive":
        reduced = reducer(attribution.clamp(min=0))
    elif polarity == "negative":
        reduced = -reducer((-attribution).clamp(min=0))
    elif polarity == "both":
        reduced = reducer(attribution.clamp(min=0)) - reducer((-attribution).clamp(min=0))
    else:
        raise InvalidOptionError(f"rendering option 'polarity' must be positive, negative or both; got {polarity!r}")
    return reduced + 0.0  # turns -0.0 into 0.0, so no "-0.0" reaches a JSON payload


@dataclass(frozen=True)
class QuantisedMap:
    """A signed map turned into display pixels (step 3 of the module doc).

    Attributes:
        pixels: ``[h, w]`` uint8, the colour-map index of each cell.
        strength: ``[h, w]`` float in ``[0, 1]``: how far each cell is from "no attribution"
            (0 at the bottom of a single-sided range or at 0 for ``both``, 1 at the clip limit).
        value_at_0: attribution value shown by pixel 0 (``scale.min``).
        value_at_255: attribution value shown by pixel 255 (``scale.max``).
    """

    pixels: np.ndarray
    strength: np.ndarray
    value_at_0: float
    value_at_255: float


def display_range(signed_map: np.ndarray, clip: tuple[float, float]) -> tuple[float, float]:
    """The ``clip`` percentiles of the map's magnitude (step 3 of the module doc)."""
    lower_value, upper_value = np.percentile(np.abs(signed_map.astype(np.float64)), clip)
    return float(lower_value), float(upper_value)


def quantise_map(signed_map: np.ndarray, *, polarity: Polarity, clip: tuple[float, float],
                 value_range: tuple[float, float] | None = None) -> QuantisedMap:
    """Clip a signed map to its percentile display range and quantise it to 0..255.

    ``value_range`` gives that range instead (the input-frame map's, for a map carried to the
    image frame, whose zeros outside the crop must not move the percentiles).

    Raises:
        InvalidOptionError: unknown ``polarity``.
    """
    magnitude = np.abs(signed_map.astype(np.float64))
    lower_value, upper_value = value_range if value_range is not None else display_range(signed_map, clip)
    if polarity in ("positive", "negative"):
        span = upper_value - lower_value
        if span > 0:
            strength = (np.clip(magnitude, lower_value, upper_value) - lower_value) / span
        else:  # a flat map: every cell shows the one value it has, at pixel 0
            strength = np.zeros_like(magnitude)
        pixels = np.rint(255.0 * strength).astype(np.uint8)
        sign = 1.0 if polarity == "positive" else -1.0
        return QuantisedMap(pixels, strength, sign * lower_value + 0.0, sign * upper_value + 0.0)
    if polarity == "both":
        limit = upper_value
        kept = np.where(magnitude < lower_value, 0.0, np.clip(signed_map, -limit, limit))
        relative = kept / limit if limit > 0 else np.zeros_like(kept)
        pixels = np.rint(127.5 * (relative + 1.0)).astype(np.uint8)
        return QuantisedMap(pixels, np.abs(relative), -limit + 0.0, limit)
    raise InvalidOptionError(f"rendering option 'polarity' must be positive, negative or both; got {polarity!r}")


def encode_attribution(
    attribution: torch.Tensor,
    *,
    options: RenderOptions,
    image: torch.Tensor | None = None,
    image_frame: ImageFrame | None = None,
) -> dict[str, Any]:
    """Render one explanation as ``{"encoding", "shape", "data", "scale"}`` (see the module doc).

    Args:
        attribution: float tensor ``[C, H, W]`` (any device).
        options: validated rendering options.
        image: the picture under an ``overlay`` (unless ``overlay_base`` is ``none``), float
            ``[3, H, W]`` in ``[0, 1]``: the model's input before normalisation, or with
            ``image_frame`` the client's image at ``image_frame.size``.
        image_frame: where to draw the map when ``options.frame`` is ``image`` (ignored otherwise).

    Raises:
        InvalidInputError: ``attribution`` is not a float ``[C, H, W]`` tensor, or ``image`` is
            missing (when needed) or not a float ``[3, H, W]`` tensor of the same ``H, W``.
        InvalidOptionError: ``json`` for a map of more than ``JSON_MAX_CELLS`` cells, or
            ``npy-f16`` for values beyond float16's range (±65504).
        ExplanationFailedError: the attribution holds NaN or infinite values.
    """
    raw = _validated_attribution(attribution)
    signed_map = _coarsened(reduce_channels(raw, reduce=options.reduce, polarity=options.polarity), options.coarse_size)
    frame = image_frame if options.frame == "image" else None
    if frame is None:
        shown, value_range, overlay_size = signed_map, None, tuple(raw.shape[1:])
    else:
        if options.encoding == "json":
            require_json_frame_size(frame.size)  # before resampling a map that cannot be sent
        cells = tuple(signed_map.shape) != tuple(raw.shape[1:])
        shown = frame.carry(signed_map, cells=cells)
        value_range, overlay_size = display_range(signed_map.numpy(), options.clip), frame.size
    quantised = quantise_map(shown.numpy(), polarity=options.polarity, clip=options.clip, value_range=value_range)
    scale = {"min": _compact_float(quantised.value_at_0), "max": _compact_float(quantised.value_at_255)}
    map_shape = list(shown.shape)

    if options.encoding == "png":
        payload = {"shape": map_shape, "data": _png_base64(_heatmap_image(quantised.pixels, options))}
    elif options.encoding == "overlay":
        height, width = overlay_size
        base = _overlay_base(image, options.overlay_base, (height, width))
        payload = {"shape": [height, width], "data": _png_base64(_overlay_image(quantised, base, options))}
    elif options.encoding == "npy-f16":
        raw_values = _coarsened(raw, options.coarse_size)
        if frame is not None:
            raw_values = frame.carry(raw_values, cells=cells)
        raw_values = raw_values.numpy()
        payload = {"shape": list(raw_values.shape), "dtype": "float16", "data": _npy_f16_base64(raw_values)}
    elif options.encoding == "json":
        payload = {"shape": map_shape, "data": _json_values(shown.numpy())}
    else:  # RenderOptions rejects other names; this guards a hand-built instance
        raise InvalidOptionError(f"rendering option 'encoding' is not supported: {options.encoding!r}")
    framed = {"frame": "image"} if frame is not None else {}
    return {"encoding": options.encoding, **framed, **payload, "scale": scale}


def _validated_attribution(attribution: Any) -> torch.Tensor:
    if not isinstance(attribution, torch.Tensor):
        raise InvalidInputError(f"attribution must be a torch.Tensor, got {type(attribution).__name__}")
    if attribution.ndim != 3 or min(attribution.shape) < 1:
        raise InvalidInputError(
            f"attribution must have shape [C, H, W] with C, H, W >= 1; got {list(attribution.shape)}"
        )
    if not attribution.is_floating_point():
        raise InvalidInputError(f"attribution must be a floating-point tensor, got {attribution.dtype}")
    # float64 on the CPU: a float32 channel sum or L2 norm could overflow, and numpy needs the CPU.
    values = attribution.detach().to(device="cpu", dtype=torch.float64)
    non_finite = int((~torch.isfinite(values)).sum())
    if non_finite:
        raise ExplanationFailedError(f"the attribution has {non_finite} NaN or infinite values; nothing to render")
    return values


def _coarsened(values: torch.Tensor, coarse_size: int | None) -> torch.Tensor:
    """Average-pool the last two dimensions to at most ``coarse_size`` cells each."""
    if coarse_size is None:
        return values
    height, width = values.shape[-2:]
    grid = (min(coarse_size, height), min(coarse_size, width))
    if grid == (height, width):
        return values
    if values.ndim == 2:
        return F.adaptive_avg_pool2d(values.unsqueeze(0), grid).squeeze(0)
    return F.adaptive_avg_pool2d(values, grid)


def _heatmap_image(pixels: np.ndarray, options: RenderOptions) -> Image.Image:
    heatmap = Image.fromarray(pixels)  # mode "L"
    if options.active_colormap != "gray":
        # Pillow turns an "L" image into "P" when given a palette; the pixels stay the indices.
        heatmap.putpalette(colormap_lut(options.active_colormap, diverging=options.polarity == "both").tobytes())
    return heatmap


def _overlay_base(image: torch.Tensor | None, base: str, size: tuple[int, int]) -> np.ndarray:
    """The ``[H, W, 3]`` float64 canvas, in 0..255, that the heat colours are blended over."""
    if base == "none":
        return np.zeros((*size, 3))
    if image is None:
        raise InvalidInputError(f"the overlay encoding with overlay_base {base!r} needs the input image")
    if not isinstance(image, torch.Tensor) or not image.is_floating_point() or tuple(image.shape) != (3, *size):
        shape = list(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise InvalidInputError(f"the overlay image must be a float tensor [3, {size[0]}, {size[1]}]; got {shape}")
    # clamp: resampling may overshoot [0, 1] by rounding error, and 255.0001 must not wrap around
    rgb = image.detach().to(device="cpu", dtype=torch.float64).clamp(0.0, 1.0).permute(1, 2, 0).numpy() * 255.0
    if base == "grayscale":
        luminance = rgb @ np.array([0.299, 0.587, 0.114])
        return np.repeat(luminance[..., None], 3, axis=2)
    return rgb


def _overlay_image(quantised: QuantisedMap, base: np.ndarray, options: RenderOptions) -> Image.Image:
    height, width = base.shape[:2]
    grid_height, grid_width = quantised.pixels.shape
    pixels, strength = quantised.pixels, quantised.strength
    if (grid_height, grid_width) != (height, width):  # nearest-neighbour expansion of a coarse grid
        rows = (np.arange(height) * grid_height) // height
        columns = (np.arange(width) * grid_width) // width
        pixels, strength = pixels[np.ix_(rows, columns)], strength[np.ix_(rows, columns)]

    colours = colormap_lut(options.active_colormap, diverging=options.polarity == "both")[pixels].astype(np.float64)
    alpha = (options.overlay_alpha * strength)[..., None]
    blended = (1.0 - alpha) * base + alpha * colours
    return Image.fromarray(np.clip(np.rint(blended), 0, 255).astype(np.uint8))  # mode "RGB"


def _png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _npy_f16_base64(raw_values: np.ndarray) -> str:
    largest = float(np.abs(raw_values).max())
    if largest > _FLOAT16_MAX:
        raise InvalidOptionError(
            f"rendering option 'encoding': npy-f16 cannot hold attribution values beyond ±{_FLOAT16_MAX:g} "
            f"(this one reaches {largest:g}); use png, overlay or json"
        )
    buffer = io.BytesIO()
    np.save(buffer, raw_values.astype(np.float16), allow_pickle=False)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _json_values(signed_map: np.ndarray) -> list[list[float]]:
    _require_json_size(*signed_map.shape)
    return [[_compact_float(value) for value in row] for row in signed_map.tolist()]


def require_json_frame_size(size: tuple[int, int]) -> None:
    """Refuses ``json`` for a map in the image frame of more than ``JSON_MAX_CELLS`` pixels.

    Raises:
        InvalidOptionError: naming the image frame's size and what to ask for instead.
    """
    height, width = size
    if height * width > JSON_MAX_CELLS:
        raise InvalidOptionError(
            f"rendering option 'encoding': json is for small maps (at most {JSON_MAX_CELLS} values); in the image "
            f"frame this map is {height}x{width}: use png or npy-f16, or frame 'input' with a coarse_size")


def _require_json_size(height: int, width: int) -> None:
    if height * width > JSON_MAX_CELLS:
        raise InvalidOptionError(
            f"rendering option 'encoding': json is for small maps (at most {JSON_MAX_CELLS} cells), this one is "
            f"{height}x{width}; set coarse_size to at most {int(JSON_MAX_CELLS**0.5)} or use png or npy-f16"
        )


def _compact_float(value: float) -> float:
    """The float32 nearest ``value``, as the float whose repr is shortest (``0.1``, not ``0.10000000149011612``).

    Attributions carry float32 precision, and the short form halves the bytes of a JSON payload.
    Values beyond float32's range are kept as they are rather than becoming infinite.
    """
    single = np.float32(value) if abs(value) <= _FLOAT32_MAX else None
    return float(value) if single is None else float(str(single)) + 0.0
