"""encode_attribution: reductions, polarity, clipping, every encoding, checked against hand-computed values."""

import base64
import io
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from serving.rendering.colormaps import colormap_lut
from explainers.errors import ExplanationFailedError, InvalidInputError, InvalidOptionError
from serving.rendering.encode import JSON_MAX_CELLS, RenderOptions, encode_attribution, reduce_channels

FULL_RANGE = (0.0, 100.0)


def decode_png(payload: dict) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(payload["data"])))
    assert image.format == "PNG"
    return image


def pixel_values(payload: dict) -> np.ndarray:
    """Map the PNG's pixels (or palette indices) back to attribution values with the documented formula."""
    pixels = np.asarray(decode_png(payload), dtype=np.float64)
    low, high = payload["scale"]["min"], payload["scale"]["max"]
    return low + pixels / 255.0 * (high - low)


def gray(**options) -> RenderOptions:
    return RenderOptions(colormap="gray", diverging_colormap="gray", **options)


def one_channel(rows) -> torch.Tensor:
    return torch.tensor([rows], dtype=torch.float64)


# --- reduction and polarity -------------------------------------------------------------------

# Two channels, four pixels: (1, -3) mixed signs, (3, 4) both positive, (-2, -2) both negative, (0, 0).
TWO_BY_TWO_BY_TWO = torch.tensor([[[1.0, 3.0], [-2.0, 0.0]], [[-3.0, 4.0], [-2.0, 0.0]]], dtype=torch.float64)

EXPECTED_REDUCTIONS = {
    # positive: R over the positive parts (1, 0), (3, 4), (0, 0), (0, 0)
    ("max_abs", "positive"): [[1.0, 4.0], [0.0, 0.0]],
    ("sum", "positive"): [[1.0, 7.0], [0.0, 0.0]],
    ("l2", "positive"): [[1.0, 5.0], [0.0, 0.0]],
    # negative: minus R over the negative parts (0, 3), (0, 0), (2, 2), (0, 0)
    ("max_abs", "negative"): [[-3.0, 0.0], [-2.0, 0.0]],
    ("sum", "negative"): [[-3.0, 0.0], [-4.0, 0.0]],
    ("l2", "negative"): [[-3.0, 0.0], [-(8**0.5), 0.0]],
    # both: positive map plus negative map; for sum that is the signed channel sum
    ("max_abs", "both"): [[-2.0, 4.0], [-2.0, 0.0]],
    ("sum", "both"): [[-2.0, 7.0], [-4.0, 0.0]],
    ("l2", "both"): [[-2.0, 5.0], [-(8**0.5), 0.0]],
}


@pytest.mark.parametrize(("reduce", "polarity"), list(EXPECTED_REDUCTIONS))
def test_each_reduction_and_polarity_on_a_hand_computed_example(reduce, polarity):
    reduced = reduce_channels(TWO_BY_TWO_BY_TWO, reduce=reduce, polarity=polarity)
    expected = torch.tensor(EXPECTED_REDUCTIONS[reduce, polarity], dtype=torch.float64)
    torch.testing.assert_close(reduced, expected)
    assert not torch.signbit(reduced[reduced == 0]).any()  # no -0.0 leaks into payloads


@pytest.mark.parametrize("reduce", ["max_abs", "sum", "l2"])
def test_json_carries_the_reduced_map(reduce):
    options = RenderOptions(encoding="json", reduce=reduce, polarity="both")
    payload = encode_attribution(TWO_BY_TWO_BY_TWO, options=options)
    assert payload["shape"] == [2, 2]
    np.testing.assert_allclose(payload["data"], EXPECTED_REDUCTIONS[reduce, "both"], rtol=1e-7)


def test_positive_polarity_pixels_and_scale():
    payload = encode_attribution(one_channel([[-1.0, 0.5], [2.0, 0.0]]), options=gray(clip=FULL_RANGE))
    # kept: [[0, 0.5], [2, 0]], range 0..2: 0.5 -> 63.75 -> 64
    np.testing.assert_array_equal(np.asarray(decode_png(payload)), [[0, 64], [255, 0]])
    assert payload["scale"] == {"min": 0.0, "max": 2.0}


