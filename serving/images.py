"""Request bytes -> RGB image -> model input, safely: the bytes come from untrusted clients.

``decode_image`` accepts the formats people send (PNG, JPEG, WebP, GIF, BMP, TIFF), reads only
the first frame, and turns every colour mode into 8-bit RGB. Safety rules:

- The pixel count in the header is checked against ``max_pixels`` before any pixel data is
  decoded (``Image.open`` is lazy), so a small file claiming a huge canvas costs nothing.
- Pillow's own decompression-bomb check (its process-wide ``Image.MAX_IMAGE_PIXELS``, which this
  module never reads or changes) is honoured too, its warning made an error only inside this call.
  The effective cap is therefore the smaller of the two.
- The image is fully decoded here, so truncated or corrupt data fails now, as ``ImageDecodeError``,
  not later inside the model code. ``ImageFile.LOAD_TRUNCATED_IMAGES`` is left alone.
- Only the listed formats are tried: Pillow also opens formats whose decoders are rarely exercised
  (and EPS, which runs Ghostscript), which a public endpoint has no reason to offer.

Colour handling follows what models were trained on (torchvision loads images with Pillow's
``convert("RGB")``): embedded ICC profiles are not applied, and CMYK uses Pillow's conversion.
The EXIF orientation is applied, so the model sees the photo the way the client's viewer shows it.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from explainers.errors import (
    ImageDecodeError,
    InvalidInputError,
    InvalidOptionError,
    PayloadTooLargeError,
    PluginError,
    ResourceExhaustedError,
)

from .frames import FrameGeometry

__all__ = ["INTERPOLATIONS", "SUPPORTED_FORMATS", "FrameGeometry", "Preprocessor", "decode_image", "to_model_input", "unit_image"]

# Pillow's JPEG opener also reads the multi-picture JPEGs (format "MPO") many cameras write.
SUPPORTED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")

RGBColour = tuple[int, int, int]

_MODES_WITH_ALPHA = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_SIXTEEN_BIT_MAX = 65535


def decode_image(
    data: bytes,
    *,
    max_pixels: int,
    background: RGBColour = (0, 0, 0),
    formats: Sequence[str] = SUPPORTED_FORMATS,
) -> Image.Image:
    """Decode the first frame of an image file into an 8-bit RGB image.

    Transparent pixels (alpha channel, transparent palette entry or colour key) are composited
    over ``background``. 16-bit images (``I;16*``, and ``I``, read as 16-bit values) are scaled to
    8 bits, 65535 -> 255, rather than clipped; float images (``F``) are read as 0..1, like
    torchvision's float tensors, with NaN as 0.

    Args:
        data: the file's bytes.
        max_pixels: largest accepted width x height, checked from the header before decoding.
        background: RGB colour under transparent pixels.
        formats: Pillow format names to try; others are rejected without being parsed.

    Raises:
        ImageDecodeError: empty or non-bytes data, an unsupported format or colour mode, a zero
            width or height, or data that is truncated or corrupt.
        PayloadTooLargeError: more than ``max_pixels`` pixels (``cap="max_image_pixels"``), or
            above Pillow's own decompression-bomb limit.
        InvalidOptionError: ``max_pixels``, ``background`` or ``formats`` is malformed (a
            configuration error).
        ResourceExhaustedError: the decoder ran out of memory.
    """
    _require_positive_int("max_pixels", max_pixels)
    _require_rgb_colour(background)
    _require_known_formats(formats)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageDecodeError(f"image data must be bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise ImageDecodeError("the image is empty (0 bytes)")

    with warnings.catch_warnings():
        # Makes Pillow's own bomb warning an error for this call. catch_warnings swaps the
        # process-wide filter list (not thread-safe), so our size check below does not rely on it.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data), formats=list(formats)) as image:
                _require_acceptable_size(image.size, max_pixels)
                image.load()  # decode every pixel now: truncation and corruption surface here
                return _to_rgb(_upright(image), background)
        except PluginError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as bomb:
            raise PayloadTooLargeError(
                f"the image is larger than the decoder's safety limit: {bomb}", cap="max_image_pixels"
            ) from bomb
        except UnidentifiedImageError as unidentified:
            raise ImageDecodeError(
                f"the data is not an image in a supported format ({', '.join(formats)})"
            ) from unidentified
        except MemoryError as exhausted:
            raise ResourceExhaustedError("ran out of memory while decoding the image") from exhausted
        except Exception as broken:
            # Pillow's decoders raise a wide, undocumented set of types on hostile input
            # (OSError, SyntaxError, ValueError, EOFError, struct.error...): all mean "bad image".
            message = f"the image is truncated or corrupt: {type(broken).__name__}: {broken}"
            raise ImageDecodeError(message) from broken


# Pillow filters by the names model pipelines use (torchvision's InterpolationMode, timm's configs).
INTERPOLATIONS: dict[str, Image.Resampling] = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
}


class Preprocessor:
    """Resize, crop and normalise images for one model; every setting is validated once, here.

    Two geometries:

    - ``resize=None``: the image is resized straight to the input size (its aspect ratio is not
      kept), the whole picture reaches the model.
    - ``resize=S``: the shorter side is resized to ``S`` (the longer one to ``int(S * long/short)``),
      then the centre ``size`` crop is taken, as torchvision's ``Resize(S)`` + ``CenterCrop(size)``
      on Pillow images (the crop offset rounds half to even, like theirs). ``S`` must be at least
      the larger input side, so the crop never needs padding.

    The filter is Pillow's (``bilinear``, ``bicubic`` or ``nearest``); bilinear and bicubic widen
    their support when shrinking (antialiased), as torchvision's ``Resize`` does on Pillow images.
    Normalisation is ``(p/255 − mean)/std`` in torchvision's order of operations (``ToTensor``
    then ``Normalize``), so inputs are bit-identical to a torchvision pipeline's: a fused
    multiply-add would differ in the last bit and reorder the ties of a coarse map.

    Raises:
        InvalidOptionError: ``size``, ``resize``, ``interpolation``, ``mean`` or ``std`` is
            malformed, a ``std`` is not > 0, or ``resize`` is smaller than an input side.
    """

    def __init__(self, *, size: tuple[int, int], mean: Sequence[float], std: Sequence[float],
                 resize: int | None = None, interpolation: str = "bilinear"):
        self.height, self.width = _validated_size(size)
        if resize is not None:
            _require_positive_int("resize", resize)
            if resize < max(self.height, self.width):
                raise InvalidOptionError(
                    f"'resize' ({resize}) must be at least the larger input side ({max(self.height, self.width)}): "
                    "the centre crop is taken from the resized image")
        if interpolation not in INTERPOLATIONS:
            raise InvalidOptionError(f"'interpolation' must be one of {', '.join(INTERPOLATIONS)}, got {interpolation!r}")
        self.resize = resize
        self._filter = INTERPOLATIONS[interpolation]
        mean_tensor = _channel_values("mean", mean)
        std_tensor = _channel_values("std", std)
        if not bool((std_tensor > 0).all()):
            raise InvalidOptionError(f"'std' must be positive for every channel, got {list(std)}")
        self._mean, self._std = mean_tensor, std_tensor

    def geometry(self, original_size: tuple[int, int]) -> FrameGeometry:
        """Where the model input lies in an image of ``original_size`` ``(height, width)``."""
        height, width = original_size
        if self.resize is None:
            return FrameGeometry(original_size, (self.height, self.width), (0, 0, self.height, self.width))
        # torchvision's Resize(int): the shorter side becomes `resize`, the longer one truncates.
        if height <= width:
            resized = (self.resize, int(self.resize * width / height))
        else:
            resized = (int(self.resize * height / width), self.resize)
        # torchvision's CenterCrop rounds the offset with Python's round (half to even).
        top = int(round((resized[0] - self.height) / 2.0))
        left = int(round((resized[1] - self.width) / 2.0))
        return FrameGeometry(original_size, resized, (top, left, self.height, self.width))

    def pixels(self, image: Image.Image) -> torch.Tensor:
        """The model's view of the image as uint8 ``[3, H, W]``.

        Raises:
            InvalidInputError: ``image`` is not an RGB ``PIL.Image.Image``.
        """
        return self.prepare(image)[0]

    def prepare(self, image: Image.Image) -> tuple[torch.Tensor, FrameGeometry]:
        """uint8 ``[3, H, W]`` pixels of the model input and the geometry that maps them back.

        Raises:
            InvalidInputError: ``image`` is not an RGB ``PIL.Image.Image``.
        """
        if not isinstance(image, Image.Image) or image.mode != "RGB":
            mode = image.mode if isinstance(image, Image.Image) else type(image).__name__
            raise InvalidInputError(f"to_model_input needs an RGB PIL image, got {mode}")
        geometry = self.geometry((image.height, image.width))
        if image.size != (self.width, self.height) or self.resize is not None:
            image = self._resample(image, geometry)
        return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1), geometry

    def _resample(self, image: Image.Image, geometry: FrameGeometry) -> Image.Image:
        (resized_height, resized_width), (top, left, height, width) = geometry.resized_size, geometry.crop_box
        if (resized_height, resized_width) == (image.height, image.width):  # torchvision skips this resize too
            return image.crop((left, top, left + width, top + height))
        # The whole image is resized, then cropped: Pillow's `box` (resampling the crop only) is
        # faster on large photos but rounds its filter taps differently, one level off torchvision
        # on up to a quarter of the pixels.
        resized = image.resize((resized_width, resized_height), resample=self._filter)
        return resized.crop((left, top, left + width, top + height))

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """float32 ``[1, 3, H, W]`` model input from uint8 ``[3, H, W]`` pixels."""
        return pixels.to(torch.float32).div_(255.0).sub_(self._mean).div_(self._std).unsqueeze(0)


def to_model_input(
    image: Image.Image, *, size: tuple[int, int], mean: Sequence[float], std: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize an RGB image to the model's input size and normalise it (see :class:`Preprocessor`).

    Returns:
        ``(model_input, resized)``: float32 ``[1, 3, H, W]`` equal to ``(resized - mean) / std``,
        and the resized image itself as float32 ``[3, H, W]`` in ``[0, 1]`` (for overlays).

    Raises:
        InvalidInputError: ``image`` is not an RGB ``PIL.Image.Image``.
        InvalidOptionError: ``size``, ``mean`` or ``std`` is malformed, or a ``std`` is not > 0.
    """
    preprocessor = Preprocessor(size=size, mean=mean, std=std)
    pixels = preprocessor.pixels(image)
    return preprocessor.normalise(pixels), unit_image(pixels)


