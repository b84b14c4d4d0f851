"""Property: for any bytes, decode_image returns an RGB image or raises one of our client errors.

Run longer with e.g. ``XAI_FUZZ_EXAMPLES=20000 pytest tests/test_images_fuzz.py``.
"""

import io
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from explainers.errors import InvalidInputError, PayloadTooLargeError
from serving.images import decode_image

FUZZ_EXAMPLES = int(os.environ.get("XAI_FUZZ_EXAMPLES", "200"))
MAX_PIXELS = 1_000_000

fuzz_settings = settings(
    max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)


def _encode(image: Image.Image, image_format: str, **save_options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **save_options)
    return buffer.getvalue()


def _seed_files() -> list[bytes]:
    """Small valid files of every supported format: mutating them reaches the decoders' inner code."""
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8))
    palette = rgb.convert("P")
    sixteen_bit = Image.fromarray(np.arange(120, dtype=np.uint16).reshape(12, 10) * 500)
    return [
        _encode(rgb, "PNG"),
        _encode(rgb.convert("RGBA"), "PNG"),
        _encode(palette, "PNG", transparency=3),
        _encode(sixteen_bit, "PNG"),
        _encode(rgb, "JPEG", quality=80),
        _encode(Image.new("CMYK", (10, 12), (10, 20, 30, 40)), "JPEG"),
        _encode(rgb, "WEBP", lossless=True),
        _encode(rgb, "WEBP", quality=50),
        _encode(palette, "GIF", save_all=True, append_images=[palette.rotate(90)]),
        _encode(rgb, "BMP"),
        _encode(palette, "BMP"),
        _encode(rgb, "TIFF"),
        _encode(Image.new("F", (10, 12), 0.5), "TIFF"),
    ]


SEEDS = _seed_files()


@st.composite
def mutated_images(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 8))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        del data[draw(st.integers(0, len(data))) :]
    return bytes(data)


def _assert_rgb_or_client_error(data: bytes) -> None:
    try:
        image = decode_image(data, max_pixels=MAX_PIXELS)
    except (InvalidInputError, PayloadTooLargeError) as client_error:
        assert 400 <= client_error.http_status < 500
        return
    assert isinstance(image, Image.Image) and image.mode == "RGB"
    width, height = image.size
    assert 0 < width * height <= MAX_PIXELS
    image.tobytes()  # the pixels are really there


# Pillow warns about the corrupt metadata it skips; expected here, and noise in the report.
@pytest.mark.filterwarnings("ignore::UserWarning")
@fuzz_settings
@given(st.binary(max_size=4096))
def test_arbitrary_bytes_decode_to_rgb_or_raise_a_client_error(data):
    _assert_rgb_or_client_error(data)


@pytest.mark.filterwarnings("ignore::UserWarning")
@fuzz_settings
@given(mutated_images())
def test_mutated_real_images_decode_to_rgb_or_raise_a_client_error(data):
    _assert_rgb_or_client_error(data)


def test_the_seeds_themselves_decode():
    for seed in SEEDS:
        assert decode_image(seed, max_pixels=MAX_PIXELS).size in ((10, 12), (12, 10))
