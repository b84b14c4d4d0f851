"""decode_image and to_model_input on a corpus generated here with Pillow, plus hostile inputs."""

import io
import resource
import struct
import time
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from explainers.errors import ImageDecodeError, InvalidInputError, InvalidOptionError, PayloadTooLargeError
from serving.images import decode_image, to_model_input

MAX_PIXELS = 1_000_000

# Nine distinct colours, so that any transposition or channel swap shows.
REFERENCE_RGB = np.array(
    [
        [[255, 0, 0], [0, 255, 0], [0, 0, 255]],
        [[255, 255, 0], [0, 255, 255], [255, 0, 255]],
        [[0, 0, 0], [128, 128, 128], [255, 255, 255]],
    ],
    dtype=np.uint8,
)
GRAY_ROW = np.array([[0, 77, 128, 200, 255]], dtype=np.uint8)


def encode(image: Image.Image, image_format: str, **save_options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **save_options)
    return buffer.getvalue()


def decoded_pixels(data: bytes, **options) -> np.ndarray:
    image = decode_image(data, max_pixels=options.pop("max_pixels", MAX_PIXELS), **options)
    assert image.mode == "RGB"
    return np.asarray(image).astype(int)


def gray_as_rgb(values) -> np.ndarray:
    values = np.asarray(values)
    return np.repeat(values[..., None], 3, axis=-1)


def palette_image(colours: list[tuple[int, int, int]], indices) -> Image.Image:
    image = Image.fromarray(np.asarray(indices, dtype=np.uint8)).convert("L")
    image.putpalette([c for colour in colours for c in colour])
    return image


def uniform(mode: str, colour, size=(16, 16)) -> Image.Image:
    return Image.new(mode, size, colour)


# --- lossless formats: every pixel checked ------------------------------------------------------

LOSSLESS_CASES = {
    "png-rgb": (lambda: encode(Image.fromarray(REFERENCE_RGB), "PNG"), REFERENCE_RGB),
    "png-l": (lambda: encode(Image.fromarray(GRAY_ROW), "PNG"), gray_as_rgb(GRAY_ROW)),
    "png-1": (lambda: encode(Image.fromarray(GRAY_ROW).convert("1", dither=Image.Dither.NONE), "PNG"),
              gray_as_rgb([[0, 0, 255, 255, 255]])),  # threshold at 128
    "png-p": (lambda: encode(palette_image([(10, 20, 30), (200, 100, 0)], [[0, 1, 1]]), "PNG"),
              np.array([[[10, 20, 30], [200, 100, 0], [200, 100, 0]]])),
    "webp-lossless-rgb": (lambda: encode(Image.fromarray(REFERENCE_RGB), "WEBP", lossless=True), REFERENCE_RGB),
    "bmp-rgb": (lambda: encode(Image.fromarray(REFERENCE_RGB), "BMP"), REFERENCE_RGB),
    "bmp-l": (lambda: encode(Image.fromarray(GRAY_ROW), "BMP"), gray_as_rgb(GRAY_ROW)),
    "bmp-p": (lambda: encode(palette_image([(10, 20, 30), (200, 100, 0), (1, 2, 3)], [[2, 1, 0]]), "BMP"),
              np.array([[[1, 2, 3], [200, 100, 0], [10, 20, 30]]])),
    "tiff-rgb": (lambda: encode(Image.fromarray(REFERENCE_RGB), "TIFF"), REFERENCE_RGB),
    # CMYK -> RGB: (255 - C)(255 - K)/255 per channel; these values are exact under any rounding
    "tiff-cmyk": (lambda: encode(Image.new("CMYK", (2, 1), (0, 255, 255, 0)), "TIFF"),
                  np.array([[[255, 0, 0], [255, 0, 0]]])),
    # 16-bit: scaled by 255/65535, not clipped at 255 as Pillow's own convert("L") would
    "png-i16": (lambda: encode(Image.fromarray(np.array([[0, 300, 1000, 32768, 65535]], dtype=np.uint16)), "PNG"),
                gray_as_rgb([[0, 1, 4, 128, 255]])),
    "tiff-i16": (lambda: encode(Image.fromarray(np.array([[257, 32768, 65535]], dtype=np.uint16)), "TIFF"),
                 gray_as_rgb([[1, 128, 255]])),
    # mode I is read as 16-bit values (what Pillow produces for 16-bit sources); outside 0..65535 clips
    "tiff-i32": (lambda: encode(Image.fromarray(np.array([[-5, 0, 32768, 65535, 70000]], dtype=np.int32)), "TIFF"),
                 gray_as_rgb([[0, 0, 128, 255, 255]])),
    # mode F is read as 0..1 (0.5 -> 127.5 -> 128); NaN -> 0
    "tiff-f": (lambda: encode(Image.fromarray(np.array([[0, 0.5, 1, 2, np.nan, -1]], dtype=np.float32)), "TIFF"),
               gray_as_rgb([[0, 128, 255, 255, 0, 0]])),
}