def unit_image(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 ``[3, H, W]`` pixels as float32 in ``[0, 1]``."""
    return pixels.to(torch.float32) / 255.0


def _require_acceptable_size(size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"the image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise PayloadTooLargeError(
            f"the image is {width}x{height} = {width * height} pixels, more than the {max_pixels} allowed",
            cap="max_image_pixels",
        )


def _upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag, if any; an unreadable EXIF block leaves the image as stored."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:
        # The pixels decoded fine; a malformed metadata block is no reason to refuse the request.
        return image


def _to_rgb(image: Image.Image, background: RGBColour) -> Image.Image:
    mode = image.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _high_depth_gray_to_rgb(image, background)
    if mode in _MODES_WITH_ALPHA or "transparency" in image.info:
        return _composite(image.convert("RGBA"), background)
    try:
        return image.convert("RGB")
    except ValueError as unsupported:  # e.g. LAB: Pillow has no plain conversion to RGB
        raise ImageDecodeError(f"unsupported colour mode {mode!r}") from unsupported


def _high_depth_gray_to_rgb(image: Image.Image, background: RGBColour) -> Image.Image:
    """Scale 16/32-bit integer or float grayscale to 8 bits (Pillow's own conversion clips at 255)."""
    values = np.asarray(image).astype(np.float64)
    if image.mode == "F":
        gray = np.nan_to_num(values, nan=0.0, posinf=1.0, neginf=0.0).clip(0.0, 1.0) * 255.0
    else:
        gray = values.clip(0, _SIXTEEN_BIT_MAX) * (255.0 / _SIXTEEN_BIT_MAX)
    rgb = Image.fromarray(np.rint(gray).astype(np.uint8)).convert("RGB")
    transparent_value = image.info.get("transparency")
    if isinstance(transparent_value, (int, float)):  # a PNG colour key on 16-bit grayscale
        alpha = np.where(values == transparent_value, 0, 255).astype(np.uint8)
        rgba = rgb.copy()
        rgba.putalpha(Image.fromarray(alpha))
        return _composite(rgba, background)
    return rgb


def _composite(rgba: Image.Image, background: RGBColour) -> Image.Image:
    canvas = Image.new("RGBA", rgba.size, (*background, 255))
    return Image.alpha_composite(canvas, rgba).convert("RGB")


def _require_positive_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidOptionError(f"{name!r} must be a positive integer, got {value!r}")


def _require_rgb_colour(colour: object) -> None:
    if (
        not isinstance(colour, (tuple, list))
        or len(colour) != 3
        or not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in colour)
    ):
        raise InvalidOptionError(f"'background' must be three integers in 0..255, got {colour!r}")


def _require_known_formats(formats: Sequence[str]) -> None:
    Image.init()  # registers every plugin's opener; a no-op after the first call
    if isinstance(formats, str) or not formats or any(
        not isinstance(name, str) or name.upper() not in Image.OPEN for name in formats
    ):
        raise InvalidOptionError(f"'formats' must name image formats Pillow can open, got {formats!r}")


def _validated_size(size: object) -> tuple[int, int]:
    if not isinstance(size, (tuple, list)) or len(size) != 2:
        raise InvalidOptionError(f"'size' must be (height, width), got {size!r}")
    for side in size:
        _require_positive_int("size", side)
    return int(size[0]), int(size[1])


def _channel_values(name: str, values: Sequence[float]) -> torch.Tensor:
    return _checked_channel_values(name, values)


def _checked_channel_values(name: str, values: Sequence[float]) -> torch.Tensor:
    try:
        tensor = torch.as_tensor([float(v) for v in values], dtype=torch.float32)
    except (TypeError, ValueError) as malformed:
        raise InvalidOptionError(f"{name!r} must be three numbers, got {values!r}") from malformed
    if tensor.shape != (3,) or not bool(torch.isfinite(tensor).all()):
        raise InvalidOptionError(f"{name!r} must be three finite numbers, got {values!r}")
    return tensor.view(3, 1, 1)