def test_negative_polarity_shows_magnitude_and_reports_signed_values():
    options = gray(polarity="negative", clip=FULL_RANGE)
    payload = encode_attribution(one_channel([[-1.0, 0.5], [-0.25, 0.0]]), options=options)
    # magnitudes [[1, 0], [0.25, 0]], range 0..1: 0.25 -> 63.75 -> 64; pixel 255 means -1
    np.testing.assert_array_equal(np.asarray(decode_png(payload)), [[255, 0], [64, 0]])
    assert payload["scale"] == {"min": 0.0, "max": -1.0}
    np.testing.assert_allclose(pixel_values(payload), [[-1.0, 0.0], [-0.25, 0.0]], atol=1 / 255)


def test_both_polarity_is_a_symmetric_diverging_map_centred_at_128():
    payload = encode_attribution(one_channel([[-1.0, 0.5], [2.0, 0.0]]), options=gray(polarity="both", clip=FULL_RANGE))
    # M = 2: pixel = round(127.5 * (m / 2 + 1)): -1 -> 63.75, 0.5 -> 159.375, 2 -> 255, 0 -> 127.5 -> 128
    np.testing.assert_array_equal(np.asarray(decode_png(payload)), [[64, 159], [255, 128]])
    assert payload["scale"] == {"min": -2.0, "max": 2.0}


def test_a_flat_map_renders_without_dividing_by_zero():
    zeros = torch.zeros(2, 3, 3)
    single = encode_attribution(zeros, options=gray())
    assert np.asarray(decode_png(single)).max() == 0 and single["scale"] == {"min": 0.0, "max": 0.0}
    diverging = encode_attribution(zeros, options=gray(polarity="both"))
    assert set(np.unique(np.asarray(decode_png(diverging)))) == {128}
    constant = encode_attribution(torch.full((1, 2, 2), 0.25), options=gray())
    np.testing.assert_allclose(pixel_values(constant), 0.25)  # every pixel maps back to the one value


# --- clipping ---------------------------------------------------------------------------------


def noise_attribution(seed: int, shape=(3, 64, 64)) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float32) * 0.01


def test_single_sided_clip_matches_numpy_percentile_and_maps_back_within_one_step():
    attribution = noise_attribution(1)
    payload = encode_attribution(attribution, options=gray(clip=(5.0, 95.0)))
    reduced = np.maximum(attribution.numpy(), 0).max(axis=0)
    low, high = np.percentile(reduced, [5.0, 95.0])
    assert payload["scale"]["min"] == pytest.approx(low, rel=1e-6)
    assert payload["scale"]["max"] == pytest.approx(high, rel=1e-6)
    step = (high - low) / 255
    np.testing.assert_allclose(pixel_values(payload), np.clip(reduced, low, high), atol=step)
    pixels = np.asarray(decode_png(payload))
    assert (pixels == 255).sum() >= (reduced >= high).sum() > 0.04 * reduced.size  # the top 5 % saturate


def test_both_clip_uses_percentiles_of_the_magnitude_with_a_noise_floor():
    attribution = noise_attribution(2)
    payload = encode_attribution(attribution, options=gray(polarity="both", reduce="sum", clip=(10.0, 90.0)))
    signed = attribution.numpy().astype(np.float64).sum(axis=0)
    floor, limit = np.percentile(np.abs(signed), [10.0, 90.0])
    assert payload["scale"]["min"] == pytest.approx(-limit, rel=1e-6)
    assert payload["scale"]["max"] == pytest.approx(limit, rel=1e-6)
    expected = np.where(np.abs(signed) < floor, 0.0, np.clip(signed, -limit, limit))
    np.testing.assert_allclose(pixel_values(payload), expected, atol=2 * limit / 255)


def test_negative_clip_maps_back_within_one_step():
    attribution = noise_attribution(3)
    payload = encode_attribution(attribution, options=gray(polarity="negative", reduce="l2", clip=(0.0, 99.0)))
    magnitude = np.linalg.norm(np.maximum(-attribution.numpy().astype(np.float64), 0), axis=0)
    low, high = np.percentile(magnitude, [0.0, 99.0])
    np.testing.assert_allclose(pixel_values(payload), -np.clip(magnitude, low, high), atol=(high - low) / 255)