@pytest.mark.parametrize("case", list(LOSSLESS_CASES))
def test_lossless_formats_and_modes_decode_to_exact_rgb(case):
    make_bytes, expected = LOSSLESS_CASES[case]
    np.testing.assert_array_equal(decoded_pixels(make_bytes()), expected)


def test_the_corpus_really_covers_each_source_mode():
    source_modes = {case: Image.open(io.BytesIO(make())).mode for case, (make, _) in LOSSLESS_CASES.items()}
    assert source_modes["png-1"] == "1" and source_modes["png-p"] == "P"
    assert source_modes["png-i16"] == "I;16" and source_modes["tiff-i32"] == "I"
    assert source_modes["tiff-f"] == "F" and source_modes["tiff-cmyk"] == "CMYK"


# --- transparency: composited over the background ----------------------------------------------


def test_rgba_is_composited_over_black_by_default_and_over_a_chosen_background():
    rgba = np.array([[[200, 100, 50, 255], [200, 100, 50, 128], [200, 100, 50, 0]]], dtype=np.uint8)
    data = encode(Image.fromarray(rgba), "PNG")
    over_black = decoded_pixels(data)
    # alpha 128/255: 200 * 0.502 = 100.4, 100 * 0.502 = 50.2, 50 * 0.502 = 25.1
    np.testing.assert_allclose(over_black, [[[200, 100, 50], [100, 50, 25], [0, 0, 0]]], atol=1)
    over_grey = decoded_pixels(data, background=(100, 100, 100))
    # 200 * 0.502 + 100 * 0.498 = 150.2, 100 -> 100, 50 * 0.502 + 100 * 0.498 = 74.9
    np.testing.assert_allclose(over_grey, [[[200, 100, 50], [150, 100, 75], [100, 100, 100]]], atol=1)


def test_la_is_composited():
    la = np.array([[[200, 255], [200, 128], [200, 0]]], dtype=np.uint8)
    pixels = decoded_pixels(encode(Image.fromarray(la), "PNG"), background=(0, 0, 255))
    np.testing.assert_allclose(pixels, [[[200, 200, 200], [100, 100, 227], [0, 0, 255]]], atol=1)


def test_palette_with_a_transparent_entry_shows_the_background():
    image = palette_image([(255, 0, 0), (0, 255, 0)], [[0, 1]])
    pixels = decoded_pixels(encode(image, "PNG", transparency=1), background=(10, 20, 30))
    np.testing.assert_array_equal(pixels, [[[255, 0, 0], [10, 20, 30]]])


def test_rgb_png_with_a_colour_key_shows_the_background():
    data = encode(Image.fromarray(REFERENCE_RGB), "PNG", transparency=(0, 255, 0))
    pixels = decoded_pixels(data, background=(7, 8, 9))
    expected = REFERENCE_RGB.astype(int).copy()
    expected[0, 1] = (7, 8, 9)
    np.testing.assert_array_equal(pixels, expected)


def test_sixteen_bit_png_with_a_colour_key_shows_the_background():
    data = encode(Image.fromarray(np.array([[0, 1000, 65535]], dtype=np.uint16)), "PNG", transparency=1000)
    np.testing.assert_array_equal(decoded_pixels(data, background=(1, 2, 3)), [[[0, 0, 0], [1, 2, 3], [255, 255, 255]]])