@settings(max_examples=100, deadline=None)
@given(
    values=hnp.arrays(
        np.float64,
        hnp.array_shapes(min_dims=3, max_dims=3, min_side=1, max_side=9),
        elements=st.floats(-1e3, 1e3, allow_nan=False),
    ),
    polarity=st.sampled_from(["positive", "negative", "both"]),
    reduce=st.sampled_from(["max_abs", "sum", "l2"]),
    bounds=st.lists(st.floats(0, 100), min_size=2, max_size=2, unique=True).map(sorted),
)
def test_any_map_decodes_back_to_its_clipped_values_within_one_step(values, polarity, reduce, bounds):
    attribution = torch.from_numpy(values)
    payload = encode_attribution(attribution, options=gray(polarity=polarity, reduce=reduce, clip=tuple(bounds)))
    signed = reduce_channels(attribution, reduce=reduce, polarity=polarity).numpy()
    lower, upper = np.percentile(np.abs(signed), bounds)
    if polarity == "both":
        expected = np.where(np.abs(signed) < lower, 0.0, np.clip(signed, -upper, upper))
        step = 2 * upper / 255
    else:
        sign = 1.0 if polarity == "positive" else -1.0
        expected = sign * np.clip(np.abs(signed), lower, upper)
        step = (upper - lower) / 255
    np.testing.assert_allclose(pixel_values(payload), expected, atol=step * 1.0001 + 1e-9)


# --- encodings --------------------------------------------------------------------------------


def test_png_is_a_palette_image_of_the_colormap_with_the_maps_shape():
    attribution = noise_attribution(4, shape=(3, 20, 30))
    payload = encode_attribution(attribution, options=RenderOptions())
    image = decode_png(payload)
    assert payload["encoding"] == "png" and payload["shape"] == [20, 30]
    assert image.mode == "P" and image.size == (30, 20)
    inferno = colormap_lut("inferno", diverging=False)
    indices = np.asarray(image)
    np.testing.assert_array_equal(np.asarray(image.convert("RGB")), inferno[indices])


def test_png_with_gray_is_an_8_bit_grayscale_image():
    image = decode_png(encode_attribution(noise_attribution(5, shape=(1, 8, 5)), options=gray()))
    assert image.mode == "L" and image.size == (5, 8)


def test_diverging_png_uses_the_diverging_palette():
    options = RenderOptions(polarity="both", clip=FULL_RANGE)
    image = decode_png(encode_attribution(one_channel([[-1.0, 1.0]]), options=options))
    coolwarm = colormap_lut("coolwarm", diverging=True)
    np.testing.assert_array_equal(np.asarray(image.convert("RGB"))[0], coolwarm[[0, 255]])


def test_npy_f16_holds_the_raw_attributions_not_the_reduced_map():
    attribution = noise_attribution(6, shape=(3, 16, 12))
    payload = encode_attribution(attribution, options=RenderOptions(encoding="npy-f16"))
    decoded = np.load(io.BytesIO(base64.b64decode(payload["data"])), allow_pickle=False)
    assert payload["shape"] == [3, 16, 12] and payload["dtype"] == "float16"
    assert decoded.dtype == np.float16 and decoded.shape == (3, 16, 12)
    np.testing.assert_array_equal(decoded, attribution.numpy().astype(np.float16))
    # float16 keeps 11 significant bits: relative error <= 2**-11 above the subnormal range
    np.testing.assert_allclose(decoded.astype(np.float32), attribution.numpy(), rtol=2**-11, atol=2**-24)
    assert (decoded < 0).any()  # polarity "positive" did not touch the raw data


def test_npy_f16_refuses_values_float16_cannot_hold():
    with pytest.raises(InvalidOptionError, match="'encoding'.*65504"):
        encode_attribution(torch.full((1, 2, 2), 70000.0), options=RenderOptions(encoding="npy-f16"))


def test_json_is_a_nested_list_of_floats_and_small_only():
    payload = encode_attribution(noise_attribution(7, shape=(3, 64, 64)), options=RenderOptions(encoding="json"))
    data = payload["data"]
    assert payload["shape"] == [64, 64] and len(data) == 64 and all(len(row) == 64 for row in data)
    assert all(type(value) is float for row in data for value in row)
    json.dumps(payload, allow_nan=False)  # strict JSON
    with pytest.raises(InvalidOptionError, match="'encoding'.*4096"):
        encode_attribution(torch.zeros(1, 65, 64), options=RenderOptions(encoding="json"))
    assert JSON_MAX_CELLS == 64 * 64


def test_json_values_are_written_with_float32_precision_and_short():
    payload = encode_attribution(one_channel([[0.1, 0.7]]).float(), options=RenderOptions(encoding="json"))
    assert json.dumps(payload["data"]) == "[[0.1, 0.7]]"  # not 0.10000000149011612


# --- overlay ----------------------------------------------------------------------------------

# Attribution [[0, 1], [0.5, 0]] over image pixels (0.2, 0.4, 0.6) (1, 0, 0) / (0, 0, 0) (0, 0, 0).
OVERLAY_ATTRIBUTION = one_channel([[0.0, 1.0], [0.5, 0.0]])
OVERLAY_IMAGE = torch.tensor(
    [[[0.2, 1.0], [0.0, 0.0]], [[0.4, 0.0], [0.0, 0.0]], [[0.6, 0.0], [0.0, 0.0]]], dtype=torch.float32
)


def render_overlay(base: str, image=OVERLAY_IMAGE, **options) -> np.ndarray:
    options = RenderOptions(encoding="overlay", overlay_base=base, overlay_alpha=0.25, clip=FULL_RANGE, **options)
    payload = encode_attribution(OVERLAY_ATTRIBUTION, options=options, image=image)
    assert payload["shape"] == [2, 2]
    image = decode_png(payload)
    assert image.mode == "RGB" and image.size == (2, 2)
    return np.asarray(image)


def test_overlay_on_the_original_image():
    pixels = render_overlay("original")
    assert tuple(pixels[0, 0]) == (51, 102, 153)  # zero attribution: exactly the image (0.2, 0.4, 0.6) * 255
    # strongest: 0.75 * (255, 0, 0) + 0.25 * inferno[255] (252, 255, 164) = (254.25, 63.75, 41)
    assert tuple(pixels[0, 1]) == (254, 64, 41)
    # half strength, alpha 0.125, over black: 0.125 * inferno[128] (187, 56, 83) = (23.4, 7, 10.4)
    assert tuple(pixels[1, 0]) == (23, 7, 10)


def test_overlay_on_the_grayscale_image():
    pixels = render_overlay("grayscale")
    # 0.299 * 51 + 0.587 * 102 + 0.114 * 153 = 92.565
    assert tuple(pixels[0, 0]) == (93, 93, 93)
    # base 0.299 * 255 = 76.245; 0.75 * 76.245 = 57.18 plus (63, 63.75, 41)
    assert tuple(pixels[0, 1]) == (120, 121, 98)


def test_overlay_on_no_base_needs_no_image():
    pixels = render_overlay("none", image=None)
    assert tuple(pixels[0, 0]) == (0, 0, 0)
    assert tuple(pixels[0, 1]) == (63, 64, 41)  # 0.25 * (252, 255, 164)


def test_both_polarity_overlay_keeps_the_base_where_attribution_is_zero():
    attribution = one_channel([[0.0, -1.0], [1.0, 0.0]])
    options = RenderOptions(encoding="overlay", polarity="both", overlay_alpha=1.0, clip=FULL_RANGE)
    pixels = np.asarray(decode_png(encode_attribution(attribution, options=options, image=OVERLAY_IMAGE)))
    coolwarm = colormap_lut("coolwarm", diverging=True)
    assert tuple(pixels[0, 0]) == (51, 102, 153)
    assert tuple(pixels[1, 1]) == (0, 0, 0)
    assert tuple(pixels[0, 1]) == tuple(coolwarm[0]) and tuple(pixels[1, 0]) == tuple(coolwarm[255])


def test_overlay_rejects_a_missing_or_mismatched_image():
    with pytest.raises(InvalidInputError, match="needs the input image"):
        encode_attribution(OVERLAY_ATTRIBUTION, options=RenderOptions(encoding="overlay"))
    with pytest.raises(InvalidInputError, match=r"\[3, 2, 2\]"):
        encode_attribution(OVERLAY_ATTRIBUTION, options=RenderOptions(encoding="overlay"), image=torch.zeros(3, 4, 4))


# --- coarsening -------------------------------------------------------------------------------

SIXTEEN = one_channel([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0], [9.0, 10.0, 11.0, 12.0], [13.0, 14.0, 15.0, 16.0]])