def test_webp_with_alpha_is_composited():
    rgba = np.array([[[0, 0, 255, 0], [0, 0, 255, 255]]], dtype=np.uint8)
    pixels = decoded_pixels(encode(Image.fromarray(rgba), "WEBP", lossless=True, exact=True), background=(9, 9, 9))
    np.testing.assert_array_equal(pixels, [[[9, 9, 9], [0, 0, 255]]])


def test_gif_gives_its_first_frame_with_transparency():
    red, blue = Image.new("RGB", (4, 4), (255, 0, 0)), Image.new("RGB", (4, 4), (0, 0, 255))
    data = encode(red, "GIF", save_all=True, append_images=[blue])
    assert Image.open(io.BytesIO(data)).n_frames == 2
    np.testing.assert_array_equal(decoded_pixels(data), np.full((4, 4, 3), (255, 0, 0)))

    transparent = encode(palette_image([(0, 255, 0), (1, 1, 1)], [[0, 1]]), "GIF", transparency=1)
    np.testing.assert_array_equal(decoded_pixels(transparent, background=(50, 60, 70)), [[[0, 255, 0], [50, 60, 70]]])


# --- lossy formats: uniform colours, checked within the codec's error ---------------------------


@pytest.mark.parametrize(
    ("mode", "colour", "expected"),
    [
        ("RGB", (200, 100, 50), (200, 100, 50)),
        ("L", 77, (77, 77, 77)),
        ("CMYK", (0, 255, 255, 0), (255, 0, 0)),  # a CMYK JPEG (Adobe inverted) -> red
        ("CMYK", (0, 0, 0, 128), (127, 127, 127)),  # K = 128 -> (255 - 128) grey
    ],
)
def test_jpeg_modes_decode_to_the_right_colour(mode, colour, expected):
    data = encode(uniform(mode, colour), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == mode
    pixels = decoded_pixels(data)
    assert pixels.shape == (16, 16, 3)
    np.testing.assert_allclose(pixels, np.broadcast_to(expected, pixels.shape), atol=3)


def test_lossy_webp_decodes():
    pixels = decoded_pixels(encode(uniform("RGB", (30, 160, 90)), "WEBP", quality=90))
    np.testing.assert_allclose(pixels, np.broadcast_to((30, 160, 90), pixels.shape), atol=4)


def test_exif_orientation_is_applied():
    left_red_right_blue = np.zeros((16, 32, 3), dtype=np.uint8)
    left_red_right_blue[:, :16] = (255, 0, 0)
    left_red_right_blue[:, 16:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": the left half ends up on top
    image = decode_image(encode(Image.fromarray(left_red_right_blue), "PNG", exif=exif), max_pixels=MAX_PIXELS)
    assert image.size == (16, 32)
    assert image.getpixel((8, 4)) == (255, 0, 0) and image.getpixel((8, 28)) == (0, 0, 255)


# --- sizes and shapes -------------------------------------------------------------------------


def test_tiny_and_elongated_images_decode_whole():
    assert decode_image(encode(Image.fromarray(REFERENCE_RGB), "PNG"), max_pixels=9).size == (3, 3)
    ramp = np.tile(np.arange(1000) % 256, (40, 1)).astype(np.uint8)
    wide = decoded_pixels(encode(Image.fromarray(ramp), "PNG"))
    np.testing.assert_array_equal(wide, gray_as_rgb(ramp))
    for size in ((100_000, 1), (1, 100_000)):
        image = decode_image(encode(Image.new("L", size, 9), "PNG"), max_pixels=MAX_PIXELS)
        model_input, resized = to_model_input(image, size=(8, 8), mean=(0, 0, 0), std=(1, 1, 1))
        assert model_input.shape == (1, 3, 8, 8)
        torch.testing.assert_close(resized, torch.full((3, 8, 8), 9 / 255))


# --- rejected inputs --------------------------------------------------------------------------


def noise_image_bytes(image_format: str) -> bytes:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    return encode(Image.fromarray(noise), image_format)


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_file(width: int, height: int, idat: bytes, *, bit_depth: int = 1, colour_type: int = 0) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        ("not bytes", "must be bytes"),
        (np.random.default_rng(1).bytes(1000), "not an image"),
        (b"\x89PNG\r\n\x1a\n", "not an image"),
        (noise_image_bytes("PNG")[:30], "not an image"),  # cut inside the header
        (noise_image_bytes("PNG")[:2000], "truncated or corrupt"),
        (noise_image_bytes("JPEG")[:1500], "truncated or corrupt"),
        (noise_image_bytes("WEBP")[:500], "truncated or corrupt"),
        (png_file(8, 8, b"\x78\x9c\xff\xff\xff\xff"), "truncated or corrupt"),  # broken zlib stream
        (png_file(0, 8, zlib.compress(b"")), "not an image"),  # zero width
        # Pillow raises a bare ValueError here, a type its docs do not promise (found by fuzzing)
        (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", b"") + png_chunk(b"IEND", b""), "ValueError: Truncated IHDR"),
        (encode(Image.new("RGB", (4, 4)), "PPM"), "not an image"),  # Pillow reads it; we do not offer it
    ],
)
def test_unreadable_data_is_an_image_decode_error(data, message):
    with pytest.raises(ImageDecodeError, match=message) as caught:
        decode_image(data, max_pixels=MAX_PIXELS)
    assert caught.value.http_status == 400 and caught.value.code == "invalid_image"


def test_the_format_list_is_configurable():
    ppm = encode(Image.fromarray(REFERENCE_RGB), "PPM")
    np.testing.assert_array_equal(np.asarray(decode_image(ppm, max_pixels=9, formats=("PPM",))), REFERENCE_RGB)
    with pytest.raises(ImageDecodeError, match=r"supported format \(PNG\)"):
        decode_image(encode(Image.fromarray(REFERENCE_RGB), "BMP"), max_pixels=9, formats=("PNG",))


def test_images_over_the_pixel_cap_are_refused():
    data = encode(Image.new("RGB", (20, 10)), "PNG")
    assert decode_image(data, max_pixels=200).size == (20, 10)
    with pytest.raises(PayloadTooLargeError, match="20x10 = 200 pixels, more than the 199") as caught:
        decode_image(data, max_pixels=199)
    assert caught.value.cap == "max_image_pixels" and caught.value.http_status == 413


def bomb_png(side: int) -> bytes:
    """A valid 1-bit PNG of side x side black pixels, zlib-compressed ~1000:1 without building it."""
    compressor = zlib.compressobj(9)
    rows_per_block = 1000
    block = b"\x00" * ((1 + (side + 7) // 8) * rows_per_block)  # filter byte + packed bits, per row
    idat = b"".join(compressor.compress(block) for _ in range(side // rows_per_block)) + compressor.flush()
    return png_file(side, side, idat)


@pytest.fixture
def load_calls(monkeypatch):
    """Counts ImageFile.load calls: a decoded bomb would have gone through it."""
    calls = []
    original_load = ImageFile.ImageFile.load

    def counting_load(self):
        calls.append(self.size)
        return original_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counting_load)
    return calls


def test_a_pixel_bomb_under_pillows_limit_is_refused_from_its_header(load_calls):
    data = bomb_png(4000)  # 16 M pixels in ~2 kB
    assert len(data) < 50_000
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(PayloadTooLargeError, match="4000x4000") as caught:
        decode_image(data, max_pixels=MAX_PIXELS)
    assert caught.value.cap == "max_image_pixels"
    assert load_calls == []
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 8_000  # kB: nothing decoded


def test_a_30000_square_bomb_is_refused_fast_without_decoding(load_calls):
    data = bomb_png(30_000)  # 900 M pixels: ~1 GB once decoded
    assert len(data) < 200_000
    started = time.perf_counter()
    with pytest.raises(PayloadTooLargeError) as caught:
        decode_image(data, max_pixels=10**12)  # even with no cap of ours, Pillow's own limit holds
    assert time.perf_counter() - started < 0.5
    assert caught.value.cap == "max_image_pixels" and load_calls == []


def test_pillows_bomb_warning_becomes_our_error_and_no_global_state_changes(load_calls):
    limit_before, filters_before = Image.MAX_IMAGE_PIXELS, list(warnings.filters)
    header_only = png_file(10_000, 10_000, b"")  # 100 M pixels: between Pillow's warning and error limits
    with pytest.raises(PayloadTooLargeError, match="safety limit"):
        decode_image(header_only, max_pixels=200_000_000)
    assert load_calls == []
    assert Image.MAX_IMAGE_PIXELS == limit_before and warnings.filters == filters_before


@pytest.mark.parametrize(
    ("options", "name"),
    [
        ({"max_pixels": 0}, "max_pixels"),
        ({"max_pixels": 1.5}, "max_pixels"),
        ({"max_pixels": MAX_PIXELS, "background": (0, 0)}, "background"),
        ({"max_pixels": MAX_PIXELS, "background": (0, 0, 256)}, "background"),
        ({"max_pixels": MAX_PIXELS, "formats": ("PNG", "NOPE")}, "formats"),
        ({"max_pixels": MAX_PIXELS, "formats": "PNG"}, "formats"),
    ],
)
def test_malformed_settings_are_invalid_options(options, name):
    with pytest.raises(InvalidOptionError, match=name):
        decode_image(encode(Image.new("RGB", (2, 2)), "PNG"), **options)


# --- to_model_input ---------------------------------------------------------------------------


def test_model_input_is_normalised_from_the_unit_range():
    image = Image.fromarray(np.array([[[255, 0, 51], [0, 128, 255]]], dtype=np.uint8))  # 1 row, 2 columns
    model_input, resized = to_model_input(image, size=(1, 2), mean=(0.5, 0.5, 0.5), std=(0.5, 0.25, 0.5))
    assert model_input.shape == (1, 3, 1, 2) and model_input.dtype == torch.float32
    expected_unit = torch.tensor([[[1.0, 0.0]], [[0.0, 128 / 255]], [[0.2, 1.0]]])
    torch.testing.assert_close(resized, expected_unit)
    # (x - mean) / std: red (1 - .5)/.5 = 1, (0 - .5)/.5 = -1; green -2, (0.50196 - .5)/.25 = 0.00784
    expected_input = torch.tensor([[[[1.0, -1.0]], [[-2.0, 0.00784314]], [[-0.6, 1.0]]]])
    torch.testing.assert_close(model_input, expected_input)


def test_resize_is_bilinear_and_sizes_are_height_then_width():
    two_pixels = Image.fromarray(np.array([[[0, 0, 0], [255, 255, 255]]], dtype=np.uint8))
    _, resized = to_model_input(two_pixels, size=(1, 4), mean=(0, 0, 0), std=(1, 1, 1))
    # output centres at input x = -0.25, 0.25, 0.75, 1.25: 0, 0.25 * 255 = 63.75, 191.25, 255
    torch.testing.assert_close(resized[0, 0] * 255, torch.tensor([0.0, 64.0, 191.0, 255.0]))

    halves = np.zeros((10, 40, 3), dtype=np.uint8)
    halves[:, :20] = (255, 0, 0)
    halves[:, 20:] = (0, 0, 255)
    _, resized = to_model_input(Image.fromarray(halves), size=(5, 20), mean=(0, 0, 0), std=(1, 1, 1))
    assert resized.shape == (3, 5, 20)
    torch.testing.assert_close(resized[:, :, :9], torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1).expand(3, 5, 9))
    torch.testing.assert_close(resized[:, :, 11:], torch.tensor([0.0, 0.0, 1.0]).view(3, 1, 1).expand(3, 5, 9))


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        ({"image": Image.new("L", (2, 2))}, InvalidInputError, "RGB PIL image, got L"),
        ({"image": np.zeros((2, 2, 3))}, InvalidInputError, "got ndarray"),
        ({"size": (0, 4)}, InvalidOptionError, "'size'"),
        ({"size": (4,)}, InvalidOptionError, "'size'"),
        ({"mean": (0.5, 0.5)}, InvalidOptionError, "'mean'"),
        ({"std": (1, 0, 1)}, InvalidOptionError, "'std' must be positive"),
        ({"std": ("a", 1, 1)}, InvalidOptionError, "'std'"),
    ],
)
def test_to_model_input_rejects_bad_arguments(arguments, error, message):
    call = {"image": Image.new("RGB", (2, 2)), "size": (2, 2), "mean": (0, 0, 0), "std": (1, 1, 1), **arguments}
    with pytest.raises(error, match=message):
        to_model_input(call.pop("image"), **call)