def test_coarse_size_average_pools_the_map_and_json_sends_only_the_grid():
    payload = encode_attribution(SIXTEEN, options=RenderOptions(encoding="json", coarse_size=2))
    # 2x2 block means: (1+2+5+6)/4 = 3.5, (3+4+7+8)/4 = 5.5, 11.5, 13.5
    assert payload["shape"] == [2, 2] and payload["data"] == [[3.5, 5.5], [11.5, 13.5]]


def test_coarse_png_and_npy_carry_only_the_grid():
    png = encode_attribution(SIXTEEN, options=gray(coarse_size=2, clip=FULL_RANGE))
    assert png["shape"] == [2, 2] and decode_png(png).size == (2, 2)
    np.testing.assert_allclose(pixel_values(png), [[3.5, 5.5], [11.5, 13.5]], atol=10 / 255)
    two_channels = torch.cat([SIXTEEN, -SIXTEEN])
    npy = encode_attribution(two_channels, options=RenderOptions(encoding="npy-f16", coarse_size=2))
    decoded = np.load(io.BytesIO(base64.b64decode(npy["data"])))
    assert npy["shape"] == [2, 2, 2]
    np.testing.assert_array_equal(decoded, [[[3.5, 5.5], [11.5, 13.5]], [[-3.5, -5.5], [-11.5, -13.5]]])


def test_coarse_overlay_is_drawn_at_the_image_size_in_uniform_blocks():
    options = RenderOptions(encoding="overlay", overlay_base="none", overlay_alpha=1.0, coarse_size=2, clip=FULL_RANGE)
    payload = encode_attribution(SIXTEEN, options=options)
    pixels = np.asarray(decode_png(payload))
    assert payload["shape"] == [4, 4] and pixels.shape == (4, 4, 3)
    inferno = colormap_lut("inferno", diverging=False)
    # cell values 3.5..13.5 over 0..13.5 (polarity positive, range lower = min = 3.5)
    assert tuple(pixels[0, 0]) == (0, 0, 0)  # the lowest cell has strength 0: the black base
    assert tuple(pixels[3, 3]) == tuple(inferno[255]) and tuple(pixels[2, 3]) == tuple(inferno[255])
    np.testing.assert_array_equal(pixels[0:2, 2:4], np.broadcast_to(pixels[0, 2], (2, 2, 3)))


def test_coarse_size_beyond_the_map_changes_nothing():
    plain = encode_attribution(SIXTEEN, options=RenderOptions(encoding="json"))
    coarse = encode_attribution(SIXTEEN, options=RenderOptions(encoding="json", coarse_size=100))
    assert plain == coarse


# --- payload size -----------------------------------------------------------------------------


def realistic_attribution() -> torch.Tensor:
    """Gradient-like attributions: signed noise, strongest on a central 'object', weak elsewhere."""
    generator = torch.Generator().manual_seed(0)
    rows = torch.linspace(-1, 1, 224).view(224, 1)
    columns = torch.linspace(-1, 1, 224).view(1, 224)
    envelope = torch.exp(-(rows**2 + columns**2) / 0.2) + 0.05
    return torch.randn(3, 224, 224, generator=generator) * envelope * 1e-2


def test_a_224_png_explanation_is_at_least_20_times_smaller_than_json_of_the_tensor():
    attribution = realistic_attribution()
    stock_bytes = len(json.dumps(attribution.tolist()))
    payload = encode_attribution(attribution, options=RenderOptions())
    png_bytes = len(json.dumps(payload))  # the whole payload as sent: base64 PNG plus keys and scale
    ratio = stock_bytes / png_bytes
    print(f"224x224x3: json.dumps(tolist()) {stock_bytes} B, png payload {png_bytes} B, ratio {ratio:.1f}")
    assert ratio >= 20


# --- input validation -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attribution", "message"),
    [
        (np.zeros((1, 2, 2)), "torch.Tensor"),
        (torch.zeros(2, 2), r"\[C, H, W\]"),
        (torch.zeros(1, 0, 2), r"\[C, H, W\]"),
        (torch.zeros(1, 2, 2, dtype=torch.int64), "floating-point"),
    ],
)
def test_malformed_attributions_are_invalid_input(attribution, message):
    with pytest.raises(InvalidInputError, match=message):
        encode_attribution(attribution, options=RenderOptions())


def test_non_finite_attributions_are_a_failed_explanation():
    with pytest.raises(ExplanationFailedError, match="1 NaN or infinite"):
        encode_attribution(torch.tensor([[[0.0, float("nan")]]]), options=RenderOptions())
